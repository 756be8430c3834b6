"""Every config under config/ renders and builds; with tiny widths and random ESM weights substituted, its
task takes a training step: EC/GO configs on generated proteins, PSR/MSP configs on ATOM3D LMDBs written from
real structures."""
from pathlib import Path

import pytest
import torch

from conftest import STRUCTURES, write_msp, write_psr
from esm_gearnet.config import load_config
from esm_gearnet.data import collate
from esm_gearnet.registry import build
from esm_gearnet.training import parameter_groups, runtime_task_list

CONFIGS = sorted(p for folder in ("EC", "GO", "demo")
                 for p in (Path(__file__).resolve().parents[1] / "config" / folder).glob("*.yaml")
                 if not p.name.startswith("pretrain_"))
PRETRAIN_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "config" / "pretrain").glob("*.yaml"))
PRETRAIN_CONFIGS += sorted((Path(__file__).resolve().parents[1] / "config" / "demo").glob("pretrain_*.yaml"))
ATOM3D_CONFIGS = sorted(p for folder in ("PSR", "MSP")
                        for p in (Path(__file__).resolve().parents[1] / "config" / folder).glob("*.yaml"))
TINY_ESM = 32


@pytest.fixture(scope="session")
def atom3d_root(tmp_path_factory):
    if not STRUCTURES.exists():
        pytest.skip("../shared/data is absent: the PSR/MSP configs train on LMDBs written from real structures")
    root = tmp_path_factory.mktemp("atom3d")
    write_psr(root)
    write_msp(root)
    return root


def _shrink(cfg, dataset_path=None):
    """Tiny widths and a random 1-layer ESM-2. EC/GO/pre-training datasets become DemoFolds with the config's
    transforms; PSR/MSP datasets read `dataset_path`."""
    if dataset_path is None:
        cfg.dataset = {"class": "DemoFolds", "num_protein": 8, "transform": cfg.dataset.get("transform")}
    else:
        cfg.dataset.update({"path": str(dataset_path), "progress": False})
    model = cfg.task.model.model if cfg.task["class"] == "Unsupervised" else cfg.task.model
    if model["class"] == "FusionNetwork":
        model.sequence_model.update({"pretrained": False, "architecture": [1, TINY_ESM, 4]})
        structure = model.structure_model
        series = model.get("fusion") in (None, "series", "serial")
    elif model["class"] == "ESM":
        model.update({"pretrained": False, "architecture": [1, TINY_ESM, 4]})
        return cfg
    else:
        structure, series = model, False
    width = TINY_ESM if series else 21
    if structure["class"] == "GearNet":
        structure.update({"input_dim": width, "hidden_dims": [16, 16]})
    elif structure["class"] == "GVPGNN":
        structure.update({"node_in_dim": [width, 0], "node_h_dim": [16, 4], "edge_h_dim": [8, 1], "num_layers": 2})
    elif structure["class"] == "CDConv":
        structure.update({"input_dim": width, "hidden_dims": [16, 32], "embedding_dim": 8})
    if "cross_dim" in model:
        model.cross_dim = 16
    return cfg


def _check_and_shrink(path, dataset_path=None):
    cfg = load_config(str(path), {"branch": "MF", "ckpt": None})
    model = cfg.task.model
    if path.parent.name != "demo" and model["class"] != "ESM":
        # the real widths agree with the fusion: ESM-2-650M's 1280 in series, the 21-dim one-hot otherwise
        fused = model["class"] == "FusionNetwork"
        structure = model.structure_model if fused else model
        width = structure.get("input_dim") or structure.get("node_in_dim")[0]
        assert width == (1280 if fused and model.get("fusion") in (None, "series", "serial") else 21)
    if path.parent.name == "GO":
        assert cfg.dataset.branch == "MF"
    return _shrink(cfg, dataset_path)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_builds_and_trains_one_step(path):
    _one_step(_check_and_shrink(path))


@pytest.mark.parametrize("path", ATOM3D_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_atom3d_config_builds_and_trains_one_step(path, atom3d_root):
    _one_step(_check_and_shrink(path, atom3d_root))


def _one_step(cfg):
    torch.manual_seed(0)
    dataset = build(cfg.dataset, "dataset")
    task = build(cfg.task, "task", task=runtime_task_list(cfg, dataset))
    optimizer = build(cfg.optimizer, "optimizer", params=parameter_groups(cfg, task, float(cfg.optimizer.lr)))
    if cfg.get("scheduler"):
        build(cfg.scheduler, "scheduler", optimizer=optimizer)
    batch = collate([dataset[i] for i in range(3)])
    loss, _ = task(batch)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert cfg.metric in task.evaluate(task.predict(batch).detach(), task.target(batch))


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_pretrain_config_builds_and_trains_one_step(path):
    cfg = load_config(str(path), {})
    if path.parent.name == "pretrain":  # the original's settings
        assert cfg.dataset["class"] == "AlphaFoldDB"
        assert (cfg.dataset.species_start, cfg.dataset.species_end) == (0, 21)
        assert cfg.save_interval == 5 and cfg.train.num_epoch == 50
        if path.name != "contrast_esm_gearnet.yaml":
            assert cfg.fix_sequence_model is True
        cfg = _shrink(cfg)
    torch.manual_seed(0)
    dataset = build(cfg.dataset, "dataset")
    task = build(cfg.task, "task")
    optimizer = build(cfg.optimizer, "optimizer", params=parameter_groups(cfg, task, float(cfg.optimizer.lr)))
    esm = {k: v.clone() for k, v in task.encoder.sequence_model.state_dict().items()}
    task.train()
    loss, _ = task(collate([dataset[i] for i in range(4)]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    frozen = all(torch.equal(v, task.encoder.sequence_model.state_dict()[k]) for k, v in esm.items())
    assert frozen == bool(cfg.get("fix_sequence_model"))
