"""ESM-IF1's structure encoder against fair-esm's `GVPTransformerEncoder` (random weights of two sizes, one protein
and packed, missing backbone atoms, pLDDT confidence), a file in the release's layout, the series projection
starting at zero, a training step in every fusion mode, and the demo config end to end."""
import contextlib
import os
import sys
import types
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from esm_gearnet.data import ProteinBatch
from esm_gearnet.data.protein import Protein
from esm_gearnet.models import ESM, ESMIF1, FusionNetwork
from esm_gearnet.models.esm_if1 import RELEASE, RELEASE_NAMES

SIZES = {  # two architectures: ESMIF1's arguments and fair-esm's args
    "small": dict(embed_dim=16, layers=1, attention_heads=2, ffn_dim=32, gvp_layers=1, gvp_node_dims=[8, 4],
                  gvp_edge_dims=[4, 1], top_k_neighbors=8),
    "wider": dict(embed_dim=32, layers=2, attention_heads=4, ffn_dim=48, gvp_layers=2, gvp_node_dims=[16, 6],
                  gvp_edge_dims=[8, 1], top_k_neighbors=30),  # the release's k: more than some proteins' length
}


def _args(size, **extra):
    a = SIZES[size]
    return Namespace(arch="vit_invariant_gvp", encoder_embed_dim=a["embed_dim"], encoder_layers=a["layers"],
                     encoder_attention_heads=a["attention_heads"], encoder_ffn_embed_dim=a["ffn_dim"],
                     gvp_num_encoder_layers=a["gvp_layers"], gvp_node_hidden_dim_scalar=a["gvp_node_dims"][0],
                     gvp_node_hidden_dim_vector=a["gvp_node_dims"][1],
                     gvp_edge_hidden_dim_scalar=a["gvp_edge_dims"][0],
                     gvp_edge_hidden_dim_vector=a["gvp_edge_dims"][1], gvp_top_k_neighbors=a["top_k_neighbors"],
                     dropout=0.1, attention_dropout=0.1, gvp_dropout=0.1, **extra)


@contextlib.contextmanager
def _stand_ins():
    """fair-esm's inverse-folding modules import torch_scatter (only `scatter_add` is called, by the decoder) and
    biotite<1 (`filter_backbone`, for reading files) at module level. torch_scatter is a compiled extension;
    biotite<1 has no build for numpy 2 (its compiled modules fail to import) and biotite 1.x lacks
    `filter_backbone`. The encoder path calls neither: while esm.inverse_folding is imported, a few lines of torch
    stand in for torch_scatter and, where biotite<1 does not import, placeholders stand in for biotite."""
    added = []

    def stand_in(name, **attributes):
        module = types.ModuleType(name)
        module.__dict__.update(attributes)

        def missing(attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return sys.modules.get(f"{name}.{attr}", object)  # a placeholder for names used in annotations

        module.__getattr__ = missing
        sys.modules[name] = module
        added.append(name)

    def scatter_add(src, index, dim=-1, out=None, dim_size=None):
        dim = dim % src.dim()
        size = list(src.shape)
        size[dim] = dim_size if dim_size is not None else int(index.max()) + 1
        out = src.new_zeros(size) if out is None else out
        return out.index_add_(dim, index, src)

    if "torch_scatter" not in sys.modules:
        stand_in("torch_scatter", scatter_add=scatter_add, scatter=None)
    try:
        from biotite.structure import filter_backbone  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or failing under numpy 2
        for name in [n for n in sys.modules if n == "biotite" or n.startswith("biotite.")]:
            del sys.modules[name]
        for name in ("biotite", "biotite.structure", "biotite.structure.io", "biotite.structure.residues",
                     "biotite.sequence"):
            stand_in(name)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def fair_esm():
    """fair-esm's inverse-folding modules (the reference)."""
    pytest.importorskip("torch_geometric", reason="fair-esm's inverse folding imports torch-geometric (`make test` "
                                                  "installs it)")
    pytest.importorskip("scipy", reason="fair-esm's inverse folding imports scipy (the test extra installs it)")
    with _stand_ins():
        import esm.inverse_folding.gvp_transformer
        import esm.inverse_folding.gvp_transformer_encoder
        import esm.inverse_folding.util
    return esm


def _protein(length, seed, missing=()):
    """A chain-like backbone: CA on a random walk of 3.8 Å steps, N and C 1.5 Å from it; `missing` (residue,
    atom slot) pairs absent from atom_mask (their coordinates 0, as files leave them)."""
    generator = torch.Generator().manual_seed(seed)
    steps = torch.nn.functional.normalize(torch.randn(length, 3, generator=generator), dim=-1) * 3.8
    ca = torch.cumsum(steps, 0) + 10 * torch.randn(3, generator=generator)
    protein = Protein.from_sequence("A" * length, ca=ca)
    atom_pos, atom_mask = protein.atom_pos.clone(), protein.atom_mask.clone()
    for slot in (0, 2, 3):
        atom_pos[:, slot] = ca + 1.5 * torch.nn.functional.normalize(torch.randn(length, 3, generator=generator),
                                                                     dim=-1)
        atom_mask[:, slot] = True
    for residue, slot in missing:
        atom_pos[residue, slot] = 0.0
        atom_mask[residue, slot] = False
    bfactor = 100 * torch.rand(length, generator=generator)
    return protein.replace(atom_pos=atom_pos, atom_mask=atom_mask, bfactor=bfactor)


#: residue 3 without CA, 7 without N (fair-esm then counts it as padding), 10 without C, the last without N
PROTEINS = [_protein(12, 0), _protein(25, 1, missing=[(3, 1), (7, 0), (10, 2), (24, 0)]), _protein(40, 2)]


def _coords(protein):
    """fair-esm's input for one protein: [L, 3, 3] N, CA, C with NaN for a missing atom."""
    coords = protein.atom_pos[:, :3].clone()
    coords[~protein.atom_mask[:, :3]] = float("nan")
    return coords.numpy()


def _reference(fair_esm, size, seed=0):
    """fair-esm's encoder with random weights (its own initialisation), in eval mode, and its alphabet."""
    torch.manual_seed(seed)
    alphabet = fair_esm.data.Alphabet.from_architecture("invariant_gvp")
    args = _args(size)
    embed = torch.nn.Embedding(len(alphabet), args.encoder_embed_dim, padding_idx=alphabet.padding_idx)
    encoder = fair_esm.inverse_folding.gvp_transformer_encoder.GVPTransformerEncoder(args, alphabet, embed)
    with torch.no_grad():  # biases and norms away from their 0 / 1 initialisation, so a mix-up shows
        for name, parameter in encoder.named_parameters():
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return encoder.eval(), alphabet


def _release_state(state):
    """A fair-esm module state dict under the release's internal names (fair-esm's renaming undone)."""
    renamed = {}
    for name, value in state.items():
        for old, new in reversed(RELEASE_NAMES):
            if new:
                name = name.replace(new, old)
        renamed[name] = value
    return renamed


def _ours(reference, size, **options):
    model = ESMIF1(pretrained=False, **SIZES[size], **options)
    state = {"encoder." + k: v for k, v in reference.state_dict().items()}
    from esm_gearnet.models.esm_if1 import encoder_state

    model.load_state_dict(encoder_state(_release_state(state)))
    return model.eval()


def _reference_features(fair_esm, reference, alphabet, proteins, plddt=False):
    """fair-esm's features of each protein, from one padded batch (`CoordBatchConverter`, BOS and EOS stripped as
    `get_encoder_output` does)."""
    converter = fair_esm.inverse_folding.util.CoordBatchConverter(alphabet)
    confidence = [(p.bfactor / 100).tolist() for p in proteins] if plddt else None
    coords, confidence, _, _, padding_mask = converter.from_lists([_coords(p) for p in proteins], confidence)
    out = reference(coords, padding_mask, confidence)["encoder_out"][0]  # [L, B, D]
    return [out[1:len(p) + 1, b] for b, p in enumerate(proteins)]


@pytest.mark.parametrize("size", ["small", "wider"])
def test_features_equal_fair_esm_one_protein_and_packed(fair_esm, size):
    reference, alphabet = _reference(fair_esm, size)
    model = _ours(reference, size)
    with torch.no_grad():
        for protein in PROTEINS:  # one protein at a time: exactly get_encoder_output
            expected = fair_esm.inverse_folding.util.get_encoder_output(
                types.SimpleNamespace(encoder=reference), alphabet, _coords(protein))
            got = model(ProteinBatch.pack([protein]))
            torch.testing.assert_close(got["residue_feature"], expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got["graph_feature"][0], expected.mean(0), atol=1e-5, rtol=1e-5)
        expected = _reference_features(fair_esm, reference, alphabet, PROTEINS)
        got = model(ProteinBatch.pack(PROTEINS))["residue_feature"]
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()


def test_plddt_confidence_equals_fair_esm_given_it(fair_esm):
    reference, alphabet = _reference(fair_esm, "small")
    model = _ours(reference, "small", confidence="plddt")
    with torch.no_grad():
        expected = torch.cat(_reference_features(fair_esm, reference, alphabet, PROTEINS, plddt=True))
        got = model(ProteinBatch.pack(PROTEINS))["residue_feature"]
        default = _ours(reference, "small")(ProteinBatch.pack(PROTEINS))["residue_feature"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, default, atol=1e-3)


def test_a_file_in_the_release_layout_loads_as_fair_esm_loads_it(fair_esm, tmp_path):
    """A whole GVPTransformerModel (encoder and decoder) saved under the release's internal names with its `args`:
    fair-esm's own loader accepts it (so the layout is the release's) and ESMIF1 reads its encoder."""
    torch.manual_seed(1)
    alphabet = fair_esm.data.Alphabet.from_architecture("invariant_gvp")
    args = _args("small", decoder_embed_dim=16, decoder_layers=1, decoder_attention_heads=2,
                 decoder_ffn_embed_dim=32)
    whole = fair_esm.inverse_folding.gvp_transformer.GVPTransformerModel(args, alphabet)
    torch.save({"args": args, "model": _release_state(whole.state_dict())}, tmp_path / f"{RELEASE}.pt")
    data = torch.load(tmp_path / f"{RELEASE}.pt", weights_only=False)
    assert any(k.startswith("encoder.gvp_encoder.W_v") for k in data["model"])
    with pytest.warns(UserWarning, match="Regression weights"):
        loaded, alphabet = fair_esm.pretrained.load_model_and_alphabet_core(RELEASE, data)
    model = ESMIF1(path=str(tmp_path)).eval()  # the folder; the architecture from `args`
    assert model.output_dim == 16 and len(model.layers) == 1
    with torch.no_grad():
        expected = _reference_features(fair_esm, loaded.encoder.eval(), alphabet, PROTEINS[:2])
        got = model(ProteinBatch.pack(PROTEINS[:2]))["residue_feature"]
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="embed_dim"):
        ESMIF1(path=str(tmp_path / f"{RELEASE}.pt"), embed_dim=32)


def test_a_missing_release_names_the_url_and_pretrained_false(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"download https://dl\.fbaipublicfiles\.com/.*pretrained: false"):
        ESMIF1(path=str(tmp_path))


def test_series_projection_starts_at_zero_and_learns():
    torch.manual_seed(0)
    alone = ESMIF1(pretrained=False, **SIZES["small"]).eval()
    series = ESMIF1(input_dim=32, pretrained=False, **SIZES["small"]).eval()
    missing = series.load_state_dict(alone.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["input_projection.bias", "input_projection.weight"]
    batch = ProteinBatch.pack(PROTEINS[:2])
    language = torch.randn(batch.num_residue, 32)
    out = series.network(batch, language)
    torch.testing.assert_close(out["residue_feature"], alone(batch)["residue_feature"], atol=0, rtol=0)
    out["graph_feature"].pow(2).sum().backward()
    assert series.input_projection.weight.grad.abs().sum() > 0
    assert alone.input_projection is None  # the one-hot input is not read: no projection


@pytest.mark.parametrize("language_model", ["ESM-2-8M", "ESM-C-300M"])
@pytest.mark.parametrize("fusion", ["series", "parallel", "cross"])
def test_every_fusion_takes_a_training_step(fusion, language_model):
    torch.manual_seed(0)
    esm = ESM(model=language_model, pretrained=False, architecture=(1, 32, 4))
    structure = ESMIF1(input_dim=32 if fusion == "series" else 21, pretrained=False, **SIZES["small"])
    net = FusionNetwork(esm, structure, fusion=fusion, cross_dim=16)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    batch = ProteinBatch.pack(PROTEINS)
    loss = net(batch)["graph_feature"].pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in esm.parameters())
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    optimizer.step()
    assert np.isfinite(net(batch)["graph_feature"].sum().item())


@pytest.mark.slow
def test_the_demo_trains_resumes_embeds_and_fine_tunes_for_predict(tmp_path):
    """config/demo/esm_if1_contrast.yaml: 2 epochs, resumed for a third, `embed` from its run directory; its
    encoder fine-tuned (--ckpt) on the demo's EC-like task, whose run `predict` reads (predict needs target names,
    which a pre-training checkpoint has none of)."""
    import yaml

    from conftest import STRUCTURES, run_command
    from esm_gearnet.commands.embed import load_embeddings
    from esm_gearnet.config import render_config

    if not STRUCTURES.exists():
        pytest.skip("../shared/data is absent: embed and predict read real structures")
    root = Path(__file__).resolve().parents[1]

    def run(*command):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
        result = run_command([sys.executable, *command], 300, cwd=root, env=env)
        assert result.returncode == 0, result.stderr[-3000:]

    demo = "config/demo/esm_if1_contrast.yaml"
    run("script/pretrain.py", "-c", demo, "--output_dir", str(tmp_path / "pre"), "--num_protein", "32")
    (run_dir,) = (tmp_path / "pre").glob("SequenceStructureContrast/DemoFolds/FusionNetwork/*")
    assert (run_dir / "model_epoch_2.pth").exists()
    run("script/pretrain.py", "-c", demo, "--output_dir", str(tmp_path / "pre"), "--num_protein", "32",
        "--num_epoch", "3", "--resume", str(run_dir))
    assert (run_dir / "model_epoch_3.pth").exists()
    files = [str(STRUCTURES / name) for name in ("1D66-A.pdb", "2N2U-A.pdb")]
    run("script/embed.py", "--ckpt", str(run_dir), *files, "-o", str(tmp_path / "e.npz"), "--quiet")
    embedding = load_embeddings(tmp_path / "e.npz")["embedding"]
    assert embedding.shape == (2, 64 + 64) and torch.isfinite(torch.as_tensor(embedding)).all()

    fine_tune = yaml.safe_load(render_config(str(root / "config/demo/esm_gearnet.yaml")))
    fine_tune["task"]["model"] = yaml.safe_load(render_config(str(root / demo)))["task"]["model"]
    del fine_tune["task"]["graph_construction_model"]  # ESM-IF1 builds its own graph
    fine_tune["dataset"]["num_protein"], fine_tune["train"]["num_epoch"] = 24, 1
    fine_tune["output_dir"] = str(tmp_path / "ft")
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(fine_tune))
    run("script/downstream.py", "-c", str(tmp_path / "ft.yaml"), "--ckpt", str(run_dir / "model_epoch_3.pth"))
    (best,) = (tmp_path / "ft").glob("*/*/*/*/best.pth")
    run("script/predict.py", "--ckpt", str(best.parent), *files, "-o", str(tmp_path / "p.csv"), "--quiet")
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 3
