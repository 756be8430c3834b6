"""script/pretrain.py end to end: the species/split loop over an AlphaFold DB archive built from real structures,
model_epoch_N.pth fine-tuned with downstream.py --ckpt (the exact tensors) and embedded, and resume after a stop
or a kill -9 inside a block (the uninterrupted weights, no finished block's file rewritten, nothing changed when
the run had finished)."""
import gzip
import hashlib
import os
import signal
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import STRUCTURES, killed_before_checkpoint, run_command
from esm_gearnet import checkpoint
from esm_gearnet.assembly import build_encoder
from esm_gearnet.config import load_config
from esm_gearnet.data import load_structures
from esm_gearnet.commands.embed import embed_proteins, load_embeddings
from esm_gearnet.commands.finetune import build_downstream

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
    result = run_command([sys.executable, script, *args], 300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _run_dir(out):
    (run_dir,) = list(out.glob("DistancePrediction/AlphaFoldDB/FusionNetwork/*"))
    return run_dir


def _encoder_weights(path):
    return checkpoint.encoder_state(checkpoint.load(path), str(path))


def _hashes(run_dir):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(config, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _run("script/pretrain.py", "-c", str(config), "--output_dir", str(out), "--num_epoch", "2")
    return _run_dir(out)


@pytest.mark.slow
def test_pretrain_then_fine_tune_and_embed_with_exactly_those_weights(uninterrupted, tmp_path):
    run_dir = uninterrupted
    records = checkpoint.load(run_dir / "last.pth")["training"]["metrics"]
    assert [(r["epoch"], r["species"], r["split"]) for r in records] == [(1, 8, 0), (2, 8, 1), (3, 8, 0), (4, 8, 1)]
    weights = _encoder_weights(run_dir / "model_epoch_2.pth")
    first = _encoder_weights(run_dir / "model_epoch_1.pth")
    assert any(not torch.equal(first[k], weights[k]) for k in weights if "structure_model" in k)
    assert all(torch.equal(first[k], weights[k]) for k in weights if "sequence_model" in k)  # ESM frozen

    demo = load_config(str(ROOT / "config/demo/esm_gearnet.yaml"),
                       {"num_protein": 30, "num_epoch": 1, "batch_size": 8, "output_dir": str(tmp_path / "ft")})
    engine = build_downstream(demo, None, seed=0, ckpt=str(run_dir / "model_epoch_2.pth"), progress=False)
    loaded = engine.task.encoder.state_dict()
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)
    _run("script/downstream.py", "-c", "config/demo/esm_gearnet.yaml", "--num_protein", "30", "--num_epoch", "1",
         "--output_dir", str(tmp_path / "ft"), "--ckpt", str(run_dir / "model_epoch_2.pth"))
    assert list((tmp_path / "ft").glob("*/*/*/*/best.pth"))

    # embed: from the pre-training run directory (its last.pth and config), and from model_epoch_2.pth with the
    # fine-tuning config, which renders to the same encoder: both give the weights' embeddings
    files = [str(STRUCTURES / name) for name in FILES[:3]]
    proteins, _ = load_structures(files, workers=0, progress=False)
    encoder = build_encoder(demo).eval()
    checkpoint.load_state_dict_checked(encoder, _encoder_weights(run_dir / "last.pth"), "last.pth")
    expected, _ = embed_proteins(encoder, proteins)
    for source in (["--ckpt", str(run_dir)],
                   ["-c", "config/demo/esm_gearnet.yaml", "--ckpt", str(run_dir / "model_epoch_2.pth")]):
        out = tmp_path / "embedding.npz"
        _run("script/embed.py", *source, *files, "-o", str(out), "--quiet")
        torch.testing.assert_close(load_embeddings(out)["embedding"], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_resume_continues_to_the_uninterrupted_weights_and_rewrites_nothing(config, uninterrupted, tmp_path):
    reference = _encoder_weights(uninterrupted / "model_epoch_2.pth")
    # resuming a finished run changes no file of its directory
    before = _hashes(uninterrupted)
    _run("script/pretrain.py", "-c", str(config), "--output_dir", str(tmp_path), "--num_epoch", "2",
         "--resume", str(uninterrupted))
    assert _hashes(uninterrupted) == before

    # a run stopped after its first block is resumed, and killed (kill -9) inside the second block: after its first
    # split (split 3 of the run) was checkpointed and its second trained and recorded, before that split's
    # checkpoint. Resumed once more, it ends with the uninterrupted run's weights and records (split 4 once), and
    # block 1's file is never rewritten.
    out = tmp_path / "b"
    _run("script/pretrain.py", "-c", str(config), "--output_dir", str(out), "--num_epoch", "1")
    stopped = _run_dir(out)
    block_one = _hashes(stopped)["model_epoch_1.pth"]
    command = [sys.executable, "script/pretrain.py", "-c", str(config), "--output_dir", str(out), "--num_epoch", "2",
               "--resume", str(stopped)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = killed_before_checkpoint(command, 4, 300, cwd=ROOT, env=env)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert checkpoint.load(stopped / "last.pth")["training"]["position"]["splits_done"] == 3
    assert not (stopped / "model_epoch_2.pth").exists()
    _run("script/pretrain.py", "-c", str(config), "--output_dir", str(out), "--num_epoch", "2",
         "--resume", str(stopped))
    resumed = _encoder_weights(stopped / "model_epoch_2.pth")
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert _hashes(stopped)["model_epoch_1.pth"] == block_one
    assert (checkpoint.load(stopped / "last.pth")["training"]["metrics"]
            == checkpoint.load(uninterrupted / "last.pth")["training"]["metrics"])
