"""SaProt-format models (ESM with SaProt's amino-acid x 3Di vocabulary, esm_gearnet/models/esm/)
against `transformers` itself: a random-weight model saved with `save_pretrained` next to a vocab.txt written
here, our features equal to `EsmModel`'s on the same combined tokens; the token string of a real AlphaFold model
built by hand (its PDB lines, mini3di, SaProt's pLDDT rule) equal to our tokeniser's."""
import dataclasses
import warnings

import mini3di
import numpy as np
import pytest
import torch

try:
    import transformers
    from transformers import EsmConfig, EsmModel
except ImportError:
    pytest.skip("transformers is not installed (pip install -e '.[test]'); these tests compare with "
                "transformers.EsmModel", allow_module_level=True)

from conftest import ALPHAFOLD, randomized_weights, run_dir_of, small, structure_files
from esm_gearnet.data import ProteinBatch, load_structure
from esm_gearnet.data.foldseek import three_di_states
from esm_gearnet.models import ESM
from esm_gearnet.models.esm import SAPROT_TOKENS

transformers.logging.set_verbosity_error()

# SaProt's vocab.txt (westlake-repl/SaProt_650M_AF2; utils/esm_loader.py builds the same list), written out here
# independently of the package: special tokens, then amino acid (upper case, `#` masked) x 3Di (lower case,
# `#` masked), amino acid major, in SaProt's letter orders.
VOCAB = ["<cls>", "<pad>", "<eos>", "<unk>", "<mask>"] + [a + s for a in "ACDEFGHIKLMNPQRSTVWY#"
                                                          for s in "pynwrqhgdlvtmfsaeikc#"]
THREE_LETTER = {"ALA": "A", "ARG": "R", "ASN": "N", "ASP": "D", "CYS": "C", "GLN": "Q", "GLU": "E", "GLY": "G",
                "HIS": "H", "ILE": "I", "LEU": "L", "LYS": "K", "MET": "M", "PHE": "F", "PRO": "P", "SER": "S",
                "THR": "T", "TRP": "W", "TYR": "Y", "VAL": "V"}
SHORT_AF = ALPHAFOLD / "AF-A0A0B7P221-F1-model_v2.pdb"  # 28 residues, pLDDT 56.9 .. 81.4
needs_data = pytest.mark.skipif(not SHORT_AF.exists(), reason="../shared/data/alphafold is absent")


@pytest.fixture(scope="module")
def saprot_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saprot")
    config = EsmConfig(vocab_size=len(VOCAB), pad_token_id=VOCAB.index("<pad>"), mask_token_id=VOCAB.index("<mask>"),
                       hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
                       layer_norm_eps=1e-5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = randomized_weights(EsmModel(config, add_pooling_layer=False))
    model.save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return folder, model


def test_vocabulary_is_saprots():
    assert len(VOCAB) == 446 and list(SAPROT_TOKENS) == VOCAB


def _hand_tokens(path, plddt_mask=True):
    """SaProt's combined string of a one-chain PDB file, from its ATOM lines: amino acid letters, 3Di states of
    mini3di called directly (Foldseek's `d` where it gives none), `#` for structure where the CA's pLDDT < 70."""
    residues = {}
    for line in open(path):
        if line.startswith("ATOM"):
            key = (line[21], int(line[22:26]), line[26])
            residue = residues.setdefault(key, {"name": line[17:20]})
            residue[line[12:16].strip()] = [float(line[30:38]), float(line[38:46]), float(line[46:54])]
            if line[12:16].strip() == "CA":
                residue["plddt"] = float(line[60:66])
    rows = list(residues.values())
    atoms = [np.array([r.get(name, [np.nan] * 3) for r in rows]) for name in ("CA", "CB", "N", "C")]
    states = mini3di.Encoder().encode_atoms(*atoms)
    letters = ["d" if masked else "acdefghiklmnpqrstvwy"[s]
               for s, masked in zip(np.ma.getdata(states), np.ma.getmaskarray(states))]
    if plddt_mask:
        letters = ["#" if r["plddt"] < 70 else s for r, s in zip(rows, letters)]
    return "".join(THREE_LETTER[r["name"]] + s for r, s in zip(rows, letters))


@needs_data
def test_token_string_of_a_real_alphafold_model(saprot_folder):
    folder, _ = saprot_folder
    protein = load_structure(SHORT_AF)
    masked = ESM(path=str(folder), plddt_mask=True)
    expected = _hand_tokens(SHORT_AF)
    assert "#" in expected and len(expected) == 2 * len(protein)
    batch = ProteinBatch.pack([protein])
    assert masked.token_strings(batch) == [expected]
    # experimental structures (default): B-factors are not read
    assert ESM(path=str(folder)).token_strings(batch) == [_hand_tokens(SHORT_AF, plddt_mask=False)]
    # the states a dataset kept (three_di: true) are used as they are; masked residues become `#` + 3Di
    kept = dataclasses.replace(protein, three_di_state=torch.full((len(protein),), 20, dtype=torch.long))
    mask = torch.zeros(len(protein), dtype=torch.bool)
    mask[3] = True
    strings = ESM(path=str(folder)).token_strings(ProteinBatch.pack([kept]), mask)[0]
    assert strings[1::2] == "d" * len(protein) and strings[6:8] == "#d"


def _proteins():
    files = [f for f in structure_files() if f.suffix == ".pdb"][:3]
    proteins = [load_structure(f) for f in files]
    proteins = [p.subresidue(torch.arange(min(len(p), 150))) for p in proteins]
    longest = max(proteins, key=len)
    proteins.append(longest.subresidue(torch.arange(len(longest)).repeat(8)[:1100]))  # two windows
    return proteins


def _hf_hidden(model, strings):
    """transformers' last hidden states of each combined string's first 1022 tokens (alone: no padding)."""
    index = {token: i for i, token in enumerate(VOCAB)}
    hidden = []
    for string in strings:
        tokens = [string[i:i + 2] for i in range(0, len(string), 2)][:1022]
        ids = torch.tensor([[index["<cls>"], *(index.get(t, index["<unk>"]) for t in tokens), index["<eos>"]]])
        with torch.no_grad():
            hidden.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0, 1:-1])
    return hidden


@pytest.mark.skipif(not structure_files(), reason="../shared/data is absent")
@pytest.mark.parametrize("attention", ["sdpa", "esm", "varlen"])
def test_features_equal_transformers(saprot_folder, attention):
    folder, reference = saprot_folder
    proteins = _proteins()
    batch = ProteinBatch.pack(proteins)
    mask = torch.zeros(batch.num_residue, dtype=torch.bool)
    mask[[5, 200]] = True
    ours = ESM(path=str(folder), attention=attention).eval()
    assert ours.saprot and ours.output_dim == 32
    assert ESM(path=str(folder), vocabulary="SaProt").saprot
    strings = ours.token_strings(batch, mask)
    # the combined tokens: residue letters and mini3di's states (`d` where none), `#` + 3Di where masked
    for protein, string in zip(proteins, strings):
        letters = "".join("d" if s == 20 else "acdefghiklmnpqrstvwy"[s] for s in three_di_states(protein).tolist())
        assert string[1::2] == letters
    assert strings[0][10:12].startswith("#")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        features = ours(batch, mask)["residue_feature"].split(batch.num_residues.tolist())
    for feature, expected in zip(features, _hf_hidden(reference, strings)):
        torch.testing.assert_close(feature[:len(expected)], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not structure_files(), reason="../shared/data is absent")
def test_feature_cache_keys_on_structure_too(saprot_folder):
    folder, _ = saprot_folder
    protein = _proteins()[0]
    protein = dataclasses.replace(protein, three_di_state=three_di_states(protein))  # as a dataset keeps them
    other = dataclasses.replace(protein, three_di_state=torch.zeros(len(protein), dtype=torch.long))
    esm = ESM(path=str(folder), feature_cache_gib=1.0).eval()
    esm.freeze("sequence_model")
    first = esm(ProteinBatch.pack([protein]))["residue_feature"]
    second = esm(ProteinBatch.pack([other]))["residue_feature"]
    assert len(esm.feature_cache) == 2 and not torch.allclose(first, second)
    again = esm(ProteinBatch.pack([other, protein]))["residue_feature"]
    torch.testing.assert_close(again, torch.cat([second, first]))
    fresh = ESM(path=str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(first, fresh(ProteinBatch.pack([protein]))["residue_feature"])


@pytest.mark.skipif(not structure_files(), reason="../shared/data is absent")
def test_random_saprot_model_trains():
    esm = ESM(vocabulary="SaProt", pretrained=False, architecture=(2, 16, 2))
    assert esm.saprot and len(esm.alphabet.all_toks) == 446
    batch = ProteinBatch.pack(_proteins()[:2])
    loss = esm(batch)["graph_feature"].square().sum()
    loss.backward()
    assert esm.model.embed_tokens.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown vocabulary"):
        ESM(vocabulary="nope", pretrained=False, architecture=(1, 16, 2))


def test_vocabulary_check_of_a_pretrained_model(tmp_path):
    config = EsmConfig(vocab_size=33, pad_token_id=1, mask_token_id=32, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64, position_embedding_type="rotary",
                       emb_layer_norm_before=False, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    EsmModel(config, add_pooling_layer=False).save_pretrained(tmp_path)
    assert not ESM(path=str(tmp_path)).saprot
    with pytest.raises(Exception, match="vocabulary: SaProt"):
        ESM(path=str(tmp_path), vocabulary="SaProt")


# ---- in every fusion mode, with every structure encoder -------------------------------------------------------
STRUCTURE_CONFIGS = {"GearNet": "esm_gearnet", "GVPGNN": "esm_gvp", "CDConv": "esm_cdconv"}


def _fusion_task(structure, fusion):
    """The EC config of `structure` in `fusion` mode with a tiny random SaProt-format language model, and its
    dataset (generated proteins whose 3Di states the dataset keeps)."""
    from esm_gearnet.assembly import build_task, model_config, runtime_task_list
    from esm_gearnet.config import load_config
    from esm_gearnet.registry import build

    name = STRUCTURE_CONFIGS[structure] + ("" if fusion == "series" else "_parallel")
    cfg = load_config(f"config/EC/{name}.yaml", {})
    cfg.dataset = {"class": "DemoFolds", "num_protein": 6, "three_di": True, "transform": cfg.dataset.transform}
    model, _ = model_config(cfg)
    model.fusion = fusion
    if fusion == "cross":
        model.cross_dim = 16
    model.sequence_model = {"class": "ESM", "pretrained": False, "vocabulary": "SaProt", "architecture": [1, 32, 4]}
    small(model.structure_model)
    dataset = build(cfg.dataset, "dataset")
    return build_task(cfg, runtime_task_list(cfg, dataset.tasks)), dataset


@pytest.mark.parametrize("fusion", ["series", "parallel", "cross"])
@pytest.mark.parametrize("structure", list(STRUCTURE_CONFIGS))
def test_every_fusion_mode_and_structure_encoder(structure, fusion):
    from esm_gearnet.data import collate, three_di_letters

    torch.manual_seed(0)
    task, dataset = _fusion_task(structure, fusion)
    encoder, esm = task.encoder, task.encoder.sequence_model
    assert esm.saprot and encoder.reads_three_di
    batch = collate([dataset[i] for i in range(4)])
    graph = encoder.construct(batch["graph"])
    # the language model reads the kept states through the structure encoder's graph construction
    assert graph.three_di_state is not None
    for string, states in zip(esm.token_strings(graph), graph.three_di_state.split(graph.num_residues.tolist())):
        assert string[1::2] == three_di_letters(states).lower()
    task.train()
    loss, _ = task(batch)
    loss.backward()
    assert torch.isfinite(loss) and esm.model.embed_tokens.weight.grad.abs().sum() > 0
    # structure-aware: other 3Di states, other features (in cross fusion through the attention block too)
    encoder.eval()
    with torch.no_grad():
        features = encoder.encode(graph)
        other = encoder.encode(graph.replace(three_di_state=graph.three_di_state.roll(1)))
        if fusion != "cross":  # the sequence part is the language model's own output
            torch.testing.assert_close(features["residue_feature"][:, :esm.output_dim],
                                       esm.encode(graph)["residue_feature"])
    assert not torch.allclose(features["residue_feature"], other["residue_feature"])


# ---- pre-training ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not structure_files(), reason="../shared/data is absent")
def test_pretraining_masks_the_amino_acid_and_keeps_the_structure(monkeypatch):
    from esm_gearnet.data.foldseek import FOLDSEEK_PLACEHOLDER, NO_STATE, THREE_DI_LETTERS, batch_states
    from esm_gearnet.tasks import ResidueTypePrediction
    from esm_gearnet.tasks.pretrain import mask_residues

    batch = ProteinBatch.pack(_proteins()[:3])  # real structures, no kept states: computed on the fly
    assert batch.three_di_state is None
    unmasked = batch_states(batch)
    esm = ESM(vocabulary="SaProt", pretrained=False, architecture=(1, 16, 2))
    task = ResidueTypePrediction(esm, mask_rate=0.15)
    seen = []
    token_ids = esm.tokens.ids
    monkeypatch.setattr(esm.tokens, "ids", lambda *args: seen.append(args) or token_ids(*args))
    torch.manual_seed(0)
    loss, _ = task({"graph": batch})
    assert torch.isfinite(loss)
    ((_, mask, structure),) = seen
    assert 0 < int(mask.sum()) < batch.num_residue
    # every residue, masked or not, keeps the 3Di state of the structure before masking (`d` where none)
    placeholder = THREE_DI_LETTERS.index(FOLDSEEK_PLACEHOLDER)
    torch.testing.assert_close(structure, unmasked.masked_fill(unmasked == NO_STATE, placeholder))
    tokens = [esm.alphabet.all_toks[i] for i in token_ids(batch.residue_type, mask, structure).tolist()]
    assert all(t.startswith("#") == bool(m) for t, m in zip(tokens, mask.tolist()))
    # the rule matters: the masked batch has no side chains (no CB), and its own states differ
    everything = torch.ones(batch.num_residue, dtype=torch.bool)
    assert not torch.equal(batch_states(mask_residues(batch, everything)), unmasked)
    assert torch.equal(mask_residues(batch, everything, three_di=True).three_di_state, unmasked)


def test_kept_states_follow_the_atoms():
    from esm_gearnet.data.synthetic import backbone_protein
    from esm_gearnet.tasks import NoiseTransform

    protein = backbone_protein("MKVLAEGST" * 4, "LHHHHHHHHHLLEEEEELLLEEEEELLHHHHHHHHL")
    states = three_di_states(protein)
    batch = ProteinBatch.pack([protein.replace(three_di_state=states)])
    keep = torch.arange(batch.num_residue) % 3 > 0
    # crops and copies keep them aligned with their residues
    assert torch.equal(batch.subresidue(keep).three_di_state, states[keep])
    assert torch.equal(batch.to("cpu").three_di_state, states)
    # new coordinates drop them: a model reading 3Di computes them from the atoms it is given
    assert batch.replace(atom_pos=batch.atom_pos * 2).three_di_state is None
    assert NoiseTransform(0.3)({"graph": batch})["graph2"].three_di_state is None


# ---- the demo: trains, resumes, embeds, predicts --------------------------------------------------------------
@needs_data
def test_demo_trains_resumes_and_embeds(cli, tmp_path, structures_dir):
    import json

    import yaml

    demo = "config/demo/saprot_gearnet.yaml"
    code, _, err = cli("downstream", "-c", demo, "--output_dir", tmp_path / "runs", "--num_protein", "32",
                       "--task.model.structure_model.hidden_dims", "[16]", "--train.num_epoch", "1")
    assert code == 0, err
    run_dir = run_dir_of(tmp_path / "runs")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["dataset"]["three_di"] and config["task"]["model"]["sequence_model"]["vocabulary"] == "SaProt"
    code, _, err = cli("downstream", "--resume", run_dir, "--train.num_epoch", "2")
    assert code == 0, err
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "epoch" in r] == [1, 2]

    files = [*sorted(structures_dir.glob("*.pdb"))[:2], SHORT_AF]
    code, _, err = cli("embed", "--ckpt", run_dir, *files, "-o", tmp_path / "e.npz", "--per-residue", "--quiet")
    assert code == 0, err
    embedding = np.load(tmp_path / "e.npz")["embedding"]
    assert embedding.shape == (3, 64 + 16) and np.isfinite(embedding).all()
    # the unpadded attention path: the same embeddings
    code, _, err = cli("embed", "--ckpt", run_dir, *files, "-o", tmp_path / "v.npz", "--quiet",
                       "--task.model.sequence_model.attention", "varlen")
    assert code == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "v.npz")["embedding"], embedding, atol=1e-4, rtol=1e-4)
    # SaProt's pLDDT mask changes what the model reads of the AlphaFold model (pLDDT 57-81)
    code, _, err = cli("embed", "--ckpt", run_dir, *files, "-o", tmp_path / "p.npz", "--quiet",
                       "--task.model.sequence_model.plddt_mask", "true")
    assert code == 0, err
    masked = np.load(tmp_path / "p.npz")["embedding"]
    assert np.abs(masked[2] - embedding[2]).max() > 1e-3
    code, _, err = cli("predict", "--ckpt", run_dir, *files, "-o", tmp_path / "p.csv", "--quiet")
    assert code == 0, err
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 4


def test_weights_of_the_other_vocabulary_are_refused_naming_both():
    from esm_gearnet.checkpoint import CheckpointError, load_state_dict_checked

    esm2 = ESM(pretrained=False, architecture=(1, 16, 2))
    saprot = ESM(vocabulary="SaProt", pretrained=False, architecture=(1, 16, 2))
    with pytest.raises(CheckpointError, match="vocabularies differ: 33 tokens in the checkpoint, 446 in the model"):
        load_state_dict_checked(saprot, esm2.state_dict(), "esm2.pth")
    with pytest.raises(CheckpointError, match="vocabularies differ: 446 tokens in the checkpoint, 33 in the model"):
        load_state_dict_checked(esm2, saprot.state_dict(), "saprot.pth")
