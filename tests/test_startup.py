"""Pretrained models start without initialising what their file replaces (`checkpoint.skipping_init` and
`load_state_dict_checked(..., assign=True)`): fair-esm files (ESM-2 and ESM-1b), Hugging Face folders, `--ckpt`,
`--resume` and the checkpoints `embed` / `predict` read give the same module as the old path (build with random
weights, then copy the file in), write into no parameter they replace, draw no random number for them, keep tied
weights tied and the module's dtypes; `--resume` reads its checkpoint once."""
import argparse
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import randomized_weights
from test_models import _write_official_checkpoint
from torch.overrides import TorchFunctionMode

from esm_gearnet import checkpoint, load_config
from esm_gearnet.assembly import build_predictor, build_task
from esm_gearnet.checkpoint import CheckpointError, load_state_dict_checked, skipping_init
from esm_gearnet.commands import finetune, pretrain
from esm_gearnet.commands.embed import load_encoder
from esm_gearnet.commands.inputs import load_run
from esm_gearnet.config import plain
from esm_gearnet.data import ProteinBatch
from esm_gearnet.models import ESM
from esm_gearnet.models.esm import build_esm2
from esm_gearnet.models.esm.hugging_face import read_weights, to_fair_esm
from esm_gearnet.models.esm.weights import load_esm_model

DEMO = Path(__file__).resolve().parents[1] / "config" / "demo" / "esm_gearnet.yaml"


class _Writes(TorchFunctionMode):
    """Counts, per parameter, the in-place operations that run on it (`uniform_`, `kaiming_uniform_`, `fill_`,
    `copy_`, `x[i] = v`, ...). Entered around a build, it sees the calls `skipping_init` lets through: those
    that really write."""

    def __init__(self):
        super().__init__()
        self.written = Counter()
        self.kept = []  # the parameters written, kept alive so that their ids stay theirs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        name = getattr(func, "__name__", "")
        in_place = name == "__setitem__" or (name.endswith("_") and not name.startswith("__")
                                             and name != "requires_grad_")
        if isinstance(target, torch.nn.Parameter) and in_place:
            self.written[id(target)] += 1
            self.kept.append(target)
        return func(*args, **kwargs)


def _build(build):
    """(build(), the ids of the parameters written while building, whether the global RNG state is unchanged)."""
    before = torch.random.get_rng_state()
    with _Writes() as writes:
        result = build()
    return result, set(writes.written), torch.equal(before, torch.random.get_rng_state())


def _assert_same_state(module, old):
    new, old = module.state_dict(), old.state_dict()
    assert new.keys() == old.keys()
    for key, value in old.items():
        assert new[key].dtype == value.dtype and torch.equal(new[key], value), key


def test_skipping_init_skips_only_parameter_fills():
    with skipping_init():
        linear = torch.nn.Linear(4, 3)
        norm = torch.nn.BatchNorm1d(3)
        buffer = torch.empty(3).fill_(7.0)  # not a parameter: filled
    assert torch.equal(norm.running_var, torch.ones(3)) and torch.equal(buffer, torch.full((3,), 7.0))
    state = {"weight": torch.randn(3, 4), "bias": torch.randn(3)}
    load_state_dict_checked(linear, state, "test", assign=True)
    assert linear.weight.data_ptr() == state["weight"].data_ptr()  # taken, not copied
    assert isinstance(linear.weight, torch.nn.Parameter) and linear.weight.requires_grad
    with pytest.raises(CheckpointError, match="missing keys: bias"):
        load_state_dict_checked(torch.nn.Linear(4, 3), {"weight": torch.randn(3, 4)}, "test", assign=True)


def test_random_weights_are_those_of_the_seed():
    """`pretrained: false` builds as before: the module's own initialisation, from the global RNG."""
    def random_esm():
        torch.manual_seed(11)
        return ESM(pretrained=False, architecture=(2, 32, 4))

    esm, written, untouched = _build(random_esm)
    assert written and not untouched
    torch.manual_seed(11)
    _assert_same_state(esm.model, build_esm2(2, 32, 4)[0])


def _official_file(folder: Path, dtype=torch.float32):
    """A fair-esm ESM-2 file of random weights (every parameter random, stored in `dtype`); the module it holds."""
    reference = randomized_weights(_write_official_checkpoint(folder, "esm2_t2_32_test"), seed=3)
    state = torch.load(folder / "esm2_t2_32_test.pt", weights_only=False)
    state["model"] = {("encoder." if k.startswith("lm_head") else "encoder.sentence_encoder.") + k: v.to(dtype)
                      for k, v in reference.state_dict().items() if not k.startswith("contact_head")}
    torch.save(state, folder / "esm2_t2_32_test.pt")
    return reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fair_esm_file_builds_without_initialising(tmp_path, all_proteins, dtype):
    reference = _official_file(tmp_path, dtype)
    esm, written, untouched = _build(lambda: ESM(path=str(tmp_path), model="esm2_t2_32_test").eval())
    assert not written and untouched, "building from the file initialised weights the file replaces"
    assert esm.model.lm_head.weight is esm.model.embed_tokens.weight  # tied, as fair-esm builds it
    assert all(p.dtype == torch.float32 for p in esm.parameters())
    # the old path: fair-esm's own loader, which builds the module (random weights), then copies the file in
    import esm as fair_esm

    old, _ = fair_esm.pretrained.load_model_and_alphabet_core(
        "esm2_t2_32_test", torch.load(tmp_path / "esm2_t2_32_test.pt", weights_only=False),
        torch.load(tmp_path / "esm2_t2_32_test-contact-regression.pt", weights_only=False))
    _assert_same_state(esm.model, old)
    batch = ProteinBatch.pack(all_proteins[:2])
    with torch.no_grad():
        tokens, window, column = esm.tokenize(batch)
        expected = reference.to(dtype).float().eval()(tokens, repr_layers=[2])["representations"][2][window, column]
        torch.testing.assert_close(esm(batch)["residue_feature"], expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(esm.model(tokens, repr_layers=[2])["representations"][2],  # the same module's forward
                           old.eval()(tokens, repr_layers=[2])["representations"][2])


def test_a_fair_esm_file_that_does_not_fit_is_one_sentence(tmp_path):
    _official_file(tmp_path)
    state = torch.load(tmp_path / "esm2_t2_32_test.pt", weights_only=False)
    del state["model"]["encoder.sentence_encoder.layers.1.fc2.bias"]
    torch.save(state, tmp_path / "esm2_t2_32_test.pt")
    with pytest.raises(CheckpointError, match=r"esm2_t2_32_test\.pt does not fit .*missing keys: layers\.1\.fc2\."
                                              r"bias; unexpected keys: none"):
        ESM(path=str(tmp_path), model="esm2_t2_32_test")


def test_esm1b_file_builds_without_initialising(tmp_path):
    """ESM-1b files go through fair-esm's own loader (strict, copying), its module built in `skipping_init`."""
    import esm as fair_esm

    args = argparse.Namespace(arch="roberta_large", encoder_layers=1, encoder_embed_dim=16,
                              encoder_ffn_embed_dim=64, encoder_attention_heads=2, max_positions=64)
    alphabet = fair_esm.Alphabet.from_architecture("roberta_large")
    model = randomized_weights(fair_esm.ProteinBertModel(argparse.Namespace(
        arch="roberta_large", layers=1, embed_dim=16, ffn_embed_dim=64, attention_heads=2, max_positions=64,
        emb_layer_norm_before=False), alphabet), seed=6)
    state = {("encoder." if k.startswith("lm_head") else "encoder.sentence_encoder.") + k: v
             for k, v in model.state_dict().items() if not k.startswith("contact_head")}
    torch.save({"model": state, "args": args}, tmp_path / "esm1b_t1_16_test.pt")
    (new, _), written, untouched = _build(lambda: load_esm_model(str(tmp_path), "esm1b_t1_16_test"))
    # every write is the loader's copy of the file (one per parameter), none an initialisation
    assert untouched and len(written) == len(list(new.parameters()))
    old, _ = fair_esm.pretrained.load_model_and_alphabet_core(
        "esm1b_t1_16_test", torch.load(tmp_path / "esm1b_t1_16_test.pt", weights_only=False),
        {"model": {"contact_head.regression.weight": torch.zeros(1, 2), "contact_head.regression.bias":
                   torch.zeros(1)}})
    _assert_same_state(new, old)


def _hugging_face_folder(folder: Path, form: str):
    """A Hugging Face ESM-2 folder (EsmModel's names, no heads) of a random fair-esm module, which is returned."""
    from safetensors.torch import save_file

    model, _ = build_esm2(2, 32, 4)
    randomized_weights(model, seed=4)
    hf = {"embeddings.word_embeddings.weight": model.embed_tokens.weight,
          "encoder.emb_layer_norm_after.weight": model.emb_layer_norm_after.weight,
          "encoder.emb_layer_norm_after.bias": model.emb_layer_norm_after.bias}
    names = {"self_attn.q_proj": "attention.self.query", "self_attn.k_proj": "attention.self.key",
             "self_attn.v_proj": "attention.self.value", "self_attn.out_proj": "attention.output.dense",
             "self_attn_layer_norm": "attention.LayerNorm", "fc1": "intermediate.dense", "fc2": "output.dense",
             "final_layer_norm": "LayerNorm"}
    for i in range(2):
        for fair, theirs in names.items():
            for p in ("weight", "bias"):
                hf[f"encoder.layer.{i}.{theirs}.{p}"] = model.state_dict()[f"layers.{i}.{fair}.{p}"]
    (folder / "config.json").write_text(json.dumps({
        "model_type": "esm", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "position_embedding_type": "rotary", "token_dropout": True, "vocab_size": 33,
        "pad_token_id": 1, "mask_token_id": 32, "layer_norm_eps": 1e-5, "emb_layer_norm_before": False,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    hf = {k: v.detach().clone().contiguous() for k, v in hf.items()}
    if form == "safetensors":
        save_file(hf, str(folder / "model.safetensors"))
    else:
        torch.save(hf, folder / "pytorch_model.bin")
    return model


@pytest.mark.parametrize("form", ["safetensors", "bin"])
def test_hugging_face_folder_builds_without_initialising(tmp_path, form):
    model = _hugging_face_folder(tmp_path, form)
    esm, written, untouched = _build(lambda: ESM(path=str(tmp_path)))
    assert not written and untouched
    assert esm.model.lm_head.weight is esm.model.embed_tokens.weight
    for key, value in model.state_dict().items():
        if not key.startswith(("lm_head", "contact_head")):  # the folder has no heads: zeros
            assert torch.equal(esm.model.state_dict()[key], value), key
    # the old path: the module built with random weights, eps set, then the folder's weights copied in
    old, _ = build_esm2(2, 32, 4)
    for module in old.modules():
        if "LayerNorm" in type(module).__name__ and hasattr(module, "eps"):
            module.eps = 1e-5
    old.load_state_dict(to_fair_esm(read_weights(str(tmp_path)), old, str(tmp_path)))
    _assert_same_state(esm.model, old)


def _demo(**changes):
    return load_config(str(DEMO), {"num_protein": 8, "batch_norm": True, "num_epoch": 1, "batch_size": 4,
                                   "output_dir": None, **changes})


def _trained(cfg):
    """A task of the demo config with every weight random and batch-norm statistics that are not the defaults."""
    task = randomized_weights(build_task(cfg, [0]), seed=5)
    for name, buffer in task.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            buffer.copy_(torch.rand(buffer.shape) + 0.5)
    return task


def test_a_run_checkpoint_builds_the_task_without_initialising_it(tmp_path, all_proteins):
    cfg = _demo()
    torch.manual_seed(0)
    trained = _trained(cfg)
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    rebuilt, written, untouched = _build(lambda: build_task(cfg, [0], state, "run/last.pth"))
    assert not written and untouched
    old = build_task(cfg, [0])  # the old path: build (random weights), then copy the state in
    old.load_state_dict(state)
    _assert_same_state(rebuilt, old)
    assert [p.requires_grad for p in rebuilt.parameters()] == [p.requires_grad for p in old.parameters()]
    batch = {"graph": ProteinBatch.pack(all_proteins[:3])}
    with torch.no_grad():
        assert torch.equal(rebuilt.eval().predict(batch), old.eval().predict(batch))
    with pytest.raises(CheckpointError, match="run/last.pth does not fit"):
        build_task(cfg, [0], {k: v for k, v in state.items() if "mlp" not in k}, "run/last.pth")


def test_ckpt_builds_the_encoder_without_initialising_it_and_the_head_as_before(tmp_path, all_proteins):
    cfg = _demo()
    encoder_state = {k[len("encoder."):]: v.clone() for k, v in _trained(cfg).state_dict().items()
                     if k.startswith("encoder.")}
    task, written, _ = _build(lambda: build_task(cfg, [0], encoder_state=encoder_state, source="a.pth"))
    head = {id(p): name for name, p in task.named_parameters() if not name.startswith("encoder.")}
    assert head and written == set(head), "only the head is initialised, each of its parameters"
    # the old path: the task built with random weights, then the encoder's weights copied in
    old = build_task(cfg, [0])
    load_state_dict_checked(old.encoder, encoder_state, "a.pth")
    _assert_same_state(task.encoder, old.encoder)
    batch = ProteinBatch.pack(all_proteins[:3])
    with torch.no_grad():
        new_features, old_features = task.encoder.eval()(batch), old.encoder.eval()(batch)
    for key in ("residue_feature", "graph_feature"):
        assert torch.equal(new_features[key], old_features[key]), key
    with pytest.raises(CheckpointError, match=r"a\.pth does not fit .*missing keys: structure_model\."):
        build_task(cfg, [0], encoder_state={k: v for k, v in encoder_state.items() if "structure_model" not in k},
                   source="a.pth")


def test_ckpt_of_a_run_in_build_downstream(tmp_path):
    cfg = _demo()
    trained = _trained(cfg)
    checkpoint.save_atomic(checkpoint.pack(trained, plain(cfg), ["t"]), tmp_path / "best.pth")
    engine, written, _ = _build(lambda: finetune.build_downstream(cfg, None, seed=0, ckpt=str(tmp_path),
                                                                  progress=False))
    _assert_same_state(engine.task.encoder, trained.encoder)
    assert written == {id(p) for name, p in engine.task.named_parameters() if not name.startswith("encoder.")}


def test_embed_and_predict_build_from_a_run_without_initialising(tmp_path, all_proteins):
    cfg = _demo()
    trained = _trained(cfg)
    checkpoint.save_atomic(checkpoint.pack(trained, plain(cfg), ["t"]), tmp_path / "best.pth")
    run_cfg, state = load_run(ckpt=str(tmp_path))
    encoder, written, untouched = _build(lambda: load_encoder(run_cfg, state, str(tmp_path)))
    assert not written and untouched
    _assert_same_state(encoder, trained.encoder)
    task, written, untouched = _build(lambda: build_predictor(run_cfg, state["task_names"],
                                                              checkpoint.task_state(state), str(tmp_path)))
    assert not written and untouched
    _assert_same_state(task, trained)


def test_resume_reads_its_checkpoint_once_and_not_ckpt(tmp_path, monkeypatch):
    cfg = _demo()
    torch.manual_seed(0)
    engine = finetune.build_downstream(cfg, tmp_path, seed=0, progress=False)
    randomized_weights(engine.task, seed=8)
    engine.record({"epoch": 1, "step": 5, "train": {"loss": 0.5}})
    engine.save("last.pth", position={"where": 3})
    reads = []
    real_load = checkpoint.load
    monkeypatch.setattr(checkpoint, "load", lambda path, *a, **k: reads.append(Path(path).name) or
                        real_load(path, *a, **k))
    resumed, written, untouched = _build(lambda: finetune.build_downstream(
        cfg, tmp_path, seed=0, ckpt=str(tmp_path / "absent.pth"), progress=False,
        resume_from=tmp_path / "last.pth"))
    assert reads == ["last.pth"], "the checkpoint is read once; --ckpt is not read when resuming"
    assert not written
    _assert_same_state(resumed.task, engine.task)
    assert resumed.epoch == engine.epoch and resumed.step == engine.step and resumed.history == engine.history


def test_pretrain_ckpt_builds_the_encoder_from_its_weights(tmp_path, monkeypatch):
    config = Path(__file__).resolve().parents[1] / "config" / "demo" / "pretrain_mc_esm_gearnet.yaml"
    cfg = load_config(str(config), {"num_protein": 8})
    trained = build_task(cfg)
    randomized_weights(trained, seed=9)
    checkpoint.save_atomic(checkpoint.pack(trained, plain(cfg)), tmp_path / "model_epoch_1.pth")
    built = []
    real_build_task = pretrain.build_task

    def spy(*args, **kwargs):
        built.append((kwargs, real_build_task(*args, **kwargs)))
        return built[-1][1]

    monkeypatch.setattr(pretrain, "build_task", spy)
    pretrain.run_pretrain(["-c", str(config), "--num_protein", "8", "--output_dir", str(tmp_path / "out"),
                           "--ckpt", str(tmp_path / "model_epoch_1.pth"), "--train.num_epoch", "0"])
    ((kwargs, task),) = built
    assert kwargs["source"] == str(tmp_path / "model_epoch_1.pth") and kwargs["encoder_state"] is not None
    _assert_same_state(task.encoder, trained.encoder)
