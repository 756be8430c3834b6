"""ESM C (`ESM(model: ESM-C-*)`, esm_gearnet/models/esm/esmc.py) against `transformers.EsmcModel` itself: random
models of two sizes saved with `save_pretrained`, our features equal to its last hidden states on the padded and the
unpadded paths, with padding, masked and unknown residues and proteins longer than the context (windows); a state
dict in EvolutionaryScale's own layout loads to the same features; every fusion mode with every structure encoder
trains; LoRA on the fused projection; a checkpoint of the other family is refused."""
import copy
import warnings
from pathlib import Path

import pytest
import torch

try:
    from transformers import EsmcConfig, EsmcModel, EsmcTokenizer
    from transformers.models.esmc.tokenization_esmc import SEQUENCE_VOCAB
except ImportError:  # an optional (test) dependency, EsmcModel since transformers 5.16: loading never needs it
    pytest.skip("transformers>=5.16 is not installed (pip install -e '.[test]'); these tests compare with "
                "transformers.EsmcModel", allow_module_level=True)

from conftest import run_dir_of, small
from esm_gearnet.assembly import build_task, model_config, runtime_task_list
from esm_gearnet.checkpoint import CheckpointError, load_state_dict_checked
from esm_gearnet.config import load_config
from esm_gearnet.data import ProteinBatch, collate
from esm_gearnet.models import ESM
from esm_gearnet.models.esm import WeightError
from esm_gearnet.registry import build

ROOT = Path(__file__).resolve().parents[1]
# (layers, width, heads, feed-forward width): heads of 16 and of 64 (EvolutionaryScale's, whose files do not say)
SIZES = [(2, 64, 4, 96), (3, 128, 2, 512)]
CONTEXT = 48  # tokens of a window in these tests: proteins of more than 46 residues are cut into windows


@pytest.fixture(scope="module", params=SIZES, ids=lambda s: "x".join(map(str, s[:3])))
def reference(request, tmp_path_factory):
    """A random transformers EsmcModel (layer norms away from 1 and 0) and its save_pretrained folder."""
    layers, dim, heads, hidden = request.param
    torch.manual_seed(layers)
    model = EsmcModel(EsmcConfig(hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                                 intermediate_size=hidden)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.2 * torch.randn_like(parameter))
    folder = tmp_path_factory.mktemp("esmc")
    model.save_pretrained(folder)
    EsmcTokenizer().save_pretrained(folder)  # its tokenizer.json: the vocabulary is checked against ESM C's
    return model, folder


def _proteins(all_proteins):
    """Three real proteins, one with an unknown residue (ESM C reads `X`)."""
    proteins = [p for p in all_proteins if 30 < len(p) < 160][:3]
    types = proteins[1].residue_type.clone()
    types[5] = 20
    proteins[1] = proteins[1].replace(residue_type=types)
    return proteins


def _transformers_hidden(model, proteins, masked):
    """transformers' last hidden states of every window of CONTEXT - 2 residues of each protein, the residues in
    `masked` (protein, position) given <mask>, all windows in one padded batch; per protein [L, D]."""
    index = {token: i for i, token in enumerate(SEQUENCE_VOCAB)}
    size = CONTEXT - 2
    rows, owners = [], []
    for i, protein in enumerate(proteins):
        ids = [index[c] for c in protein.sequence]
        for j, position in masked:
            if j == i:
                ids[position] = index["<mask>"]
        for start in range(0, len(ids), size):
            rows.append([index["<cls>"], *ids[start:start + size], index["<eos>"]])
            owners.append(i)
    width = max(map(len, rows))
    tokens = torch.tensor([row + [index["<pad>"]] * (width - len(row)) for row in rows])
    with torch.no_grad():
        out = model(input_ids=tokens, attention_mask=tokens.ne(index["<pad>"]).long()).last_hidden_state
    return [torch.cat([out[r, 1:len(rows[r]) - 1] for r in range(len(rows)) if owners[r] == i])
            for i in range(len(proteins))]


def _features(esm, proteins, masked):
    batch = ProteinBatch.pack(proteins)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), batch.num_residues.cumsum(0)])
    residue_mask = torch.zeros(batch.num_residue, dtype=torch.bool)
    for i, position in masked:
        residue_mask[offsets[i] + position] = True
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*windows of")
        return esm.eval()(batch, residue_mask=residue_mask)["residue_feature"].split(batch.num_residues.tolist())


@pytest.mark.parametrize("attention", ["sdpa", "varlen"])
def test_features_equal_transformers_last_hidden_states(reference, all_proteins, attention):
    model, folder = reference
    proteins = _proteins(all_proteins)
    assert "X" in proteins[1].sequence and max(map(len, proteins)) > CONTEXT
    masked = [(0, 3), (2, 10)]
    expected = _transformers_hidden(model, proteins, masked)
    ours = ESM(path=str(folder), attention=attention, context=CONTEXT)  # config.json decides the architecture
    assert ours.family == "ESM C" and ours.output_dim == model.config.hidden_size
    for feature, hidden in zip(_features(ours, proteins, masked), expected):
        torch.testing.assert_close(feature, hidden, atol=1e-5, rtol=0)


def _evolutionaryscale_layout(state):
    """An EsmcModel state dict renamed, written out name by name, into EvolutionaryScale's `esm.models.esmc.ESMC`
    layout (their esm/layers/{attention,blocks}.py): fused qkv and gate/up projections, `transformer.blocks`."""
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    dim = state["embed_tokens.weight"].shape[1]
    out = {"embed.weight": state["embed_tokens.weight"], "transformer.norm.weight": state["norm.weight"]}
    for i in range(layers):
        theirs, ours = f"layers.{i}.", f"transformer.blocks.{i}."
        out[ours + "attn.layernorm_qkv.0.weight"] = state[theirs + "input_layernorm.weight"]
        out[ours + "attn.layernorm_qkv.0.bias"] = state[theirs + "input_layernorm.bias"]
        out[ours + "attn.layernorm_qkv.1.weight"] = torch.cat([state[theirs + f"self_attn.{p}_proj.weight"]
                                                               for p in "qkv"])
        out[ours + "attn.q_ln.weight"] = state[theirs + "self_attn.q_norm.weight"]
        out[ours + "attn.k_ln.weight"] = state[theirs + "self_attn.k_norm.weight"]
        out[ours + "attn.out_proj.weight"] = state[theirs + "self_attn.o_proj.weight"]
        out[ours + "ffn.0.weight"] = state[theirs + "post_attention_layernorm.weight"]
        out[ours + "ffn.0.bias"] = state[theirs + "post_attention_layernorm.bias"]
        out[ours + "ffn.1.weight"] = torch.cat([state[theirs + "mlp.gate_proj.weight"],
                                                state[theirs + "mlp.up_proj.weight"]])
        out[ours + "ffn.3.weight"] = state[theirs + "mlp.down_proj.weight"]
    head = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.GELU(), torch.nn.LayerNorm(dim),
                               torch.nn.Linear(dim, 64))
    out.update({f"sequence_head.{k}": v for k, v in head.state_dict().items()})
    return out


# EvolutionaryScale's files do not say their number of heads: theirs are all of width 64, as in the second size
@pytest.mark.parametrize("reference", SIZES[1:], indirect=True, ids=lambda s: "x".join(map(str, s[:3])))
def test_evolutionaryscale_layout_loads_to_the_same_features(reference, all_proteins, tmp_path):
    model, folder = reference
    assert model.config.head_dim == 64
    (tmp_path / "data" / "weights").mkdir(parents=True)  # as their Hugging Face repositories hold the file
    torch.save(_evolutionaryscale_layout(model.state_dict()), tmp_path / "data" / "weights" / "esmc_tiny.pth")
    proteins = _proteins(all_proteins)
    theirs = ESM(path=str(tmp_path), model="esmc_tiny", context=CONTEXT)
    ours = ESM(path=str(folder), context=CONTEXT)
    for a, b in zip(_features(theirs, proteins, [(0, 3)]), _features(ours, proteins, [(0, 3)])):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_a_folder_of_another_vocabulary_is_one_sentence(reference, tmp_path):
    import json
    import shutil

    _, folder = reference
    shutil.copytree(folder, tmp_path / "other")
    tokenizer = json.loads((tmp_path / "other" / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["|"], tokenizer["model"]["vocab"]["<mask>"] = 32, 31
    (tmp_path / "other" / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(WeightError, match=r"has another vocabulary than ESM C's: '\|' is id 32 \(ESM C: 31\); "
                                          r"'<mask>' is id 31 \(ESM C: 32\)"):
        ESM(path=str(tmp_path / "other"))


def test_vocabulary_and_family_must_agree_in_one_sentence():
    with pytest.raises(ValueError, match=r"`vocabulary: ESM C` is ESM C's own; name an ESM C model"):
        ESM(pretrained=False, architecture=(1, 32, 4), vocabulary="ESM C")
    with pytest.raises(WeightError, match=r"`vocabulary: ESM-2` was asked for, but the random ESM C model has another"):
        ESM(model="ESM-C-300M", pretrained=False, architecture=(1, 32, 4), vocabulary="ESM-2")
    with pytest.raises(ValueError, match="`attention: esm` is fair-esm's own forward, which ESM C does not have"):
        ESM(model="ESM-C-300M", pretrained=False, architecture=(1, 32, 4), attention="esm")


def test_names_and_files_that_are_not_there_say_where_to_download(tmp_path):
    with pytest.raises(WeightError, match=r"esmc_600m_2024_12_v0\.pth not found in .*; download https://huggingface"
                                          r"\.co/EvolutionaryScale/esmc-600m-2024-12/resolve/main/data/weights/"):
        ESM(path=str(tmp_path), model="ESM-C-600M")
    (tmp_path / "esmc_300m_2024_12_v0.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightError, match="not a readable ESM C weight file"):
        ESM(path=str(tmp_path), model="ESM-C-300M")


def test_a_checkpoint_of_the_other_family_is_refused_naming_both():
    esmc = ESM(model="ESM-C-300M", pretrained=False, architecture=(1, 32, 4))
    esm2 = ESM(model="ESM-2-8M", pretrained=False, architecture=(1, 32, 4))
    with pytest.raises(CheckpointError, match=r"esm2\.pth holds an ESM-2 \(1 layers, width 32\) language model at "
                                              r"model, but the config builds an ESM C \(1 layers, width 32\)"):
        load_state_dict_checked(esmc, esm2.state_dict(), "esm2.pth")
    with pytest.raises(CheckpointError, match=r"holds an ESM C .* but the config builds an ESM-2"):
        load_state_dict_checked(esm2, esmc.state_dict(), "esmc.pth")


# every fusion mode with every structure encoder: the EC configs with a small random ESM C (CDConv has no cross
# fusion config: its series config is set to cross); ESM-IF1's are in tests/test_esm_if1.py
FUSED = ["esm_gearnet", "esm_gearnet_parallel", "esm_gearnet_cross", "esm_gvp", "esm_gvp_parallel", "esm_gvp_cross",
         "esm_cdconv", "esm_cdconv_parallel", "esm_cdconv:cross"]


@pytest.mark.parametrize("name", FUSED)
def test_every_fusion_mode_and_structure_encoder_trains_with_esmc(name):
    name, _, fusion = name.partition(":")
    cfg = load_config(str(ROOT / "config" / "EC" / f"{name}.yaml"))
    cfg.dataset = {"class": "DemoFolds", "num_protein": 4, "transform": cfg.dataset.get("transform")}
    model, _ = model_config(cfg)
    model.sequence_model = {"class": "ESM", "model": "ESM-C-300M"}
    if fusion:
        model.update({"fusion": fusion, "cross_dim": 16})
    small(model)
    torch.manual_seed(0)
    dataset = build(cfg.dataset, "dataset")
    task = build_task(cfg, runtime_task_list(cfg, dataset.tasks)).train()
    assert task.encoder.sequence_model.family == "ESM C"
    loss, _ = task(collate([dataset[i] for i in range(4)]))
    loss.backward()
    assert torch.isfinite(loss)
    gradients = [p.grad for p in task.encoder.sequence_model.model.transformer.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in gradients)
    assert any(g.abs().sum() > 0 for g in gradients)


@pytest.mark.parametrize("name", ["attr_esm_gearnet", "contrast_esm_gearnet"])
def test_pretraining_objectives_train_with_esmc(name):
    """Residue-type masking (ESM C's `<mask>`) and the sequence-structure contrast, with a small random ESM C."""
    cfg = load_config(str(ROOT / "config" / "pretrain" / f"{name}.yaml"))
    cfg.dataset = {"class": "DemoFolds", "num_protein": 4, "transform": cfg.dataset.get("transform")}
    model, _ = model_config(cfg)
    model.sequence_model = {"class": "ESM", "model": "ESM-C-300M"}
    small(model)
    torch.manual_seed(0)
    dataset = build(cfg.dataset, "dataset")
    task = build_task(cfg).train()
    loss, _ = task(collate([dataset[i] for i in range(4)]))
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.parameters())


def test_a_frozen_esmc_caches_its_features(all_proteins):
    torch.manual_seed(0)
    esm = ESM(model="ESM-C-300M", pretrained=False, architecture=(2, 64, 4), feature_cache_gib=0.1)
    esm.freeze("sequence_model")
    uncached = ESM(model="ESM-C-300M", pretrained=False, architecture=(2, 64, 4))
    uncached.load_state_dict(esm.state_dict())
    batch = ProteinBatch.pack(_proteins(all_proteins))
    first = esm.eval()(batch)["residue_feature"]
    assert len(esm.feature_cache) == batch.batch_size
    again = esm(batch)["residue_feature"]  # from the cache
    assert torch.equal(again, first)
    torch.testing.assert_close(first, uncached.eval()(batch)["residue_feature"], atol=1e-5, rtol=0)


def test_lora_adapts_the_fused_projection_and_merges(all_proteins):
    from esm_gearnet.models.esm import merge_lora

    torch.manual_seed(0)
    esm = ESM(model="ESM-C-300M", pretrained=False, architecture=(2, 64, 4), lora={"rank": 4})
    assert esm.lora.targets == ["layernorm_qkv.1", "out_proj"]
    trainable = {name for name, p in esm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name for name in trainable)
    assert any("attn.layernorm_qkv.1.lora_B" in name for name in trainable)
    proteins = _proteins(all_proteins)[:2]
    base = _features(esm, proteins, [])
    with torch.no_grad():
        for name, parameter in esm.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    adapted = _features(esm, proteins, [])
    assert (adapted[0] - base[0]).abs().max() > 1e-3
    merged = copy.deepcopy(esm)
    assert merge_lora(merged) == 4  # two projections in each of two blocks
    for a, b in zip(_features(merged, proteins, []), adapted):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_demo_trains_resumes_embeds_and_predicts(cli, tmp_path, structures_dir):
    import json

    import numpy as np

    demo = "config/demo/esmc_gearnet.yaml"
    code, _, err = cli("downstream", "-c", demo, "--output_dir", tmp_path / "runs", "--num_protein", "24",
                       "--task.model.structure_model.hidden_dims", "[16]", "--train.num_epoch", "1")
    assert code == 0, err
    run_dir = run_dir_of(tmp_path / "runs")
    code, _, err = cli("downstream", "--resume", run_dir, "--train.num_epoch", "2")
    assert code == 0, err
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "epoch" in r] == [1, 2]
    files = sorted(structures_dir.glob("*.pdb"))[:2]
    code, _, err = cli("embed", "--ckpt", run_dir, *files, "-o", tmp_path / "e.npz", "--quiet")
    assert code == 0, err
    embedding = np.load(tmp_path / "e.npz")["embedding"]
    assert embedding.shape == (2, 64 + 16) and np.isfinite(embedding).all()
    code, _, err = cli("embed", "--ckpt", run_dir, *files, "-o", tmp_path / "v.npz", "--quiet",
                       "--task.model.sequence_model.attention", "varlen")
    assert code == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "v.npz")["embedding"], embedding, atol=1e-4, rtol=1e-4)
    code, _, err = cli("predict", "--ckpt", run_dir, *files, "-o", tmp_path / "p.csv", "--quiet")
    assert code == 0, err
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 3
    # the ESM-2 demo's config cannot read this run's weights: one sentence naming both families
    code, _, err = cli("embed", "--ckpt", run_dir, *files, "-o", tmp_path / "x.npz", "-c",
                       "config/demo/esm_gearnet.yaml")
    assert code == 2 and "holds an ESM C (2 layers, width 64) language model" in err and "builds an ESM-2" in err


def test_plan_refuses_esmc_in_one_sentence(cli):
    code, _, err = cli("plan", "-c", "EC/esmc_gearnet.yaml", "--gpus", "4", "--gpu-memory", "24")
    assert code == 2 and "plan covers ESM-2 models" in err and "not ESM C yet" in err
