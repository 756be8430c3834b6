"""The config matrix: every config under config/ (EC, GO, PSR, MSP, pretrain, demo), with tiny widths and random
ESM weights substituted, is built through `esm_gearnet.assembly.build`, takes one training step, is saved by the
engine into a run directory, is loaded back from that directory, and `embed` gives the in-memory encoder's
embeddings of real structures; `predict` works wherever the task is protein-level.

EC/GO/pre-training configs train on generated proteins (DemoFolds) with the config's transforms; PSR/MSP configs
on ATOM3D LMDBs written from real structures. Structure input widths and GearNet's num_relation are left out of
the shrunk configs: the assembly derives them."""
import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import STRUCTURES, small, write_msp, write_psr
from esm_gearnet.assembly import build_task, model_config, optimizer_groups, runtime_task_list
from esm_gearnet.config import load_config
from esm_gearnet.data import collate, load_structures
from esm_gearnet.engine import Engine
from esm_gearnet.commands.embed import embed_proteins, load_embeddings, run_embed
from esm_gearnet.commands.predict import run_predict
from esm_gearnet.registry import build, resolve
from esm_gearnet.tasks import MultipleBinaryClassification, PropertyPrediction, SequenceStructureContrast

ROOT = Path(__file__).resolve().parents[1]
ALL_CONFIGS = sorted(p for folder in ("EC", "GO", "PSR", "MSP", "pretrain", "demo")
                     for p in (ROOT / "config" / folder).glob("*.yaml"))
# a pre-training config on a FoldComp database is its original's but for the dataset and schedule (checked
# below), so the matrix builds the original only
STREAMED = sorted((ROOT / "config" / "pretrain").glob("*_foldcomp.yaml"))
CONFIGS = [p for p in ALL_CONFIGS if p not in STREAMED]
EMBED_FILES = ["1D66-A.pdb", "2N2U-A.pdb", "1A7G-E.cif"]
# config files per folder: 12 for each downstream task and its ESM C version, 7 pre-training objectives (twice:
# AlphaFold DB's proteome archives as the original, and a FoldComp database) and the ESM-IF1 contrast, 6 demos
EXPECTED = {"EC": 13, "GO": 13, "PSR": 13, "MSP": 13, "pretrain": 15, "demo": 6}


def test_the_matrix_holds_every_config():
    """The matrix below is parametrized by CONFIGS: a folder moved or renamed would empty it, and pytest would
    skip it as an empty parameter set instead of failing."""
    assert Counter(p.parent.name for p in ALL_CONFIGS) == EXPECTED
    assert len(STREAMED) == 7


@pytest.mark.parametrize("path", STREAMED, ids=lambda p: p.name)
def test_a_foldcomp_pretraining_config_is_its_original_on_afdb_rep_v4(path):
    """The objective, model, optimizer and engine of the original's config; the dataset is afdb_rep_v4 as a
    FoldComp database with the original's transform, and the schedule is in epochs of it and steps."""
    cfg = load_config(str(path))
    original = load_config(str(path.with_name(path.name.replace("_foldcomp", ""))))
    for key in set(cfg) | set(original):
        if key not in ("dataset", "save_interval", "train"):
            assert cfg.get(key) == original.get(key), key
    assert cfg.dataset["class"] == "FoldCompDB" and cfg.dataset.path.endswith("/afdb_rep_v4")
    assert cfg.dataset.download and cfg.dataset.held_out == 1000
    assert cfg.dataset.transform == original.dataset.transform
    assert cfg.save_interval == 5000 and cfg.train == {"num_epoch": 8}


@pytest.fixture(scope="session")
def atom3d_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("atom3d")
    write_psr(root)
    write_msp(root)
    return root


def _shrink(cfg, atom3d_root):
    """Every encoder small (`Encoder.small_config`: tiny widths, a random 1-layer ESM-2), a small dataset; derived
    sizes removed."""
    if cfg.dataset["class"] in ("PSRDataset", "MSPDataset"):
        cfg.dataset.update({"path": str(atom3d_root), "progress": False})
    else:
        cfg.dataset = {"class": "DemoFolds", "num_protein": 8, "transform": cfg.dataset.get("transform")}
    model, _ = model_config(cfg)
    small(model)
    cfg.engine = {"batch_size": 4}
    return cfg


def _original_settings(path, cfg):
    """The config as the original wrote it: ESM-2-650M's 1280 in series fusion (ESM C 600M's 1152 in its
    configs), the 21-dim one-hot otherwise."""
    model, _ = model_config(cfg)
    if path.parent.name == "pretrain":
        assert cfg.dataset["class"] == "AlphaFoldDB"
        assert (cfg.dataset.species_start, cfg.dataset.species_end) == (0, 21)
        assert cfg.save_interval == 5 and cfg.train.num_epoch == 50
    if path.parent.name in ("demo", "pretrain") or model["class"] == "ESM":
        return
    fused = model["class"] == "FusionNetwork"
    structure = model.structure_model if fused else model
    width = structure.get("input_dim") or structure.get("node_in_dim")[0]
    series = 1152 if path.name.startswith("esmc_") else 1280
    assert width == (series if fused and model.get("fusion") in (None, "series", "serial") else 21)
    if path.parent.name == "GO":
        assert cfg.dataset.branch == "MF"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_trains_saves_loads_and_embeds(path, atom3d_root, tmp_path):
    if not STRUCTURES.exists():
        pytest.skip("../shared/data is absent: the matrix embeds real structures")
    cfg = load_config(str(path), {"branch": "MF"})
    _original_settings(path, cfg)
    cfg = _shrink(cfg, atom3d_root)
    torch.manual_seed(0)
    dataset = build(cfg.dataset, "dataset")
    # a pre-training config: under pretrain/, a demo named pretrain_*, or a demo of the sequence-structure contrast
    pretraining = path.parent.name == "pretrain" or path.name.startswith("pretrain_") or \
        issubclass(resolve(cfg.task["class"]), SequenceStructureContrast)
    task = build_task(cfg) if pretraining else build_task(cfg, runtime_task_list(cfg, dataset.tasks))
    optimizer = build(cfg.optimizer, "optimizer", params=optimizer_groups(cfg, task, float(cfg.optimizer.lr)))
    if cfg.get("scheduler"):
        build(cfg.scheduler, "scheduler", optimizer=optimizer)
    frozen = {k: v.clone() for k, v in task.encoder.state_dict().items() if k.startswith("sequence_model.")}

    # one training step
    task.train()
    loss, _ = task(collate([dataset[i] for i in range(4)]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    if cfg.get("fix_sequence_model"):
        assert frozen  # the sequence model's weights, by the name the check reads
        assert all(torch.equal(v, task.encoder.state_dict()[k]) for k, v in frozen.items())
    if not pretraining:
        batch = collate([dataset[i] for i in range(3)])
        with torch.no_grad():
            assert cfg.metric in task.evaluate(task.predict(batch), task.target(batch))

    # saved by the engine into a run directory, loaded back from it by embed
    run_dir = tmp_path / "run"
    names = [] if pretraining else dataset.tasks
    engine = Engine(task, dataset, None, None, optimizer, run_dir=run_dir, config=cfg, task_names=names,
                    progress=False)
    engine.save_weights("last.pth" if pretraining else "best.pth")
    files = [str(STRUCTURES / name) for name in EMBED_FILES]
    out = tmp_path / "embedding.npz"
    count, skipped = run_embed(files, out, ckpt=str(run_dir), per_residue=True, workers=0, progress=False)
    assert (count, skipped) == (3, [])
    saved = load_embeddings(out)
    proteins, _ = load_structures(files, workers=0, progress=False)
    expected, expected_residues = embed_proteins(task.encoder.eval(), proteins, per_residue=True)
    assert torch.isfinite(saved["embedding"]).all()
    torch.testing.assert_close(saved["embedding"], expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(saved["residue_embedding"], expected_residues):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    if isinstance(task, (MultipleBinaryClassification, PropertyPrediction)):
        table = tmp_path / "predictions.csv"
        assert run_predict(files, table, str(run_dir), workers=0, progress=False) == (3, [])
        with open(table) as handle:
            rows = list(csv.DictReader(handle))
        assert [row["id"] for row in rows] == [Path(f).stem for f in files]
        if isinstance(task, PropertyPrediction):
            assert all(np.isfinite(float(row[name])) for row in rows for name in names)


@pytest.fixture(scope="module")
def demo_database(tmp_path_factory):
    from esm_gearnet.data.datasets.foldcomp import DemoFoldCompDB

    path = tmp_path_factory.mktemp("foldcomp") / "demo"
    DemoFoldCompDB(path, num_protein=12)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("path", STREAMED, ids=lambda p: p.name)
def test_every_objective_pretrains_from_a_foldcomp_database(path, demo_database, tmp_path):
    """Each config/pretrain/*_foldcomp.yaml, its encoders small, on a database of the demo's proteins: two steps
    streamed, a checkpoint with the held-out loss after each, the weights file at the end."""
    import json

    import yaml

    from esm_gearnet.commands.pretrain import main
    from esm_gearnet.config import plain

    cfg = load_config(str(path))
    small(model_config(cfg)[0])
    cfg.dataset.update({"path": str(demo_database), "download": False, "held_out": 2})
    cfg.update({"train": {"num_step": 2}, "save_interval": 1, "output_dir": str(tmp_path / "out"),
                "engine": {"batch_size": 2}})
    shrunk = tmp_path / path.name
    shrunk.write_text(yaml.safe_dump(plain(cfg)))
    assert main(["-c", str(shrunk)]) == 0
    (run_dir,) = {p.parent for p in (tmp_path / "out").rglob("model_step_2.pth")}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["valid"]["loss"] for r in records if "valid" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
