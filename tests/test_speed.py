"""The fast paths compute what the plain ones do: sparse relational aggregation, activation checkpointing,
frozen ESM without autograd, the frozen-ESM feature cache, and torch.compile."""
import shutil

import pytest
import torch

from esm_gearnet.data import ProteinBatch
from esm_gearnet.models import ESM
from esm_gearnet.models.gearnet import relational_adjacency, relational_sum


def _loop_relational_sum(x, edge_list, num_node, num_relation):
    out = [[torch.zeros(x.shape[1], dtype=x.dtype) for _ in range(num_relation)] for _ in range(num_node)]
    for source, target, relation in edge_list.tolist():
        out[target][relation] = out[target][relation] + x[source]
    return torch.stack([torch.cat(row) for row in out])


def test_relational_sum_equals_a_loop_over_edges(device):
    generator = torch.Generator().manual_seed(0)
    num_node, num_source, num_relation = 13, 17, 3
    edge_list = torch.stack([torch.randint(0, num_source, (80,), generator=generator),
                             torch.randint(0, num_node, (80,), generator=generator),
                             torch.randint(0, num_relation, (80,), generator=generator)], -1)
    edge_list = torch.cat([edge_list, edge_list[:10]])  # repeated edges count twice
    edge_list = edge_list.to(device)
    x = torch.randn(num_source, 5, dtype=torch.float64, generator=generator).to(device).requires_grad_()
    adjacency = relational_adjacency(edge_list, num_node, num_relation, num_source)
    # a valid CSR matrix (sorted, unique, in range): rebuilding it with the invariant checks on must succeed
    torch.sparse_csr_tensor(adjacency.crow_indices(), adjacency.col_indices(), adjacency.values(),
                            adjacency.shape, check_invariants=True)
    fast = relational_sum(x, adjacency, num_relation)
    slow = _loop_relational_sum(x, edge_list, num_node, num_relation)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    weight = torch.randn_like(slow)
    grad_fast, = torch.autograd.grad((fast * weight).sum(), x)
    grad_slow, = torch.autograd.grad((slow * weight).sum(), x)
    torch.testing.assert_close(grad_fast, grad_slow, rtol=1e-12, atol=1e-12)
    # GearNet's reference path (`aggregation: scatter`, what the benchmarks compare with) gives the same sums
    scatter = relational_sum(x, relational_adjacency(edge_list, num_node, num_relation, num_source, "scatter"),
                             num_relation)
    torch.testing.assert_close(scatter, slow, rtol=1e-12, atol=1e-12)
    # no edges at all: zeros of the right shape
    empty = relational_adjacency(edge_list[:0], num_node, num_relation, num_source)
    assert torch.equal(relational_sum(x, empty, num_relation), torch.zeros(num_node, num_relation * 5,
                                                                           dtype=torch.float64))


def _batch(proteins, length=90):
    return ProteinBatch.pack([p.subresidue(torch.arange(min(len(p), length))) for p in proteins])


def _tiny_esm(**options):
    torch.manual_seed(0)
    return ESM(pretrained=False, architecture=(2, 32, 4), **options)


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda m, inputs, output: calls.append(inputs[0].shape[0]))
    return calls


def test_activation_checkpointing_recomputes_layers_and_changes_nothing(all_proteins):
    batch = _batch(all_proteins[:4])
    results = []
    for checkpointing in (False, True):
        esm = _tiny_esm(activation_checkpointing=checkpointing)
        calls = _count_calls(esm.model.layers[0].fc1)
        out = esm(batch)
        (out["residue_feature"].square().mean() + out["graph_feature"].sum()).backward()
        results.append((out["residue_feature"].detach(),
                        {n: p.grad for n, p in esm.named_parameters() if p.grad is not None}, len(calls)))
    (plain, plain_grads, plain_calls), (fast, fast_grads, fast_calls) = results
    assert (plain_calls, fast_calls) == (1, 2)  # the layer ran again in the backward pass
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert plain_grads.keys() == fast_grads.keys() and len(plain_grads) > 10
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():  # nothing to recompute without gradients
        esm = _tiny_esm(activation_checkpointing=True)
        calls = _count_calls(esm.model.layers[0].fc1)
        torch.testing.assert_close(esm(batch)["residue_feature"], plain, rtol=1e-5, atol=1e-5)
        assert len(calls) == 1
    with pytest.raises(ValueError, match="attention: sdpa"):
        ESM(pretrained=False, architecture=(2, 32, 4), attention="esm", activation_checkpointing=True)


def test_frozen_esm_runs_without_autograd(all_proteins):
    batch = _batch(all_proteins[:3])
    esm = _tiny_esm()
    trained = esm(batch)["residue_feature"]
    assert trained.requires_grad
    esm.freeze("sequence_model")  # what `sequence_model_lr_ratio: 0` and `fix_sequence_model` do
    frozen = esm(batch)["residue_feature"]
    assert not frozen.requires_grad and frozen.grad_fn is None
    assert torch.equal(frozen, trained.detach())


def test_feature_cache_of_a_frozen_esm(all_proteins):
    proteins = [p.subresidue(torch.arange(min(len(p), 90))) for p in all_proteins[:5]]
    reference = _tiny_esm()
    esm = _tiny_esm(feature_cache_gib=1.0)
    for model in (reference, esm):
        model.freeze("sequence_model")
    windows = _count_calls(esm.model.embed_tokens)  # proteins sent through ESM per call

    def check(chosen, computed):
        batch = ProteinBatch.pack([proteins[i] for i in chosen])
        before = sum(windows)
        out = esm(batch)
        assert sum(windows) - before == computed
        expected = reference(batch)
        torch.testing.assert_close(out["residue_feature"], expected["residue_feature"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["graph_feature"], expected["graph_feature"], rtol=1e-5, atol=1e-5)

    check([0, 1, 2, 3], computed=4)
    check([2, 4, 3], computed=1)  # 2 and 3 come from the cache, in their place in the batch
    check([4, 0, 1, 2, 3], computed=0)
    assert len(esm.feature_cache) == 5
    # a crop is another sequence: a miss, never a wrong hit
    crop = proteins[0].subresidue(torch.arange(10, 60))
    before = sum(windows)
    torch.testing.assert_close(esm(ProteinBatch.pack([crop]))["residue_feature"],
                               reference(ProteinBatch.pack([crop]))["residue_feature"], rtol=1e-5, atol=1e-5)
    assert sum(windows) - before == 1
    # masked residues (pre-training) are not what was cached: they go through ESM
    batch = ProteinBatch.pack(proteins[:2])
    mask = torch.zeros(batch.num_residue, dtype=torch.bool)
    mask[::5] = True
    before = sum(windows)
    torch.testing.assert_close(esm(batch, residue_mask=mask)["residue_feature"],
                               reference(batch, residue_mask=mask)["residue_feature"], rtol=1e-5, atol=1e-5)
    assert sum(windows) - before == 2
    # new weights empty the cache
    esm.load_state_dict(reference.state_dict())
    assert not esm.feature_cache
    # the budget is respected: room for one protein of 90 x 32 floats
    small = _tiny_esm(feature_cache_gib=90 * 32 * 4 / 2 ** 30)
    small.freeze("sequence_model")
    small(ProteinBatch.pack(proteins[:3]))
    assert len(small.feature_cache) == 1
    # a trained ESM never uses the cache, even with every parameter's requires_grad off by hand: the cache
    # follows the freezing the config asked for, not the flags
    trained = _tiny_esm(feature_cache_gib=1.0)
    trained(ProteinBatch.pack(proteins[:2]))
    trained.requires_grad_(False)
    with torch.no_grad():
        trained(ProteinBatch.pack(proteins[:2]))
    assert not trained.feature_cache


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_esm_layers_equal_eager(all_proteins):
    batch = _batch(all_proteins[:3])
    outputs = []
    for compiled in (False, True):
        esm = _tiny_esm(compile=compiled)
        out = esm(batch)["residue_feature"]
        out.square().mean().backward()
        outputs.append((out.detach(), {n: p.grad for n, p in esm.named_parameters() if p.grad is not None}))
    (eager, eager_grads), (compiled, compiled_grads) = outputs
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
