"""The training engine through real processes: torchrun and torch.distributed.launch with two gloo ranks,
kill -9 and resume, --ckpt round trips; plus optimizer groups, schedulers and non-finite losses in-process."""
import json
import os
import random
import shutil
import signal
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import killed_before_checkpoint, run_command
from esm_gearnet import checkpoint
from esm_gearnet.data import collate
from esm_gearnet.config import load_config
from esm_gearnet.engine.stepper import CannotLearn
from esm_gearnet.assembly import build_scheduler, selection_metric
from esm_gearnet.commands.finetune import build_downstream
from esm_gearnet.commands.run import seed_everything
from esm_gearnet.engine import Stage

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
    result = run_command(command, timeout, cwd=ROOT, env=_env())
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
    _assert_same_weights(checkpoint.task_state(checkpoint.load(single_run / "last.pth")),
                         checkpoint.task_state(checkpoint.load(run_dir / "last.pth")), atol=1e-4)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "log.txt").is_file()


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(single_run, tmp_path):
    """kill -9 at the end of epoch 2 of 2, after the epoch was recorded (and maybe its best.pth written), before its
    last.pth: the resumed run ends with the uninterrupted run's weights, step and records (epoch 2 once)."""
    out = tmp_path / "b"
    command = _downstream("--batch_size", "8", "--num_epoch", "2", "--output_dir", str(out))
    killed = killed_before_checkpoint(command, 2, 300, cwd=ROOT, env=_env())
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (run_dir,) = list(out.glob("*/*/*/*"))
    assert checkpoint.load(run_dir / "last.pth")["epoch"] == 1
    assert [r.get("epoch") for r in _records(run_dir)] == [1, 2]  # epoch 2 recorded after last.pth: dropped
    resumed = run_command(command + ["--resume", str(run_dir)], 300, cwd=ROOT, env=_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = checkpoint.load(single_run / "last.pth"), checkpoint.load(run_dir / "last.pth")
    assert a["epoch"] == b["epoch"] == 2 and a["training"]["step"] == b["training"]["step"]
    a, b = checkpoint.task_state(a), checkpoint.task_state(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["epoch"] for r in _records(run_dir) if "epoch" in r] == [1, 2]
    assert _records(run_dir)[-1]["final"] == _records(single_run)[-1]["final"]


def _config(*pairs):
    variables = {"num_protein": 50, "batch_norm": False, "num_epoch": 1, "batch_size": 8, "output_dir": None}
    variables.update(dict(pairs))
    return load_config(str(DEMO), variables)


@pytest.mark.slow
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
    assert build_scheduler(config, optimizer, "f1_max").scheduler.mode == "max"
    assert build_scheduler(config, optimizer, "rmse [gdt_ts]").scheduler.mode == "min"


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss_stops_with_the_step_or_is_skipped(tmp_path, policy):
    config = _config()
    config.engine.on_nonfinite = policy
    engine = build_downstream(config, tmp_path, seed=0, progress=False)
    with torch.no_grad():
        engine.task.mlp.layers[0].weight.fill_(float("nan"))
    if policy == "stop":
        with pytest.raises(CannotLearn, match=r"non-finite loss \(nan\) at epoch 1, step 0, batch 0; lower"):
            engine.train_epoch()
    else:  # every batch skipped: the second skip of 5 batches is more than the 10% allowed
        with pytest.raises(CannotLearn, match=r"at epoch 1, step 0, batch 1: 2 of the epoch's 5 batches had a "
                                              r"non-finite loss, more than the 10% that engine\.on_nonfinite: skip "
                                              r"allows, so the run cannot learn; lower the learning rate or use fp32\.$"):
            engine.train_epoch()
        assert engine.step == 0 and engine.epoch == 0


def test_skipped_steps_within_the_bound_are_counted_in_the_record(tmp_path):
    """One non-finite loss in an epoch of 5 batches is skipped (at most max(1, 10%) are), and the epoch's record
    in metrics.jsonl names the count."""
    config = _config()
    config.engine.on_nonfinite = "skip"
    engine = build_downstream(config, tmp_path, seed=0, progress=False)
    forward, calls = engine.model.forward, []

    def one_nan(batch):
        loss, info = forward(batch)
        calls.append(1)
        return (loss * float("nan"), info) if len(calls) == 2 else (loss, info)

    engine.model.forward = one_nan
    engine.fit(1, selection_metric(config, engine.task))
    assert engine.step == 4 and _records(tmp_path)[0]["skipped_steps"] == 1


@pytest.mark.slow
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


def _files(run_dir):
    """{name: (bytes, mtime)} of every file in a run directory."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run_dir.iterdir()) if p.is_file()}


def _resumable(run_dir):
    """An engine built as script/downstream.py builds one (seeded before and after)."""
    run_dir.mkdir(exist_ok=True)
    seed_everything(0)
    engine = build_downstream(_config(("num_epoch", 2)), run_dir, seed=0, progress=False)
    torch.manual_seed(0)
    return engine


@pytest.mark.slow
def test_resume_in_process_continues_bit_identically(tmp_path):
    uninterrupted = _resumable(tmp_path / "a")
    metric = selection_metric(_config(), uninterrupted.task)
    uninterrupted.fit(2, metric)
    first = _resumable(tmp_path / "b")
    first.fit(1, metric)  # its last.pth holds epoch 1; metrics.jsonl ends with a final record after it
    resumed = _resumable(tmp_path / "b")
    torch.manual_seed(123), random.seed(123), np.random.seed(123)  # streams the checkpoint must restore
    assert resumed.resume(tmp_path / "b" / "last.pth") is None  # no position given to save
    assert [r["epoch"] for r in _records(tmp_path / "b")] == [1]
    resumed.fit(2, metric)
    a, b = checkpoint.load(tmp_path / "a" / "last.pth"), checkpoint.load(tmp_path / "b" / "last.pth")
    assert a["training"]["step"] == b["training"]["step"] and a["training"]["best"] == b["training"]["best"]
    a, b = checkpoint.task_state(a), checkpoint.task_state(b)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert _records(tmp_path / "a") == _records(tmp_path / "b")


def test_resume_returns_the_position_and_changes_no_file(tmp_path):
    engine = build_downstream(_config(), tmp_path, seed=0, progress=False)
    engine.record({"epoch": 1, "step": 5, "train": {"loss": 0.5}})
    position = {"units_done": 3, "species": [8, 9], "name": "split"}
    engine.save("last.pth", position=position)
    saved = checkpoint.load(tmp_path / "last.pth")
    assert saved["task_names"] == engine.task_names and len(engine.task_names) > 0
    assert saved["config"]["task"]["class"] == "MultipleBinaryClassification"
    for path in tmp_path.iterdir():  # an old mtime, so a rewrite with the same bytes would show
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    before = _files(tmp_path)
    again = build_downstream(_config(), tmp_path, seed=0, progress=False)
    assert again.resume(tmp_path / "last.pth") == position
    assert _files(tmp_path) == before  # metrics.jsonl matched the history: same bytes, same mtime, no new file
    assert again.history == engine.history and again.epoch == engine.epoch and again.best == engine.best
    # a record written after the checkpoint (the interrupted run's) is dropped from metrics.jsonl
    engine.record({"epoch": 2, "step": 10, "train": {"loss": 0.4}})
    build_downstream(_config(), tmp_path, seed=0, progress=False).resume(tmp_path / "last.pth")
    assert _records(tmp_path) == [{"epoch": 1, "step": 5, "train": {"loss": 0.5}}]


def test_resume_names_files_it_cannot_continue(tmp_path):
    engine = build_downstream(_config(), tmp_path, seed=0, progress=False)
    engine.save_weights("best.pth")
    saved = checkpoint.load(tmp_path / "best.pth")
    assert saved["training"] is None and checkpoint.task_state(saved).keys() == engine.task.state_dict().keys()
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"best\.pth holds model weights only; resume needs a last\.pth written during "
                             r"training \(use --ckpt to start from weights\)\.$"):
        engine.resume(tmp_path / "best.pth")
    torch.save(engine.task.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(checkpoint.CheckpointError, match=r"bare\.pth is not a training checkpoint of this framework"):
        engine.resume(tmp_path / "bare.pth")
    engine.save("last.pth")
    state = checkpoint.load(tmp_path / "last.pth")
    state["training"]["world_size"] = 2
    checkpoint.save_atomic(state, tmp_path / "two.pth")
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"two\.pth was written by 2 process\(es\) but 1 run now; resume with the same number\."):
        engine.resume(tmp_path / "two.pth")


def test_engine_options_are_checked():
    config = _config()
    config.engine.precision = "fp8"
    with pytest.raises(ValueError, match=r"engine\.precision must be fp32, bf16 or fp16, got 'fp8'\."):
        build_downstream(config, None, seed=0, progress=False)
    config = _config()
    config.engine.on_nonfinite = "ignore"
    with pytest.raises(ValueError, match=r"engine\.on_nonfinite must be 'stop' or 'skip', got 'ignore'\."):
        build_downstream(config, None, seed=0, progress=False)


class _Stop(Exception):
    pass


def _steps_schedule(engine, num_epoch, metric):
    """Fine-tuning epochs with a checkpoint (scored) every 2 optimizer steps inside each epoch."""
    return (Stage(engine.sets["train"], metric=metric, save_every=2) for _ in range(engine.epoch, num_epoch))


def test_checkpoints_inside_an_epoch_resume_exactly(tmp_path):
    """A run stopped right after a checkpoint inside an epoch (`Stage.save_every`) and resumed from it ends with the
    parameters, records, best epoch and sample count of the uninterrupted run."""
    uninterrupted = _resumable(tmp_path / "a")
    metric = selection_metric(_config(), uninterrupted.task)
    uninterrupted.run(_steps_schedule(uninterrupted, 2, metric))
    stopped = _resumable(tmp_path / "b")
    saves = []

    def save_then_stop(name, position=None, save=stopped.save):
        save(name, position)
        saves.append(name)
        if len(saves) == 2:  # at step 4 of epoch 1's 5, after its validation
            raise _Stop

    stopped.save = save_then_stop
    with pytest.raises(_Stop):
        stopped.run(_steps_schedule(stopped, 2, metric))
    within = checkpoint.load(tmp_path / "b" / "last.pth")["training"]["within"]
    assert stopped.epoch == 0 and within[0]["batch"] == 4 and stopped.step == 4
    resumed = _resumable(tmp_path / "b")
    torch.manual_seed(123), random.seed(123), np.random.seed(123)  # streams the checkpoint must restore
    resumed.resume(tmp_path / "b" / "last.pth")
    assert resumed.epoch == 0 and resumed.step == 4 and resumed.samples == 4 * 8
    resumed.run(_steps_schedule(resumed, 2, metric))
    a, b = checkpoint.load(tmp_path / "a" / "last.pth"), checkpoint.load(tmp_path / "b" / "last.pth")
    assert a["training"]["step"] == b["training"]["step"] and a["training"]["best"] == b["training"]["best"]
    assert a["training"]["samples"] == b["training"]["samples"] == 2 * len(uninterrupted.sets["train"]) == 80
    assert "within" not in a["training"] and "within" not in b["training"]
    a, b = checkpoint.task_state(a), checkpoint.task_state(b)
    assert all(torch.equal(a[key], b[key]) for key in a)
    records = _records(tmp_path / "a")
    assert records == _records(tmp_path / "b")
    assert [r["epoch"] for r in records] == [pytest.approx(e) for e in (0.4, 0.8, 1, 1.2, 1.6, 2)]
