"""LoRA on the language model (esm_gearnet/models/esm/lora.py, through peft): on fair-esm's ESM-2 architecture with
random weights written here as fair-esm files, only the adapters (and what lies outside the language model) train,
at their own learning-rate ratio; the model starts as its base and its base never changes; checkpoints hold no base
tensor, reload to the same outputs and refuse other base weights in one sentence; merged adapters give the features
of unmerged ones; bad `lora:` values are one sentence naming the key."""
import copy
import hashlib
import json
import logging

import pytest
import torch
from easydict import EasyDict

pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[test]'); LoRA is built on it")

from esm_gearnet import checkpoint  # noqa: E402
from esm_gearnet.assembly import build_encoder, build_task, check_task, optimizer_groups  # noqa: E402
from esm_gearnet.checkpoint import CheckpointError  # noqa: E402
from esm_gearnet.commands.encoding import load_encoder  # noqa: E402
from esm_gearnet.config import ConfigError  # noqa: E402
from esm_gearnet.data import ProteinBatch  # noqa: E402
from esm_gearnet.data.synthetic import backbone_protein  # noqa: E402
from esm_gearnet.models.esm import merge_lora  # noqa: E402
from test_models import _write_official_checkpoint  # noqa: E402

GRAPH = {"class": "GraphConstruction", "node_layers": [{"class": "AlphaCarbonNode"}],
         "edge_layers": [{"class": "SequentialEdge", "max_distance": 2},
                         {"class": "SpatialEdge", "radius": 10.0, "min_distance": 5},
                         {"class": "KNNEdge", "k": 10, "min_distance": 5}]}
GEARNET = {"class": "GearNet", "hidden_dims": [16, 16], "batch_norm": True, "concat_hidden": True}
TINY = "esm2_t2_32_test"  # 2 layers, width 32, 4 heads
ESM8M = "esm2_t6_8M_UR50D"  # ESM-2-8M's architecture (6 layers, width 320, 20 heads): a 30 MB file
PROTEINS = [backbone_protein("MKVLIVGAGPSGLAEALRLA", "LEEEELLLLHHHHHHHHHHL"),
            backbone_protein("GKTWTVEVNGKKYTVEVSG", "LEEEEEELLLLEEEEEELL"),
            backbone_protein("MSTNPKPQRKTKRNTNRRPQ", "LLLLHHHHHHHHHHHHLLLL")]
TARGETS = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0]])


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A folder of fair-esm weight files of random ESM-2s: the tiny one and ESM-2-8M's architecture."""
    folder = tmp_path_factory.mktemp("esm")
    torch.manual_seed(1)
    _write_official_checkpoint(folder, TINY)
    _write_official_checkpoint(folder, ESM8M, layers=6, dim=320, heads=20)
    return folder


def _esm(folder, stem=TINY, **options):
    return {"class": "ESM", "path": str(folder), "model": stem, **options}


def _config(model, **top):
    return EasyDict({"task": {"class": "MultipleBinaryClassification", "model": copy.deepcopy(model),
                              "graph_construction_model": GRAPH, "num_mlp_layer": 2},
                     "optimizer": {"class": "Adam", "lr": 1e-3}, **top})


def _fusion(sequence_model, fusion="series"):
    return {"class": "FusionNetwork", "sequence_model": sequence_model, "structure_model": GEARNET, "fusion": fusion,
            "cross_dim": 16}


def _batch():
    return ProteinBatch.pack(PROTEINS)


def _lm(encoder):
    """The ESM of an encoder (alone or fused)."""
    return getattr(encoder, "sequence_model", encoder)


def _base_state(esm):
    """The base weights of an ESM's language model (adapters left out; peft's `base_layer.` names unwrapped)."""
    return {k.replace("base_layer.", ""): v.detach().clone() for k, v in esm.model.named_parameters()
            if ".lora_" not in k}


def _train(task, cfg, steps=3):
    optimizer = torch.optim.Adam(optimizer_groups(cfg, task, 1e-2), lr=1e-2)
    task.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss, _ = task({"graph": _batch(), "targets": TARGETS})
        loss.backward()
        optimizer.step()
    return task.eval()


def _features(encoder):
    with torch.no_grad():
        return encoder(encoder.construct(_batch()))


def test_only_adapters_and_the_rest_train_at_their_own_ratios(weights, caplog):
    cfg = _config(_fusion(_esm(weights, lora={"rank": 4})), sequence_model_lr_ratio=0.1, lora_lr_ratio=0.5)
    with caplog.at_level(logging.INFO, logger="esm_gearnet"):
        task = build_task(cfg, [0, 1, 2])
    esm = task.encoder.sequence_model
    groups = task.encoder.parameter_groups()
    assert list(groups) == ["sequence_model", "lora", "structure_model"]
    trainable_lm = {n for n, p in esm.named_parameters() if p.requires_grad}
    assert trainable_lm and all(".lora_A." in n or ".lora_B." in n for n in trainable_lm)
    assert {id(p) for p in groups["lora"]} == {id(p) for n, p in esm.named_parameters() if n in trainable_lm}
    assert all(p.requires_grad for p in groups["structure_model"])
    # the trainable count is reported: 2 layers x 4 projections x rank (32 in + 32 out)
    assert esm.lora.num_trainable == 2 * 4 * 4 * (32 + 32) == sum(p.numel() for p in groups["lora"])
    assert f"{esm.lora.num_trainable} adapter parameters train" in caplog.text
    lrs = {frozenset(id(p) for p in g["params"]): g["lr"] for g in optimizer_groups(cfg, task, 1e-3)}
    assert lrs.pop(frozenset(id(p) for p in groups["lora"])) == pytest.approx(5e-4)
    assert lrs.pop(frozenset(id(p) for p in groups["structure_model"])) == pytest.approx(1e-3)
    (head,) = lrs.values()  # the head, at lr; no group holds a base weight of the language model
    assert head == pytest.approx(1e-3)
    assert sum(len(g["params"]) for g in optimizer_groups(cfg, task, 1e-3)) == \
        sum(p.requires_grad for p in task.parameters())
    default = build_task(_config(_esm(weights, lora={"rank": 4})), [0, 1, 2])  # ESM alone; lora_lr_ratio 1
    assert {g["lr"] for g in optimizer_groups(_config({}), default, 1e-3)} == {1e-3}


CASES = [("series", "sdpa", False, "file"), ("parallel", "varlen", True, "file"), ("cross", "esm", False, "file"),
         ("series", "sdpa", True, "SaProt")]


@pytest.mark.parametrize("fusion, attention, checkpointing, base", CASES)
def test_starts_as_its_base_and_trains_only_the_adapters(weights, fusion, attention, checkpointing, base):
    options = {"attention": attention, "activation_checkpointing": checkpointing}
    if base == "SaProt":  # a SaProt-format model, random weights (seeded alike): the state keeps its base whole
        esm = {"class": "ESM", "pretrained": False, "vocabulary": "SaProt", "architecture": [2, 32, 4], **options}
    else:
        esm = _esm(weights, **options)
    torch.manual_seed(0)
    plain = build_encoder(_config(_fusion(esm, fusion))).eval()
    cfg = _config(_fusion({**esm, "lora": {"rank": 4, "dropout": 0.1, "targets": ["q_proj", "v_proj", "fc2"]}},
                          fusion))
    torch.manual_seed(0)
    task = build_task(cfg, [0, 1, 2])
    for name, part in plain.named_children():  # the same weights outside the language model
        if name != "sequence_model":
            part.load_state_dict(getattr(task.encoder, name).state_dict())
    before = _base_state(task.encoder.sequence_model)
    assert before.keys() == dict(plain.sequence_model.model.named_parameters()).keys()
    for key, value in before.items():
        assert torch.equal(value, dict(plain.sequence_model.model.named_parameters())[key]), key
    task.eval()
    for key, value in _features(plain).items():  # B = 0: the model is its base
        torch.testing.assert_close(_features(task.encoder)[key], value, atol=1e-6, rtol=1e-6)

    _train(task, cfg)
    esm_model = task.encoder.sequence_model
    assert all(torch.equal(before[k], v) for k, v in _base_state(esm_model).items())
    assert all(p.abs().sum() > 0 for n, p in esm_model.model.named_parameters() if ".lora_B." in n)
    with torch.no_grad():
        changed = esm_model(_batch())["residue_feature"]
        base = plain.sequence_model(_batch())["residue_feature"]
    assert not torch.allclose(changed, base, atol=1e-4)


def test_the_checkpoint_holds_the_adapters_and_a_reference_to_the_base(weights, tmp_path):
    cfg = _config(_fusion(_esm(weights, lora={"rank": 2, "targets": ["q_proj", "fc1"]})))
    task = _train(build_task(cfg, [0, 1, 2]), cfg, steps=2)
    file = tmp_path / "best.pth"
    checkpoint.save_atomic(checkpoint.pack(task, json.loads(json.dumps(cfg)), ["a", "b", "c"]), file)
    state = checkpoint.load(file)
    lm = [k for k in state["encoder"] if k.startswith("sequence_model.")]
    assert lm and all(".lora_A." in k or ".lora_B." in k for k in lm if k != "sequence_model.lora._extra_state")
    reference = state["encoder"]["sequence_model.lora._extra_state"]
    (base,) = reference["files"]
    assert reference["model"] == TINY and base["file"] == TINY + ".pt"
    assert base["size"] == (weights / f"{TINY}.pt").stat().st_size
    with open(weights / f"{TINY}.pt", "rb") as handle:  # a file under 2 MiB is hashed whole
        assert base["sha256_ends"] == hashlib.sha256(handle.read()).hexdigest()

    expected = _features(task.encoder)
    resumed = build_task(cfg, [0, 1, 2], checkpoint.task_state(state), str(file)).eval()  # --resume, predict
    from_ckpt = build_task(cfg, [0, 1, 2], encoder_state=checkpoint.encoder_state(state, str(file)))  # --ckpt
    embedded = load_encoder(cfg, state, str(file))  # embed: adapters merged at load
    assert embedded.sequence_model.model.layers[0].fc1.merged
    for encoder in (resumed.encoder, from_ckpt.encoder.eval(), embedded):
        for key, value in expected.items():
            torch.testing.assert_close(_features(encoder)[key], value, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        scores = resumed.predict({"graph": _batch()})
        torch.testing.assert_close(scores, task.predict({"graph": _batch()}), atol=1e-5, rtol=1e-5)

    full = checkpoint.pack(build_task(_config(_fusion(_esm(weights))), [0, 1, 2]), {})  # no lora: as before
    assert "sequence_model.model.layers.0.self_attn.q_proj.weight" in full["encoder"]
    assert not any("lora" in k for k in full["encoder"])


def test_adapters_on_other_base_weights_are_refused_in_one_sentence(weights, tmp_path):
    cfg = _config(_esm(weights, ESM8M, lora={"rank": 2}))
    state = checkpoint.pack(build_task(cfg, [0, 1, 2]), {})
    (base,) = state["encoder"]["lora._extra_state"]["files"]
    assert base["size"] == (weights / f"{ESM8M}.pt").stat().st_size > 2 * 2 ** 20  # only its ends are hashed
    assert sum(v.numel() * v.element_size() for v in state["encoder"].values() if torch.is_tensor(v)) < \
        0.02 * base["size"]  # the adapters only
    other = tmp_path / "other"
    other.mkdir()
    torch.manual_seed(2)  # the same architecture and file size, other weights
    _write_official_checkpoint(other, ESM8M, layers=6, dim=320, heads=20)
    with pytest.raises(CheckpointError, match=rf"trained on {ESM8M}, but the base weight file \S*other/{ESM8M}.pt "
                                              r"differs from the base of the adapters .* in its first or last MiB"):
        build_task(_config(_esm(other, ESM8M, lora={"rank": 2})), [0, 1, 2], checkpoint.task_state(state))
    grown = torch.load(weights / f"{ESM8M}.pt", weights_only=False)  # the same weights in a file of another size
    torch.save({**grown, "note": torch.zeros(100)}, other / f"{ESM8M}.pt")
    with pytest.raises(CheckpointError, match=r"other/esm2_t6_8M_UR50D.pt has \d+ bytes, the base of the adapters "
                                              r"\(esm2_t6_8M_UR50D.pt\) had \d+; point the sequence model's `path`"):
        build_task(_config(_esm(other, ESM8M, lora={"rank": 2})), [0, 1, 2], checkpoint.task_state(state))


def test_merged_adapters_give_the_features_of_unmerged_ones(weights):
    file = weights / f"{ESM8M}.pt"
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    encoder = build_encoder(_config(_esm(weights, ESM8M, lora={"rank": 4, "alpha": 8, "targets": targets}))).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in encoder.model.named_parameters():
            if ".lora_B." in name:  # as if trained: B != 0
                parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
    unmerged = _features(encoder)
    assert merge_lora(encoder) == 6 * len(targets)
    merged = _features(encoder)
    assert merge_lora(encoder) == 0  # already merged
    for key, value in unmerged.items():
        torch.testing.assert_close(merged[key], value, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmerged["residue_feature"],
                              _features(build_encoder(_config(_esm(weights, ESM8M))).eval())["residue_feature"])
    merge_lora(encoder, merge=False)
    torch.testing.assert_close(_features(encoder)["residue_feature"], unmerged["residue_feature"], atol=1e-5,
                               rtol=1e-5)
    assert hashlib.sha256(file.read_bytes()).hexdigest() == digest  # the memory-mapped file is never written


def test_the_feature_cache_is_unused_while_adapters_train(weights):
    esm = _esm(weights, lora={"rank": 2}, feature_cache_gib=1.0)
    training = build_encoder(_config(esm, fix_sequence_model=True))  # the base is frozen; the adapters are not
    assert not training.is_frozen
    training.train()(_batch())["graph_feature"].sum().backward()
    assert len(training.feature_cache) == 0
    assert all(p.grad is not None for p in training.parameter_groups()["lora"])
    frozen = build_encoder(_config(esm, lora_lr_ratio=0.0))  # adapters frozen too: nothing trains
    assert frozen.is_frozen
    frozen(_batch())
    assert len(frozen.feature_cache) == len(PROTEINS)
    fused = build_encoder(_config(_fusion(esm), lora_lr_ratio=0.0))
    assert fused.sequence_model.is_frozen and "lora" in fused.frozen
    assert not any(p.requires_grad for p in fused.sequence_model.parameters())


@pytest.mark.parametrize("lora, message", [
    ({"rank": 0}, r"`task.model.sequence_model.lora.rank` must be at least 1, got 0"),
    ({"rank": "8"}, r"`task.model.sequence_model.lora.rank` must be an integer, got '8'"),
    ({"rnak": 8}, r"`task.model.sequence_model.lora`: LoRASettings got unknown argument 'rnak' \(did you mean "
                  r"'rank'\?\)"),
    ({"dropout": 1.5}, r"`task.model.sequence_model.lora.dropout` must be in \[0, 1\)"),
    ({"targets": ["query", "fc1"]}, r"`task.model.sequence_model.lora.targets` names query, which ESM-2 models cannot "
                                    r"adapt; the projections of their layers that take adapters are q_proj, k_proj, "
                                    r"v_proj, out_proj, fc1, fc2\.$"),
    (4, r"`task.model.sequence_model.lora` must be a mapping or null, got 4"),
])
def test_bad_lora_values_are_one_sentence_naming_the_key(weights, lora, message):
    cfg = _config(_fusion(_esm(weights, lora=lora)))
    for attempt in (check_task, build_encoder):  # checked before anything is built, and when built
        with pytest.raises(ConfigError, match=message):
            attempt(cfg)


def test_esm1b_takes_adapters_on_its_feed_forward_only(tmp_path):
    (tmp_path / "esm1b_t33_650M_UR50S.pt").write_bytes(b"")  # checked by name before anything is read
    cfg = _config({"class": "ESM", "path": str(tmp_path), "model": "ESM-1b", "lora": {"rank": 2}})
    with pytest.raises(ConfigError, match=r"`task.model.lora.targets` is not given and ESM-1b has no default: "
                                          r"fair-esm's ESM-1b attention passes the q/k/v/out_proj weights to torch's "
                                          r"multi_head_attention_forward.*name some of fc1, fc2\.$"):
        check_task(cfg)
    cfg.task.model.lora["targets"] = ["q_proj"]
    with pytest.raises(ConfigError, match=r"`task.model.lora.targets` names q_proj, which ESM-1b models cannot adapt"):
        check_task(cfg)
    cfg.task.model.lora["targets"] = ["fc1", "fc2"]
    check_task(cfg)


def test_a_hugging_face_base_is_referred_to_by_its_weight_file(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers writes the Hugging Face folder")
    config = transformers.EsmConfig(vocab_size=33, pad_token_id=1, mask_token_id=32, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                    position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
                                    layer_norm_eps=1e-5, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
    transformers.EsmModel(config, add_pooling_layer=False).save_pretrained(tmp_path)
    cfg = _config({"class": "ESM", "path": str(tmp_path), "lora": {"rank": 2}})
    state = checkpoint.pack(build_task(cfg, [0, 1, 2]), {})
    reference = state["encoder"]["lora._extra_state"]
    assert reference["model"] == tmp_path.name and [f["file"] for f in reference["files"]] == ["model.safetensors"]
    assert not [k for k in state["encoder"] if k.startswith("model.") and ".lora_" not in k]
    reloaded = build_task(cfg, [0, 1, 2], checkpoint.task_state(state))
    assert reloaded.encoder.lora.reference == reference


def test_lora_lr_ratio_needs_adapters(weights):
    with pytest.raises(ConfigError, match=r"`lora_lr_ratio` sets the learning-rate ratio of LoRA adapters, but the "
                                          r"task's sequence model has none"):
        build_task(_config(_fusion(_esm(weights)), lora_lr_ratio=0.5), [0, 1, 2])
