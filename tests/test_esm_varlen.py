"""Unpadded ESM (`attention: varlen`): equal to the padded paths, features and gradients, on real proteins.

The batch holds real proteins of different lengths and one longer than 1022 residues (two windows), with token
dropout on and masked residues. On CPU the varlen path runs its reference attention (one SDPA per sequence);
the `cuda` tests run FlashAttention's variable-length kernel in bf16 and are skipped without CUDA.
"""
import contextlib
import shutil
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from esm_gearnet.data import ProteinBatch
from esm_gearnet.models import ESM
from esm_gearnet.models.esm import MAX_RESIDUES, esm2_forward_varlen, uses_varlen_kernel

ARCHITECTURES = [(2, 32, 4), (3, 80, 5)]  # (layers, width, heads): head sizes 8 and 16
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: FlashAttention's varlen kernel")
BF16_TOLERANCE = 2e-2  # relative, as benchmarks/train_step.py checks bf16 against fp32


def _proteins(all_proteins):
    """Real proteins of 28 to 566 residues and one of 1132 (a chain twice: windows of 1022 + 110)."""
    by_length = sorted(all_proteins, key=len)
    longest = by_length[-1]
    long = longest.subresidue(torch.arange(len(longest)).repeat(2))
    assert len(long) > MAX_RESIDUES
    return [by_length[0], by_length[20], long, by_length[-5], by_length[5]]


def _batch_and_mask(all_proteins, seed=0):
    batch = ProteinBatch.pack(_proteins(all_proteins))
    mask = torch.rand(batch.num_residue, generator=torch.Generator().manual_seed(seed)) < 0.15
    return batch, mask


def _models(architecture, attentions=("varlen", "sdpa", "esm"), **options):
    models = {}
    for attention in attentions:
        torch.manual_seed(0)
        models[attention] = ESM(pretrained=False, architecture=architecture,
                                **{"attention": attention, **options.get(attention, {})})
    state = models[attentions[0]].state_dict()
    for model in models.values():
        model.load_state_dict(state)
        assert model.model.token_dropout
    return models


def _run(model, batch, mask):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ESM: proteins longer than")
        return model(batch, residue_mask=mask)


@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=lambda a: "x".join(map(str, a)))
def test_varlen_equals_padded_paths(all_proteins, architecture):
    models = _models(architecture)
    batch, mask = _batch_and_mask(all_proteins)
    assert int(mask.sum()) > 0
    with torch.no_grad():
        for residue_mask in (None, mask):
            outputs = {name: _run(model.eval(), batch, residue_mask) for name, model in models.items()}
            for reference in ("sdpa", "esm"):
                for key in ("residue_feature", "graph_feature"):
                    torch.testing.assert_close(outputs["varlen"][key], outputs[reference][key], atol=1e-5, rtol=0)
        for layer in range(architecture[0]):  # intermediate layers (no final layer norm) too
            for model in models.values():
                model.repr_layer = layer
            torch.testing.assert_close(_run(models["varlen"], batch, mask)["residue_feature"],
                                       _run(models["sdpa"], batch, mask)["residue_feature"], atol=1e-5, rtol=0)


def _assert_gradient_close(grad, expected, name):
    """Equal to 1e-5 of the parameter's largest gradient entry. The loss sums over ~2,500 residues, so entries
    reach ~300 and fp32 rounding alone is ~1e-4 absolute; sdpa and fair-esm differ by 1.6e-6 of scale here."""
    scale = float(expected.abs().max())
    difference = float((grad - expected).abs().max())
    assert difference <= 1e-5 * scale, f"{name}: max difference {difference:.3g} > 1e-5 x {scale:.3g}"


@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=lambda a: "x".join(map(str, a)))
def test_varlen_gradients_equal_padded_paths(all_proteins, architecture):
    models = _models(architecture)
    batch, mask = _batch_and_mask(all_proteins, seed=1)
    target = torch.randn(batch.num_residue, architecture[1], generator=torch.Generator().manual_seed(2))
    gradients = {}
    for name, model in models.items():
        out = _run(model.train(), batch, mask)  # ESM-2 has no dropout: train mode is deterministic
        (out["residue_feature"] * target).sum().add(out["graph_feature"].pow(2).sum()).backward()
        gradients[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert gradients["varlen"].keys() == gradients["sdpa"].keys() == gradients["esm"].keys()
    for reference in ("sdpa", "esm"):
        for n, grad in gradients["varlen"].items():
            _assert_gradient_close(grad, gradients[reference][n], n)


def test_packed_tokens_are_the_padded_rows_without_padding(all_proteins):
    esm = ESM(pretrained=False, architecture=(1, 32, 4), attention="varlen")
    batch, mask = _batch_and_mask(all_proteins)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ESM: proteins longer than")
        padded, window, column = esm.tokenize(batch, mask)
        tokens, cu_seqlens, token = esm.tokenize_packed(batch, mask)
    rows = padded.ne(esm.alphabet.padding_idx)
    assert torch.equal(tokens, padded[rows])  # each window its own <cls> ... <eos>, in the same order
    assert torch.equal(cu_seqlens.diff(), rows.sum(1))
    assert len(cu_seqlens) == len(batch.num_residues) + 2  # the long protein is two windows
    assert torch.equal(tokens[token], padded[window, column])
    assert torch.equal(tokens[cu_seqlens[:-1]], torch.full_like(cu_seqlens[:-1], esm.alphabet.cls_idx))


def test_rotary_positions_restart_in_every_sequence(all_proteins):
    """One sequence alone equals the same sequence placed after others in the packed tokens."""
    esm = ESM(pretrained=False, architecture=(2, 32, 4), attention="varlen").eval()
    proteins = _proteins(all_proteins)[:2]
    with torch.no_grad():
        tokens, cu_seqlens, _ = esm.tokenize_packed(ProteinBatch.pack(proteins))
        together = esm2_forward_varlen(esm.model, tokens, cu_seqlens, 2, esm.alphabet.mask_idx)
        second = tokens[int(cu_seqlens[1]):]
        alone = esm2_forward_varlen(esm.model, second, torch.tensor([0, len(second)]), 2, esm.alphabet.mask_idx)
    torch.testing.assert_close(together[int(cu_seqlens[1]):], alone, atol=1e-5, rtol=0)


def test_no_flop_is_spent_on_padding(all_proteins):
    """The packed batch costs exactly the sum of its proteins alone; the padded batch costs more."""
    models = _models((2, 32, 4), attentions=("varlen", "sdpa"))
    proteins = _proteins(all_proteins)
    proteins = proteins[:2] + proteins[3:]  # no windows: one sequence per protein

    def flops(model, group):  # the math backend spells attention out in matrix products, which are counted
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            model(ProteinBatch.pack(group))
        return counter.get_total_flops()

    alone = sum(flops(models["varlen"], [p]) for p in proteins)
    assert flops(models["varlen"], proteins) == alone
    assert flops(models["sdpa"], proteins) > 2 * alone  # lengths 28 to 443: the padded batch is mostly padding


def test_varlen_with_checkpointing_and_the_feature_cache(all_proteins):
    models = _models((2, 32, 4), attentions=("sdpa", "varlen", "cached"),
                     varlen={"activation_checkpointing": True}, cached={"attention": "varlen",
                                                                       "feature_cache_gib": 1.0})
    batch, mask = _batch_and_mask(all_proteins)
    target = torch.randn(batch.num_residue, 32, generator=torch.Generator().manual_seed(2))
    reference = _run(models["sdpa"].train(), batch, mask)
    checkpointed = _run(models["varlen"].train(), batch, mask)
    torch.testing.assert_close(checkpointed["residue_feature"], reference["residue_feature"], atol=1e-5, rtol=0)
    (reference["residue_feature"] * target).sum().backward()
    (checkpointed["residue_feature"] * target).sum().backward()
    for (n, a), b in zip(models["varlen"].named_parameters(), models["sdpa"].parameters()):
        if b.grad is not None:
            _assert_gradient_close(a.grad, b.grad, n)
    cached = models["cached"]
    cached.freeze("sequence_model")
    with torch.no_grad():
        expected = _run(models["sdpa"].eval(), batch, None)["residue_feature"]
    for _ in range(2):  # the second pass reads the cache
        torch.testing.assert_close(_run(cached, batch, None)["residue_feature"], expected, atol=1e-5, rtol=0)
    assert len(cached.feature_cache) == len(batch.num_residues)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_varlen_layers_equal_eager(all_proteins):
    models = _models((2, 32, 4), attentions=("sdpa", "varlen"), varlen={"compile": True})
    batch, mask = _batch_and_mask(all_proteins)
    with torch.no_grad():
        torch.testing.assert_close(_run(models["varlen"].eval(), batch, mask)["residue_feature"],
                                   _run(models["sdpa"].eval(), batch, mask)["residue_feature"], atol=1e-5, rtol=0)


def test_kernel_call_with_a_stand_in_kernel(all_proteins, monkeypatch):
    """The CUDA branch's plumbing on CPU: a stand-in for `varlen_attn` with its signature, which checks what
    it is given and computes attention with a block-diagonal mask (a second, independent reference). The model
    then still equals the padded path, features and gradients."""
    from esm_gearnet.models.esm import attention

    calls = []

    def kernel(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k):
        assert q.shape == k.shape == v.shape and q.dim() == 3  # [T, H, hd]
        assert cu_seq_q.dtype == torch.int32 and cu_seq_q is cu_seq_k and cu_seq_q.device == q.device
        assert int(cu_seq_q[0]) == 0 and int(cu_seq_q[-1]) == len(q)
        assert isinstance(max_q, int) and max_q == max_k == int(cu_seq_q.diff().max())
        sequence = torch.repeat_interleave(torch.arange(len(cu_seq_q) - 1), cu_seq_q.diff().long())
        block = sequence[:, None] == sequence[None, :]  # [T, T]
        calls.append(len(cu_seq_q) - 1)
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=block).transpose(0, 1)

    monkeypatch.setattr(attention, "varlen_kernel", lambda: kernel)
    monkeypatch.setattr(attention, "varlen_kernel_dtype", lambda q: q.dtype)
    models = _models((2, 32, 4), attentions=("varlen", "sdpa"))
    batch, mask = _batch_and_mask(all_proteins)
    target = torch.randn(batch.num_residue, 32, generator=torch.Generator().manual_seed(3))
    out = {}
    for name, model in models.items():
        out[name] = _run(model.train(), batch, mask)["residue_feature"]
        (out[name] * target).sum().backward()
    assert calls == [len(batch.num_residues) + 1] * 2  # both layers, the long protein as two sequences
    torch.testing.assert_close(out["varlen"], out["sdpa"], atol=1e-5, rtol=0)
    for (n, a), b in zip(models["varlen"].named_parameters(), models["sdpa"].parameters()):
        if b.grad is not None:
            _assert_gradient_close(a.grad, b.grad, n)


def test_varlen_refuses_bad_names():
    with pytest.raises(ValueError, match="attention must be 'sdpa', 'esm' or 'varlen'"):
        ESM(pretrained=False, architecture=(1, 32, 4), attention="flash")


# ---- CUDA: FlashAttention's variable-length kernel -------------------------------------------------------------

def _relative(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.cuda
@CUDA
def test_cuda_fp32_varlen_equals_padded(all_proteins):
    """fp32 on CUDA runs the exact reference attention (FlashAttention has no fp32 kernel): 1e-4, as issue 17
    asks of every fp32 comparison on CUDA."""
    models = {name: m.cuda().eval() for name, m in _models((2, 64, 4), attentions=("varlen", "sdpa")).items()}
    batch, mask = _batch_and_mask(all_proteins)
    batch, mask = batch.to("cuda"), mask.cuda()
    with torch.no_grad():
        out = {name: _run(model, batch, mask) for name, model in models.items()}
    torch.testing.assert_close(out["varlen"]["residue_feature"], out["sdpa"]["residue_feature"], atol=1e-4, rtol=0)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("architecture", [(2, 64, 4), (3, 320, 20)], ids=lambda a: "x".join(map(str, a)))
def test_cuda_bf16_varlen_kernel_matches_padded(all_proteins, architecture):
    """varlen_attn under bf16 autocast against the padded SDPA path, in bf16 and in fp32: features and loss
    within the benchmark's bf16 tolerance (2e-2 relative); the gradient as close to the fp32 one as 2e-2 or
    twice the padded bf16 path's own distance from it, whichever is larger (bf16 gradients are not specified
    more tightly anywhere in the repository)."""
    models = {name: m.cuda().train() for name, m in _models(architecture, attentions=("varlen", "sdpa")).items()}
    batch, mask = _batch_and_mask(all_proteins)
    batch, mask = batch.to("cuda"), mask.cuda()
    q = torch.zeros(1, architecture[2], architecture[1] // architecture[2], device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert uses_varlen_kernel(q), "the varlen kernel is not used under bf16 autocast"
    results = {}
    for name, precision in (("varlen", torch.bfloat16), ("sdpa", torch.bfloat16), ("sdpa", None)):
        model = models[name]
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=precision) if precision else contextlib.nullcontext():
            out = _run(model, batch, mask)
        loss = out["residue_feature"].float().pow(2).mean()
        loss.backward()
        grad = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        results[name, precision] = (out["residue_feature"].detach(), float(loss), grad)
    feature, loss, grad = results["varlen", torch.bfloat16]
    assert torch.isfinite(feature).all() and torch.isfinite(grad).all()
    for key in (("sdpa", torch.bfloat16), ("sdpa", None)):
        ref_feature, ref_loss, _ = results[key]
        assert _relative(feature, ref_feature) < BF16_TOLERANCE, key
        assert abs(loss - ref_loss) / abs(ref_loss) < BF16_TOLERANCE, key
    fp32_grad, padded_bf16_grad = results["sdpa", None][2], results["sdpa", torch.bfloat16][2]
    padded_error = _relative(padded_bf16_grad, fp32_grad)
    assert _relative(grad, fp32_grad) <= max(BF16_TOLERANCE, 2 * padded_error), padded_error
