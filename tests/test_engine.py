"""The training engine through real processes: torchrun and torch.distributed.launch with two gloo ranks,
kill -9 and resume, --ckpt round trips; plus optimizer groups, schedulers and non-finite losses in-process."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from esm_gearnet import checkpoint
from esm_gearnet.data import collate
from esm_gearnet.config import load_config
from esm_gearnet.training import build_downstream, build_scheduler

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "config" / "demo" / "esm_gearnet.yaml"
# 50 proteins: train 40, valid 5, test 5 (odd: two ranks score 2 and 3); no batch norm (no SyncBatchNorm on CPU)
SMALL = ["--num_protein", "50", "--batch_norm", "False"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command, out, timeout=300):
    result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = [p for p in (out / "MultipleBinaryClassification" / "DemoFolds" / "FusionNetwork").iterdir()]
    return run_dir


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _downstream(*options):
    return [sys.executable, "script/downstream.py", "-c", str(DEMO), *SMALL, *options]


def _distributed(launcher, *options):
    script = ["script/downstream.py", "-c", str(DEMO), *SMALL, *options]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *script]
    return [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2",
            f"--master_port={_free_port()}", *script]


def _assert_same_weights(a, b, atol):
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return _run(_downstream("--batch_size", "8", "--num_epoch", "2", "--output_dir", str(out)), out)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "launch"])
def test_two_gloo_ranks_match_one_process(single_run, tmp_path, launcher):
    """2 ranks x batch 4 average gradients over the same global batches as 1 process x batch 8."""
    run_dir = _run(_distributed(launcher, "--batch_size", "4", "--num_epoch", "2", "--output_dir", str(tmp_path)),
                   tmp_path)
    one, two = _records(single_run), _records(run_dir)
    assert len(one) == len(two) == 3 and "final" in two[-1]
    for a, b in zip(one[:2], two[:2]):
        assert b["num_evaluated"] == {"valid": 5, "test": 5}  # every protein once, none padded in twice
        assert b["train"]["loss"] == pytest.approx(a["train"]["loss"], abs=1e-4)
        for split in ("valid", "test"):
            for key, value in a[split].items():
                assert b[split][key] == pytest.approx(value, abs=1e-4), (split, key)
    _assert_same_weights(checkpoint.load(single_run / "last.pth")["model"],
                         checkpoint.load(run_dir / "last.pth")["model"], atol=1e-4)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "log.txt").is_file()


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(single_run, tmp_path):
    uninterrupted = _run(_downstream("--batch_size", "8", "--num_epoch", "4", "--output_dir", str(tmp_path / "a")),
                         tmp_path / "a")
    out = tmp_path / "b"
    process = subprocess.Popen(_downstream("--batch_size", "8", "--num_epoch", "4", "--output_dir", str(out)),
                               cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    run_dir = None
    while time.time() < deadline and process.poll() is None:
        found = list(out.glob("*/*/*/*/last.pth"))
        if found and checkpoint.load(found[0])["epoch"] >= 1:
            run_dir = found[0].parent
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait()
    assert run_dir is not None and process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not any("final" in r for r in _records(run_dir))
    resumed = subprocess.run(_downstream("--batch_size", "8", "--num_epoch", "4", "--output_dir", str(out),
                                         "--resume", str(run_dir)),
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = checkpoint.load(uninterrupted / "last.pth"), checkpoint.load(run_dir / "last.pth")
    assert a["epoch"] == b["epoch"] == 4 and a["step"] == b["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [r["epoch"] for r in _records(run_dir) if "epoch" in r] == [1, 2, 3, 4]
    assert _records(run_dir)[-1]["final"] == _records(uninterrupted)[-1]["final"]


def _config(*pairs):
    variables = {"num_protein": 50, "batch_norm": False, "num_epoch": 1, "batch_size": 8, "output_dir": None}
    variables.update(dict(pairs))
    return load_config(str(DEMO), variables)


def test_ckpt_round_trip_and_readable_mismatch(single_run):
    best = single_run / "best.pth"
    engine = build_downstream(_config(), None, seed=0, ckpt=str(best), progress=False)
    saved = checkpoint.load(best)["encoder"]
    own = engine.task.encoder.state_dict()
    assert saved.keys() == own.keys() and all(torch.equal(own[k], v) for k, v in saved.items())
    # the original's format: a bare FusionNetwork state_dict
    bare = single_run.parent / "bare.pth"
    torch.save(engine.task.encoder.state_dict(), bare)
    again = build_downstream(_config(), None, seed=1, ckpt=str(bare), progress=False)
    batch = next(iter(torch.utils.data.DataLoader(engine.sets["test"], batch_size=3,
                                                  collate_fn=collate)))
    engine.task.eval(), again.task.eval()
    with torch.no_grad():
        torch.testing.assert_close(engine.task.encoder(batch["graph"])["graph_feature"],
                                   again.task.encoder(batch["graph"])["graph_feature"], atol=0, rtol=0)
    wrong = {k: v for k, v in engine.task.encoder.state_dict().items() if "structure_model.layers.0" not in k}
    wrong["extra.weight"] = torch.zeros(1)
    torch.save(wrong, bare)
    with pytest.raises(checkpoint.CheckpointError, match=r"missing keys: structure_model\.layers\.0.*"
                                                         r"unexpected keys: extra\.weight"):
        build_downstream(_config(), None, seed=0, ckpt=str(bare), progress=False)


def test_plateau_scheduler_follows_the_metric_direction():
    config = _config()
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert build_scheduler(config, optimizer, "f1_max").mode == "max"
    assert build_scheduler(config, optimizer, "rmse [gdt_ts]").mode == "min"


def test_non_finite_loss_stops_with_the_step(tmp_path):
    engine = build_downstream(_config(), tmp_path, seed=0, progress=False)
    with torch.no_grad():
        engine.task.mlp.layers[0].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at epoch 0, step 0, batch 0; lower"):
        engine.train_epoch()
    engine.on_nonfinite = "skip"
    engine.train_epoch()
    assert engine.step == 0 and engine.epoch == 1  # every step skipped, the epoch still ends


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    engines = []
    for batch_size, interval in ((8, 1), (4, 2)):
        config = _config(("batch_size", batch_size))
        config.engine.gradient_interval = interval
        config.optimizer["class"] = "SGD"
        torch.manual_seed(0)
        engine = build_downstream(config, None, seed=0, progress=False)
        engine.train_epoch()
        engines.append(engine)
    _assert_same_weights(engines[0].task.state_dict(), engines[1].task.state_dict(), atol=1e-5)
    assert engines[0].step == engines[1].step == 5


def test_checkpoint_written_atomically_and_loaded_safely(tmp_path):
    path = tmp_path / "x.pth"
    checkpoint.save_atomic({"a": torch.ones(2)}, path)
    assert torch.equal(checkpoint.load(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pth"]  # no temporary left behind
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(checkpoint.CheckpointError, match="cannot be read safely"):
        checkpoint.load(path)
    shutil.rmtree(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load(path)
