"""Hugging Face ESM checkpoints (`ESM(path=DIR)`, esm_gearnet/models/esm/hugging_face.py) against `transformers` itself:
random-weight `EsmModel` / `EsmForMaskedLM` saved with `save_pretrained`, our features equal to its last hidden
states on both attention paths; the sentences for folders that are not ESM-2; our checkpoints of such a model."""
import argparse
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from easydict import EasyDict
from packaging.version import Version

try:
    import transformers
    from transformers import EsmConfig, EsmForMaskedLM, EsmModel
except ImportError:  # an optional (test) dependency: loading a folder never needs it
    pytest.skip("transformers is not installed (pip install -e '.[test]'); these tests compare with "
                "transformers.EsmModel", allow_module_level=True)

from conftest import randomized_weights
from esm_gearnet import checkpoint
from esm_gearnet.assembly import build_task
from esm_gearnet.data import ProteinBatch
from esm_gearnet.models import ESM
from esm_gearnet.models.esm import WeightError, build_esm2
from test_models import _write_official_checkpoint

transformers.logging.set_verbosity_error()
# transformers before 5.3 gave EsmModel's embeddings no attention mask, so token dropout's rescaling counted the
# padding of a padded row as residues (huggingface/transformers#44162); fair-esm and this framework count residues
PADDED_TOKEN_DROPOUT_FIXED = Version(transformers.__version__) >= Version("5.3")
# (layers, width, heads, layer_norm_eps): head widths 8 and 16; ESM-2's eps and transformers' default one
ARCHITECTURES = [(2, 32, 4, 1e-5), (3, 48, 3, 1e-12)]


def _hf_config(layers, dim, heads, eps, **changes):
    values = dict(vocab_size=33, pad_token_id=1, mask_token_id=32, hidden_size=dim, num_hidden_layers=layers,
                  num_attention_heads=heads, intermediate_size=4 * dim, position_embedding_type="rotary",
                  token_dropout=True, emb_layer_norm_before=False, layer_norm_eps=eps, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    return EsmConfig(**{**values, **changes})


def _save(model, folder: Path, form: str) -> Path:
    """`save_pretrained` in one of the forms found in the wild:
    safetensors: transformers' default (transformers 5 spells LayerNorm.gamma/.beta and the rotary inv_freq of
        `encoder.layer.*`);
    safetensors-new: transformers 5's own names (`save_original_format=False`: LayerNorm.weight, one inv_freq);
    bin: `safe_serialization=False`, the pytorch_model.bin of transformers 4 and the hub's facebook/esm2_t*
        (LayerNorm.weight, inv_freq per layer, the tied lm_head.decoder.weight). transformers 5 ignores
        `safe_serialization=False`, so there the same file is written from the state_dict as transformers 4 did.
    """
    if form == "safetensors-new":
        model.save_pretrained(folder, save_original_format=False)
    else:
        model.save_pretrained(folder, safe_serialization=form == "safetensors")
    if form == "bin" and not (folder / "pytorch_model.bin").exists():
        (folder / "model.safetensors").unlink()
        state = dict(model.state_dict())
        for key in [k for k in state if k.endswith("rotary_embeddings.inv_freq") and ".layer." not in k]:
            inv_freq = state.pop(key)
            base = key[:-len("rotary_embeddings.inv_freq")]
            for i in range(model.config.num_hidden_layers):
                state[f"{base}encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq"] = inv_freq
        torch.save(state, folder / "pytorch_model.bin")
    assert (folder / ("pytorch_model.bin" if form == "bin" else "model.safetensors")).exists()
    return folder


def _proteins(all_proteins, long=True):
    """Proteins of different lengths (padding) without unknown residues; the last longer than 1022 if `long`."""
    known = [p for p in all_proteins if bool((p.residue_type < 20).all())]
    proteins = [known[0].subresidue(torch.arange(min(len(known[0]), 120))), known[1]]
    if long:
        longest = max(known, key=len)
        proteins.append(longest.subresidue(torch.arange(len(longest)).repeat(3)[:1100]))
    return proteins


def _hf_hidden(model, proteins, masked):
    """transformers' last hidden states of each protein's first 1022 residues, the residues in `masked`
    (protein, position) replaced by <mask>; proteins up to 1022 residues in one padded batch (cls ... eos pad),
    longer ones alone (their first 1022 residues)."""
    vocabulary = ["<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>"]
    index = {token: i for i, token in enumerate(vocabulary)}
    rows = []
    for i, protein in enumerate(proteins):
        ids = [index[c] for c in protein.sequence[:1022]]
        for j, position in masked:
            if j == i:
                ids[position] = index["<mask>"]
        rows.append([index["<cls>"], *ids, index["<eos>"]])
    base = model.esm if isinstance(model, EsmForMaskedLM) else model
    hidden = [None] * len(rows)
    for group in ([i for i, p in enumerate(proteins) if len(p) <= 1022], [i for i, p in enumerate(proteins)
                                                                          if len(p) > 1022]):
        if not group:
            continue
        width = max(len(rows[i]) for i in group)
        tokens = torch.tensor([rows[i] + [index["<pad>"]] * (width - len(rows[i])) for i in group])
        with torch.no_grad():
            out = base(input_ids=tokens, attention_mask=tokens.ne(index["<pad>"]).long()).last_hidden_state
        for row, i in enumerate(group):
            hidden[i] = out[row, 1:len(rows[i]) - 1]
    return hidden


def _compare(reference, folder, proteins, masked):
    """ESM(path=folder) on the packed batch, both attention paths, against transformers; the max difference."""
    batch = ProteinBatch.pack(proteins)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), batch.num_residues.cumsum(0)])
    residue_mask = torch.zeros(batch.num_residue, dtype=torch.bool)
    for i, position in masked:
        residue_mask[offsets[i] + position] = True
    expected = _hf_hidden(reference, proteins, masked)
    worst = 0.0
    for attention in ("sdpa", "esm"):
        ours = ESM(path=str(folder), attention=attention).eval()  # no `model:`: config.json decides
        assert ours.model.token_dropout
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*windows of 1022")
            features = ours(batch, residue_mask=residue_mask)["residue_feature"].split(batch.num_residues.tolist())
        for feature, hidden in zip(features, expected):
            torch.testing.assert_close(feature[:len(hidden)], hidden, atol=1e-5, rtol=0)
            worst = max(worst, float((feature[:len(hidden)] - hidden).abs().max()))
    return worst


@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=["2x32", "3x48"])
def test_features_equal_transformers_last_hidden_states(tmp_path, all_proteins, architecture):
    """A padded batch (120, 57 and 1100 residues) with token dropout on: one <mask> in the first protein, one in
    the long protein's first window, none in the second; the long one compared on its first 1022 residues."""
    if not PADDED_TOKEN_DROPOUT_FIXED:
        pytest.skip(f"transformers {transformers.__version__} rescales token dropout over padded lengths "
                    "(huggingface/transformers#44162, fixed in 5.3); install transformers>=5.3")
    reference = randomized_weights(EsmModel(_hf_config(*architecture)), seed=architecture[0])
    folder = _save(reference, tmp_path / "hf", "safetensors")
    assert ESM(path=str(folder)).output_dim == architecture[1]
    _compare(reference, folder, _proteins(all_proteins), masked=[(0, 5), (2, 700)])


def test_esm2_8m_shape_equals_transformers(tmp_path, all_proteins):
    """The real ESM-2-8M shape (6 layers, width 320, 20 heads of 16), random weights, on the padded batch (the
    long protein is left to the small architectures above)."""
    reference = randomized_weights(EsmForMaskedLM(_hf_config(6, 320, 20, 1e-5)), seed=8)
    folder = _save(reference, tmp_path / "hf", "safetensors")
    assert ESM(path=str(folder), model="ESM-2-8M").output_dim == 320  # `model:` may name the architecture
    _compare(reference, folder, _proteins(all_proteins, long=False), masked=[(1, 5)])


@pytest.mark.parametrize("cls,form", [(EsmModel, "bin"), (EsmForMaskedLM, "safetensors"),
                                      (EsmForMaskedLM, "bin"), (EsmForMaskedLM, "safetensors-new")],
                         ids=["EsmModel-bin", "EsmForMaskedLM-safetensors", "EsmForMaskedLM-bin",
                              "EsmForMaskedLM-safetensors-new"])
@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=["2x32", "3x48"])
def test_every_saved_form_loads(tmp_path, all_proteins, architecture, cls, form):
    reference = randomized_weights(cls(_hf_config(*architecture)), seed=len(form) + architecture[0])
    folder = _save(reference, tmp_path / "hf", form)
    _compare(reference, folder, _proteins(all_proteins, long=False), masked=[(1, 3)])


def test_sharded_checkpoint_and_model_name_check(tmp_path):
    reference = randomized_weights(EsmForMaskedLM(_hf_config(*ARCHITECTURES[0])), seed=3)
    reference.save_pretrained(tmp_path / "one")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    one = ESM(path=str(tmp_path / "one")).model.state_dict()
    sharded = ESM(path=str(tmp_path / "sharded")).model.state_dict()
    assert one.keys() == sharded.keys() and all(torch.equal(one[k], sharded[k]) for k in one)
    with pytest.raises(WeightError, match=r"`model: ESM-2-8M` is another architecture than the Hugging Face "
                                          r"checkpoint in .*one \(2 layers, width 32, 4 heads\)"):
        ESM(path=str(tmp_path / "one"), model="ESM-2-8M")
    with pytest.raises(WeightError, match="`model: esm2_custom` names no file esm2_custom.pt"):
        ESM(path=str(tmp_path / "one"), model="esm2_custom")


def test_fair_esm_file_beside_config_json_keeps_working(tmp_path):
    folder = _save(randomized_weights(EsmModel(_hf_config(*ARCHITECTURES[1])), seed=4), tmp_path, "safetensors")
    official = _write_official_checkpoint(tmp_path, "esm2_t2_32_test")  # 2 layers x 32: not the HF one
    esm = ESM(path=str(folder), model="esm2_t2_32_test")
    assert esm.model.num_layers == 2 and torch.equal(esm.model.embed_tokens.weight, official.embed_tokens.weight)
    assert ESM(path=str(folder)).model.num_layers == 3  # without `model:` the Hugging Face checkpoint


def test_our_checkpoint_of_a_hugging_face_esm_round_trips(tmp_path, all_proteins):
    folder = _save(randomized_weights(EsmModel(_hf_config(*ARCHITECTURES[0])), seed=5), tmp_path / "hf", "safetensors")
    config = {"task": {"class": "MultipleBinaryClassification", "num_mlp_layer": 2,
                       "model": {"class": "ESM", "path": str(folder)}}}
    task = build_task(EasyDict(config), [0, 1, 2]).eval()
    again = build_task(EasyDict(config), [0, 1, 2]).eval()  # loading is deterministic (absent heads are zeros)
    assert all(torch.equal(v, again.encoder.state_dict()[k]) for k, v in task.encoder.state_dict().items())
    fair_esm = {"model." + k for k in build_esm2(2, 32, 4)[0].state_dict()}
    saved = checkpoint.pack(task, config, task_names=["a", "b", "c"], epoch=1)
    assert set(saved["encoder"]) == fair_esm  # fair-esm's names, whatever the source format
    checkpoint.save_atomic(saved, tmp_path / "best.pth")
    loaded = checkpoint.load(tmp_path / "best.pth")
    # into a random-weight ESM-2 of the same shape (no Hugging Face folder needed) and into the task again
    plain = ESM(pretrained=False, architecture=(2, 32, 4)).eval()
    checkpoint.load_state_dict_checked(plain, checkpoint.encoder_state(loaded, "best.pth"), "best.pth")
    restored = build_task(EasyDict(loaded["config"]), [0, 1, 2]).eval()
    for p in restored.parameters():
        p.data.zero_()
    checkpoint.load_state_dict_checked(restored, checkpoint.task_state(loaded), "best.pth")
    batch = ProteinBatch.pack(all_proteins[:3])
    with torch.no_grad():
        expected = task.encoder(batch)["residue_feature"]
        torch.testing.assert_close(plain(batch)["residue_feature"], expected, atol=1e-5, rtol=0)
        assert torch.equal(restored.encoder(batch)["residue_feature"], expected)
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in task.state_dict().items())


def _write(folder: Path, config=None, weights=None):
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if weights is not None:
        from safetensors.torch import save_file

        save_file(weights, str(folder / "model.safetensors"))
    return folder


def test_folders_that_are_not_esm2_get_one_sentence(tmp_path):
    source = _save(randomized_weights(EsmModel(_hf_config(*ARCHITECTURES[0])), seed=6), tmp_path / "ok", "safetensors")
    config = json.loads((source / "config.json").read_text())
    from safetensors.torch import load_file

    weights = load_file(str(source / "model.safetensors"))

    def refused(folder, match):
        with pytest.raises(WeightError, match=match) as info:
            ESM(path=str(folder))
        message = str(info.value)
        assert str(folder) in message and "\n" not in message and not re.search(r"\.\s+[A-Z]", message), message
        return message

    refused(_write(tmp_path / "empty"), r"holds neither a Hugging Face ESM checkpoint \(config.json\) nor "
                                        r"esm2_t33_650M_UR50D.pt")
    refused(_write(tmp_path / "bert", {**config, "model_type": "bert"}, weights), r"describes a 'bert' model")
    refused(_write(tmp_path / "absolute", {**config, "position_embedding_type": "absolute"}, weights),
            r"not an ESM-2 architecture: position_embedding_type is 'absolute'")
    refused(_write(tmp_path / "vocab", {**config, "vocab_size": 446}, weights), r"vocabulary of 446 tokens")
    vocab = _write(tmp_path / "vocab_txt", config, weights)
    (vocab / "vocab.txt").write_text("\n".join(["<cls>", "<pad>", "<eos>", "<unk>", *"ACDEFGHIKLMNPQRSTVWY"]))
    refused(vocab, r"vocabulary of 24 tokens")
    refused(_write(tmp_path / "no_weights", config), r"has config.json but no weights")
    broken = {k: v for k, v in weights.items() if "layer.1.attention.self.query.weight" not in k}
    broken["encoder.layer.0.attention.self.extra"] = torch.zeros(2)
    broken["encoder.layer.1.output.dense.bias"] = torch.zeros(7)
    message = refused(_write(tmp_path / "keys", config, broken), "do not fit the ESM-2 architecture")
    assert "missing keys: encoder.layer.1.attention.self.query.weight;" in message
    assert "unexpected keys: encoder.layer.0.attention.self.extra;" in message
    assert "encoder.layer.1.output.dense.bias (7,) vs (32,)" in message
    pickled = _write(tmp_path / "pickled", config)
    torch.save({"weights": argparse.Namespace(a=1)}, pickled / "pytorch_model.bin")  # unpickling needs a class
    refused(pickled, "hold pickled Python objects besides tensors, which are never unpickled")
    truncated = _write(tmp_path / "truncated", config)
    (truncated / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes()[:100])
    refused(truncated, r"the weights in .*truncated \(model.safetensors\) cannot be read")


def test_loading_needs_no_transformers(tmp_path):
    folder = _save(randomized_weights(EsmForMaskedLM(_hf_config(*ARCHITECTURES[0])), seed=7), tmp_path, "safetensors")
    code = ("import sys; sys.modules['transformers'] = None\n"  # any `import transformers` fails
            "import torch; from esm_gearnet.models import ESM\n"
            f"esm = ESM(path={str(folder)!r})\n"
            "print(esm.model.num_layers, esm.output_dim)")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["2", "32"], result.stderr
