"""Using a trained model on your own structures through the command line: embeddings (ids, order, shapes, batch
independence, formats, resume, bad inputs), predictions, and the run's curves against its metrics.jsonl."""
import csv
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import STRUCTURES, run_command
from original_layouts import original_cdconv_layout, original_gvpgnn_layout, random_state, shapes_of
from esm_gearnet import checkpoint
from esm_gearnet.commands.embed import load_embeddings
from esm_gearnet.commands.inputs import length_batches
from esm_gearnet.engine.report import plot_runs

ROOT = Path(__file__).resolve().parents[1]
FOLDER_FILES = ["1D66-A.pdb", "2N2U-A.pdb", "1A7G-E.cif"]


def _run(*command, expect=0):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    quiet = ["--quiet"] if command[0] in ("script/embed.py", "script/predict.py") else []
    result = run_command([sys.executable, *command, *quiet], 300, cwd=ROOT, env=env)
    assert result.returncode == expect, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    if not STRUCTURES.exists():
        pytest.skip("../shared/data is absent: these tests embed real structures")
    out = tmp_path_factory.mktemp("trained")
    _run("script/downstream.py", "-c", "config/demo/esm_gearnet.yaml", "--num_protein", "40", "--num_epoch", "2",
         "--output_dir", str(out))
    (path,) = list(out.glob("*/*/*/*"))
    return path


@pytest.fixture()
def inputs(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in FOLDER_FILES:
        shutil.copy(STRUCTURES / name, folder / name)
    (folder / "corrupt.pdb").write_text("ATOM      1  CA  ALA A   1    garbage\n")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{STRUCTURES / '1ORC-A.pdb'}\n")
    return [str(folder), str(listing), str(STRUCTURES / "6MRR-A.pdb")]


@pytest.mark.slow
def test_embed_from_the_command_line(run_dir, inputs, tmp_path):
    out = tmp_path / "emb.npz"
    result = _run("script/embed.py", "--ckpt", str(run_dir), *inputs, "-o", str(out), "--per-residue")
    assert "embedded 5 protein(s)" in result.stdout
    data = np.load(out)  # plain numpy, no pickle
    expected = ["1A7G-E", "1D66-A", "2N2U-A", "1ORC-A", "6MRR-A"]  # folder sorted, then the list, then the file
    assert list(data["ids"]) == expected and data["embedding"].shape == (5, 256)
    records = load_embeddings(out)
    for sequence, residue in zip(records["sequences"], records["residue_embedding"]):
        assert residue.shape == (len(sequence), 256)
    skipped = (tmp_path / "emb.npz.skipped.tsv").read_text()
    assert "corrupt.pdb" in skipped and len(skipped.splitlines()) == 1
    # the same protein alone gives the same embedding as inside the batch
    alone = tmp_path / "alone.pt"
    _run("script/embed.py", "--ckpt", str(run_dir), str(STRUCTURES / "1ORC-A.pdb"), "-o", str(alone),
         "--per-residue")
    single = load_embeddings(alone)
    assert single["ids"] == ["1ORC-A"]
    torch.testing.assert_close(single["embedding"][0], records["embedding"][3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single["residue_embedding"][0], records["residue_embedding"][3], atol=1e-5, rtol=1e-5)
    # h5 holds the same; --resume embeds only what is missing
    h5 = tmp_path / "emb.h5"
    _run("script/embed.py", "--ckpt", str(run_dir), inputs[0], "-o", str(h5))
    first = load_embeddings(h5)
    _run("script/embed.py", "--ckpt", str(run_dir), *inputs, "-o", str(h5), "--resume")
    resumed = load_embeddings(h5)
    assert resumed["ids"] == ["1A7G-E", "1D66-A", "2N2U-A", "1ORC-A", "6MRR-A"]
    assert torch.equal(resumed["embedding"][:3], first["embedding"])
    torch.testing.assert_close(resumed["embedding"], records["embedding"], atol=1e-5, rtol=1e-5)
    # --resume keeps every per-residue row and refuses another model or other options in one sentence
    partial = tmp_path / "partial.npz"
    _run("script/embed.py", "--ckpt", str(run_dir), inputs[0], "-o", str(partial), "--per-residue")
    _run("script/embed.py", "--ckpt", str(run_dir), *inputs, "-o", str(partial), "--per-residue", "--resume")
    whole = load_embeddings(partial)
    assert whole["ids"] == expected
    for got, want in zip(whole["residue_embedding"], records["residue_embedding"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    offsets = np.load(partial)["residue_offsets"]
    assert offsets.tolist() == np.cumsum([0] + [len(s) for s in whole["sequences"]]).tolist()
    before = partial.read_bytes()
    refused = _run("script/embed.py", "--ckpt", str(run_dir), *inputs, "-o", str(partial), "--resume", expect=2)
    assert refused.stderr.count("\n") == 1 and "other --per-residue setting" in refused.stderr
    other = tmp_path / "other.pth"
    state = checkpoint.load(run_dir / "best.pth")
    state["encoder"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["encoder"].items()}
    checkpoint.save_atomic(state, other)  # other weights, with their own digest
    refused = _run("script/embed.py", "--ckpt", str(other), *inputs, "-o", str(partial), "--per-residue",
                   "--resume", expect=2)
    assert "other encoder weights" in refused.stderr and partial.read_bytes() == before
    # nothing readable: a non-zero exit
    _run("script/embed.py", "--ckpt", str(run_dir), str(tmp_path / "mine" / "corrupt.pdb"), "-o",
         str(tmp_path / "none.npz"), expect=1)


@pytest.mark.slow
def test_predict_from_the_command_line(run_dir, inputs, tmp_path):
    out, scores = tmp_path / "pred.csv", tmp_path / "scores.npz"
    _run("script/predict.py", "--ckpt", str(run_dir), *inputs, "-o", str(out), "--scores", str(scores),
         "--threshold", "0.3", "--top", "2")
    rows = list(csv.DictReader(open(out)))
    assert [r["id"] for r in rows] == ["1A7G-E", "1D66-A", "2N2U-A", "1ORC-A", "6MRR-A"]
    matrix = np.load(scores)
    terms = list(matrix["terms"])
    assert sorted(terms) == ["all_alpha", "all_beta", "alpha_beta", "disordered"]
    for row, values in zip(rows, matrix["scores"]):
        best = row["top_terms"].split(";")
        assert len(best) == 2 and best[0].split(":")[0] == terms[int(values.argmax())]
        above = {terms[j] for j in range(len(terms)) if values[j] >= 0.3}
        assert set(filter(None, row["terms_above_0.3"].split(";"))) == above
        assert int(row["length"]) > 0


def _png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_curves_show_what_metrics_jsonl_holds(run_dir, tmp_path):
    assert _png_size(run_dir / "curves.png") == (1560, 360)  # three panels: loss, auprc@micro, f1_max
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "epoch" in r]
    figure = plot_runs([run_dir])
    panels = {axis.get_title().split(" (")[0]: axis for axis in figure.axes if axis.get_title()}
    assert list(panels) == ["train loss", "auprc@micro", "f1_max"]
    loss = panels["train loss"].lines[0]
    assert list(loss.get_xdata()) == [r["epoch"] for r in records]
    assert list(loss.get_ydata()) == [r["train"]["loss"] for r in records]
    best = records[-1]["best_epoch"]
    for metric in ("auprc@micro", "f1_max"):
        valid, test, marker = panels[metric].lines  # the best epoch: a dotted vertical line
        assert list(valid.get_ydata()) == [r["valid"][metric] for r in records]
        assert list(test.get_ydata()) == [r["test"][metric] for r in records] and test.get_linestyle() == "--"
        assert list(marker.get_xdata()) == [best, best] and marker.get_linestyle() == ":"
    _run("script/report.py", str(run_dir), str(run_dir), "-o", str(tmp_path / "both.png"))
    width, height = _png_size(tmp_path / "both.png")
    assert width == 1560 and height == 360


def test_length_batches_respect_the_budget():
    lengths = [50, 300, 120, 5000, 80, 300, 10]
    batches = list(length_batches(lengths, max_residues=600, max_proteins=3))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [3] in batches  # longer than the budget: alone
    for batch in batches:
        assert len(batch) <= 3 and (len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 600)


def test_command_line_errors_are_one_sentence(tmp_path, capsys):
    from esm_gearnet.commands.embed import main as embed_main
    from esm_gearnet.commands.finetune import main as downstream_main
    from esm_gearnet.commands.pretrain import main as pretrain_main
    from esm_gearnet.commands.report import main as report_main

    assert embed_main(["--ckpt", str(tmp_path / "missing.pth"), str(tmp_path), "-o", str(tmp_path / "e.npz")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: checkpoint {tmp_path / 'missing.pth'} does not exist; "
                                               "check the path given to --ckpt / --resume.")
    assert report_main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    # a training config without one of its sections: one sentence too
    config = tmp_path / "bad.yaml"
    config.write_text("task:\n  class: MultipleBinaryClassification\noptimizer:\n  class: Adam\n")
    for main in (downstream_main, pretrain_main):
        assert main(["-c", str(config)]) == 2
        assert capsys.readouterr().err == (f"error: {config} lacks dataset, train, task.model; a training config "
                                           "needs dataset, task (with its model), optimizer and train, as "
                                           "config/EC/esm_gearnet.yaml has.\n")


def _write_config(path, model, graph=True):
    """A config holding only what embed needs: task.model and the EC graph construction."""
    import yaml

    task = {"class": "PropertyPrediction", "model": model}
    if graph:
        task["graph_construction_model"] = {
            "class": "GraphConstruction", "node_layers": [{"class": "AlphaCarbonNode"}],
            "edge_layers": [{"class": "SequentialEdge", "max_distance": 2},
                            {"class": "SpatialEdge", "radius": 10.0, "min_distance": 5},
                            {"class": "KNNEdge", "k": 10, "min_distance": 5}]}
    path.write_text(yaml.safe_dump({"task": task}))
    return path


@pytest.mark.parametrize("mode", ["series", "parallel", "cross"])
def test_embed_reproduces_the_original_from_its_bare_state_dict(mode, fidelity_dir, tmp_path):
    """embed -c CONFIG --ckpt <the original's FusionNetwork state_dict> gives the original's outputs."""
    from esm_gearnet.commands.embed import run_embed

    expected = torch.load(fidelity_dir / "expected.pt", weights_only=True)
    arch = expected["esm"]
    model = {"class": "FusionNetwork", "fusion": mode, "cross_dim": expected["cross_dim"],
             "sequence_model": {"class": "ESM", "pretrained": False,
                                "architecture": [arch["num_layers"], arch["embed_dim"], arch["attention_heads"]]},
             "structure_model": {"class": "GearNet", **expected["gearnet"]}}  # input_dim derived
    config = _write_config(tmp_path / "fusion.yaml", model)
    files = [str(STRUCTURES / name) for name in expected["proteins"]]
    out = tmp_path / "original.npz"
    assert run_embed(files, out, str(config), str(fidelity_dir / f"{mode}.pt"), per_residue=True, workers=0,
                     progress=False) == (4, [])
    records = load_embeddings(out)
    torch.testing.assert_close(records["embedding"], expected[mode]["graph_feature"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(records["residue_embedding"]), expected[mode]["residue_feature"],
                               atol=1e-5, rtol=1e-5)


# small GVP-GNN and CDConv configs (the original's names and defaults); with `input_dim`, the original's layout
SMALL_GVP = dict(node_h_dim=[16, 4], edge_in_dim=[16, 1], edge_h_dim=[8, 1], num_layers=2)
SMALL_CDCONV = dict(embedding_dim=8, hidden_dims=[16, 32], seq_cutoff=21, kernel_dims=[8])


def _original_layout(structure, input_dim, prefix=""):
    """The original's state_dict layout (tests/original_layouts.py, written from its code) of SMALL_GVP or
    SMALL_CDCONV on `input_dim` channels."""
    if structure == "GVPGNN":
        return original_gvpgnn_layout(node_in_dim=[input_dim, 0], **SMALL_GVP, prefix=prefix)
    return original_cdconv_layout(input_dim=input_dim, **SMALL_CDCONV, prefix=prefix)


def _structure_config(structure):
    if structure == "GVPGNN":
        return {"class": "GVPGNN", "readout": "mean", **SMALL_GVP}
    return {"class": "CDConv", "cutoffs": [8.0, 12.0], **SMALL_CDCONV}


def test_bare_gvp_and_cdconv_state_dicts_load_and_embed(tmp_path, capsys):
    """Bare state_dicts in the original's layout (the GVP-GNN's with its empty `vdropout.dummy_param` tensors,
    accepted and dropped) load through --ckpt and embed as the same weights loaded in-process; a file that fits no
    encoder gets one sentence saying what it holds."""
    from esm_gearnet.assembly import build_encoder
    from esm_gearnet.commands.embed import main as embed_main
    from esm_gearnet.config import load_config
    from esm_gearnet.data import load_structures
    from esm_gearnet.commands.embed import embed_proteins, run_embed

    if not STRUCTURES.exists():
        pytest.skip("../shared/data is absent: these tests embed real structures")
    files = [str(STRUCTURES / name) for name in FOLDER_FILES]
    proteins, _ = load_structures(files, workers=0, progress=False)
    for name, structure in (("gvp", "GVPGNN"), ("cdconv", "CDConv")):
        config = _write_config(tmp_path / f"{name}.yaml", _structure_config(structure), structure == "GVPGNN")
        state = random_state(_original_layout(structure, 21), dtype=torch.float32)
        assert any(k.endswith("dummy_param") for k in state) == (structure == "GVPGNN")
        torch.save(state, tmp_path / f"{name}.pth")
        out = tmp_path / f"{name}.npz"
        assert run_embed(files, out, str(config), str(tmp_path / f"{name}.pth"), workers=0, progress=False)[0] == 3
        source = "the original's state_dict"
        encoder = build_encoder(load_config(str(config)), checkpoint.encoder_state(dict(state), source), source)
        expected, _ = embed_proteins(encoder.eval(), proteins)
        torch.testing.assert_close(load_embeddings(out)["embedding"], expected, atol=1e-5, rtol=1e-5)
    torch.save({"epoch": 3, "note": "not weights"}, tmp_path / "other.pth")
    assert embed_main(["-c", str(tmp_path / "gvp.yaml"), "--ckpt", str(tmp_path / "other.pth"), *files,
                       "-o", str(tmp_path / "x.npz")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "holds the keys epoch, note, which is neither" in error
    assert embed_main(["--ckpt", str(tmp_path / "gvp.pth"), *files, "-o", str(tmp_path / "x.npz")]) == 2
    assert "holds no config (a bare state_dict" in capsys.readouterr().err


@pytest.mark.parametrize("structure, fusion", [("GVPGNN", "series"), ("GVPGNN", "parallel"), ("GVPGNN", "cross"),
                                               ("CDConv", "series"), ("CDConv", "parallel")])
def test_original_fusion_state_dicts_around_gvp_and_cdconv_load(structure, fusion, fidelity_dir, tmp_path):
    """The original's FusionNetwork around GVP-GNN or CDConv (config/*/esm_gvp*.yaml, esm_cdconv*.yaml): its ESM-2
    (and cross fusion's seq_linear and attn) as the fidelity files name them, `structure_model.*` in the layout
    written from the original's code, and cross fusion's struct_linear = Linear(structure output, cross_dim). The
    encoder takes exactly those keys (less the empty dropout probes and ESM's `mapping` buffer)."""
    from esm_gearnet.assembly import build_encoder
    from esm_gearnet.config import load_config

    expected = torch.load(fidelity_dir / "expected.pt", weights_only=True)
    esm, cross_dim = expected["esm"], expected["cross_dim"]
    original = torch.load(fidelity_dir / f"{fusion}.pt", weights_only=True)
    state = {k: v for k, v in original.items() if not k.startswith(("structure_model.", "struct_linear."))}
    layout = _original_layout(structure, esm["embed_dim"] if fusion == "series" else 21, "structure_model.")
    if fusion == "cross":
        output_dim = SMALL_GVP["node_h_dim"][0] if structure == "GVPGNN" else SMALL_CDCONV["hidden_dims"][-1]
        layout.update({"struct_linear.weight": (cross_dim, output_dim), "struct_linear.bias": (cross_dim,)})
    state.update(random_state(layout, dtype=torch.float32))
    model = {"class": "FusionNetwork", "fusion": fusion, "cross_dim": cross_dim,
             "sequence_model": {"class": "ESM", "pretrained": False,
                                "architecture": [esm["num_layers"], esm["embed_dim"], esm["attention_heads"]]},
             "structure_model": _structure_config(structure)}
    config = _write_config(tmp_path / "fusion.yaml", model, structure == "GVPGNN")
    source = f"the original's {fusion} {structure} state_dict"
    encoder = build_encoder(load_config(str(config)), checkpoint.encoder_state(dict(state), source), source)
    kept = {k: v for k, v in shapes_of(state).items()
            if not k.endswith("vdropout.dummy_param") and k != "sequence_model.mapping"}
    assert shapes_of(encoder.state_dict()) == kept
