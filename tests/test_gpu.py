"""On CUDA: the demo trains under bf16 autocast with finite losses, a one-process NCCL run of downstream.py
finishes, and embed on the GPU equals embed on the CPU. Skipped with a reason on a machine without CUDA; the
number-comparing tests elsewhere run on CUDA through the `device` fixture. `make gpu-check` runs them all."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_command, run_dir_of

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "config" / "demo" / "esm_gearnet.yaml"
SMALL = ["--num_protein", "48", "--batch_size", "8", "--num_epoch", "2", "--task.model.structure_model.hidden_dims",
         "[32, 32]"]

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="no CUDA device here: these tests need a GPU")]


def test_demo_trains_under_bf16_with_finite_losses(cli, tmp_path):
    code, _, err = cli("downstream", "-c", DEMO, "--output_dir", tmp_path, *SMALL, "--engine.precision", "bf16")
    assert code == 0, err
    records = [json.loads(line) for line in (run_dir_of(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train"]["loss"] for r in records if "train" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert all(np.isfinite(list(r["valid"].values())).all() for r in records if "valid" in r)


def test_one_process_nccl_run_finishes(tmp_path):
    # the tree first, what was on the path kept (wheels installed with --target and PYTHONPATH still count)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = run_command([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                          "script/downstream.py", "-c", str(DEMO), "--output_dir", str(tmp_path), *SMALL], 300,
                         cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 process(es)" in (run_dir_of(tmp_path) / "log.txt").read_text()


def test_embed_on_cuda_equals_cpu(cli, tmp_path, structures_dir):
    from esm_gearnet import checkpoint
    from esm_gearnet.assembly import build_task
    from esm_gearnet.config import load_config, plain

    config = load_config(str(DEMO))
    torch.manual_seed(0)
    task = build_task(config, task_list=[0, 1, 2, 3])  # one set of weights for both devices
    checkpoint.save_atomic(checkpoint.pack(task, plain(config)), tmp_path / "weights.pth")
    files = sorted(structures_dir.glob("*.pdb"))[:4]
    for device in ("cpu", "cuda"):
        code, _, err = cli("embed", "--ckpt", tmp_path / "weights.pth", *files, "-o", tmp_path / f"{device}.npz",
                           "--device", device, "--per-residue", "--quiet")
        assert code == 0, err
    cpu, cuda = np.load(tmp_path / "cpu.npz"), np.load(tmp_path / "cuda.npz")
    for key in ("embedding", "residue_embedding"):
        np.testing.assert_allclose(cuda[key], cpu[key], atol=1e-4, rtol=1e-4)
