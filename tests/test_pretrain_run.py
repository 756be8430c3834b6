"""script/pretrain.py end to end: the species/split loop over an AlphaFold DB archive built from real structures,
model_epoch_N.pth fine-tuned with downstream.py --ckpt (the exact tensors), and resume after a stop."""
import gzip
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import STRUCTURES
from esm_gearnet import checkpoint
from esm_gearnet.config import load_config
from esm_gearnet.training import build_downstream

ROOT = Path(__file__).resolve().parents[1]
FILES = ["1D66-A.pdb", "1ORC-A.pdb", "2N2U-A.pdb", "6MRR-A.pdb", "1WVN-A.pdb"]
CONFIG = """
output_dir: {{ output_dir }}
dataset:
  class: AlphaFoldDB
  path: %s
  species_start: 8
  species_end: 9
  split_length: 3
  progress: false
  transform:
    class: TruncateProtein
    max_length: 60
    random: true
task:
  class: DistancePrediction
  num_sample: 32
  model:
    class: FusionNetwork
    sequence_model: {class: ESM, model: ESM-2-8M, pretrained: false, architecture: [2, 64, 4]}
    structure_model: {class: GearNet, input_dim: 64, hidden_dims: [64, 64, 64], batch_norm: true,
                      concat_hidden: true, short_cut: true, readout: sum, num_relation: 7}
  graph_construction_model:
    class: GraphConstruction
    node_layers: [{class: AlphaCarbonNode}]
    edge_layers: [{class: SequentialEdge, max_distance: 2}, {class: SpatialEdge, radius: 10.0, min_distance: 5},
                  {class: KNNEdge, k: 10, min_distance: 5}]
optimizer: {class: Adam, lr: 1.0e-3}
engine: {batch_size: 2}
save_interval: 1
fix_sequence_model: true
train: {num_epoch: {{ num_epoch }}}
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    if not STRUCTURES.exists():
        pytest.skip("../shared/data is absent: pre-training reads real structures")
    root = tmp_path_factory.mktemp("afdb")
    with tarfile.open(root / "UP000005640_9606_HUMAN_v4.tar", "w") as handle:
        for k, name in enumerate(FILES):  # five proteins: splits of 3 and 2
            member = root / f"AF-Q{k:05d}-F1-model_v4.pdb.gz"
            member.write_bytes(gzip.compress((STRUCTURES / name).read_bytes()))
            handle.add(member, arcname=member.name)
            member.unlink()
    path = root / "pretrain.yaml"
    path.write_text(CONFIG % root)
    return path


def _run(script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _run_dir(out):
    (run_dir,) = list(out.glob("DistancePrediction/AlphaFoldDB/FusionNetwork/*"))
    return run_dir


@pytest.mark.slow
def test_pretrain_then_fine_tune_with_exactly_those_weights(config, tmp_path):
    _run("script/pretrain.py", "-c", str(config), "--output_dir", str(tmp_path / "a"), "--num_epoch", "2")
    run_dir = _run_dir(tmp_path / "a")
    records = [r for r in checkpoint.load(run_dir / "last.pth")["metrics"]]
    assert [(r["epoch"], r["species"], r["split"]) for r in records] == [(1, 8, 0), (2, 8, 1), (3, 8, 0), (4, 8, 1)]
    weights = torch.load(run_dir / "model_epoch_2.pth", weights_only=True)
    first = torch.load(run_dir / "model_epoch_1.pth", weights_only=True)
    assert any(not torch.equal(first[k], weights[k]) for k in weights if "structure_model" in k)
    assert all(torch.equal(first[k], weights[k]) for k in weights if "sequence_model" in k)  # ESM frozen

    demo = load_config(str(ROOT / "config/demo/esm_gearnet.yaml"),
                       {"num_protein": 30, "num_epoch": 1, "batch_size": 8, "batch_norm": None,
                        "output_dir": str(tmp_path / "ft")})
    engine = build_downstream(demo, None, seed=0, ckpt=str(run_dir / "model_epoch_2.pth"), progress=False)
    loaded = engine.task.model.state_dict()
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)
    _run("script/downstream.py", "-c", "config/demo/esm_gearnet.yaml", "--num_protein", "30", "--num_epoch", "1",
         "--output_dir", str(tmp_path / "ft"), "--ckpt", str(run_dir / "model_epoch_2.pth"))
    assert list((tmp_path / "ft").glob("*/*/*/*/best.pth"))

    # a run stopped after its first block resumes to the uninterrupted result
    _run("script/pretrain.py", "-c", str(config), "--output_dir", str(tmp_path / "b"), "--num_epoch", "1")
    stopped = _run_dir(tmp_path / "b")
    _run("script/pretrain.py", "-c", str(config), "--output_dir", str(tmp_path / "b"), "--num_epoch", "2",
         "--resume", str(stopped))
    resumed = torch.load(stopped / "model_epoch_2.pth", weights_only=True)
    assert all(torch.equal(resumed[k], weights[k]) for k in weights)
