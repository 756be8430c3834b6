"""Runs that cannot learn, interrupted runs and their processes: one row per case, with the sentence the user
reads, the exit code, and that nothing was lost (the run directory's files from before are intact, or the run
resumes) and nothing left running (workers of a killed parent, ranks of an interrupted torchrun)."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import finish, run_command, run_dir_of
from esm_gearnet import checkpoint

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "config" / "demo" / "esm_gearnet.yaml"
SMALL = ["--num_protein", "16", "--batch_norm", "False"]
# the demo whose learning rate is multiplied by 1e9 after each epoch: epoch 1 learns at 1e-3 and writes its
# checkpoints, a resumed epoch 2 runs at 1e6
STEP_UP = """scheduler:
  class: StepLR
  step_size: 1
  gamma: 1.0e+9
"""


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


def _downstream(*options):
    return [sys.executable, "-m", "esm_gearnet", "downstream", *options]


def _hashes(run_dir, leave_out=("log.txt",)):
    """{name: sha256} of the files of a run directory (log.txt, which a run appends to, left out)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(run_dir).iterdir())
            if p.is_file() and p.name not in leave_out}


def _epoch_records(run_dir):
    return [line for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if '"epoch"' in line]


def _last_line(path):
    return Path(path).read_text().rstrip("\n").splitlines()[-1]


@pytest.fixture(scope="module")
def step_up_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "step_up.yaml"
    text = DEMO.read_text()
    start = text.index("scheduler:")
    path.write_text(text[:start] + STEP_UP + text[text.index("\nengine:", start) + 1:])
    return path


@pytest.fixture(scope="module")
def learned(step_up_config, tmp_path_factory):
    """A finished 1-epoch run of the step-up demo (6 batches of 2): its last.pth holds the learning rate 1e6."""
    out = tmp_path_factory.mktemp("learned")
    result = run_command(_downstream("-c", step_up_config, *SMALL, "--batch_size", "2", "--num_epoch", "1",
                                     "--output_dir", out), 300, cwd=ROOT, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir_of(out)


# ---- runs that cannot learn: one sentence, exit code 2, the run's files intact ------------------------------
CANNOT_LEARN = {  # option of the resumed run: the sentence's words
    "stop": ([], r"non-finite loss \(nan\) at epoch 2, step \d+, batch \d+; lower the learning rate, use fp32, or "
                 r"set engine\.on_nonfinite: skip to skip such steps\."),
    "skip": (["--engine.on_nonfinite", "skip"],
             r"non-finite loss \(nan\) at epoch 2, step \d+, batch \d+: 2 of the epoch's 6 batches had a non-finite "
             r"loss, more than the 10% that engine\.on_nonfinite: skip allows, so the run cannot learn; lower the "
             r"learning rate or use fp32\."),
}


@pytest.mark.parametrize("policy", CANNOT_LEARN)
def test_a_run_that_cannot_learn_stops_in_one_sentence(step_up_config, learned, tmp_path, policy):
    """Epoch 2 at learning rate 1e6: its losses become NaN. "stop" ends at the first, "skip" once more than 10%
    of the epoch's batches were skipped (was: a FloatingPointError traceback, exit 1; or, skipping 46 of 48
    steps, exit 0 with a best epoch at chance level)."""
    import re

    run_dir = tmp_path / "run"
    shutil.copytree(learned, run_dir)
    before, epochs = _hashes(run_dir, ("log.txt", "metrics.jsonl")), _epoch_records(run_dir)
    options, sentence = CANNOT_LEARN[policy]
    result = run_command(_downstream("-c", step_up_config, *SMALL, "--batch_size", "2", "--num_epoch", "2",
                                     *options, "--output_dir", tmp_path, "--resume", run_dir), 300,
                         cwd=ROOT, env=_env())
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.fullmatch("error: " + sentence, result.stderr.rstrip("\n").splitlines()[-1]), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    log = (run_dir / "log.txt").read_text()
    assert re.fullmatch(r"\d\d:\d\d:\d\d error: " + sentence, _last_line(run_dir / "log.txt"))
    assert "Traceback" not in log
    # last.pth, best.pth, config.yaml, curves.png untouched; metrics.jsonl keeps epoch 1 (a resume drops only the
    # records written after its checkpoint: here the finished run's final summary)
    assert _hashes(run_dir, ("log.txt", "metrics.jsonl")) == before and _epoch_records(run_dir) == epochs


# ---- Ctrl-C: one line, exit code 130, the run resumes -------------------------------------------------------
def _default_sigint():
    """A child started from a shell's background job inherits SIGINT ignored; Ctrl-C reaches it as in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_and_wait_for_checkpoint(command, out, timeout=240):
    process = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True, preexec_fn=_default_sigint)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        found = list(Path(out).glob("*/*/*/*/last.pth"))
        if found:
            return process, found[0].parent
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    _, stderr = process.communicate()
    pytest.fail(f"no checkpoint within {timeout} s: {stderr[-3000:]}")


def _group_members(pgid):
    """Pids of the live (not zombie) processes of process group `pgid`, read from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            members.append(int(stat.parent.name))
    return members


def test_ctrl_c_ends_a_run_in_one_line_and_it_resumes(tmp_path):
    """SIGINT after the first checkpoint: "interrupted; resume with --resume RUN" on the terminal and in log.txt,
    exit code 130, no traceback; the config is intact and --resume continues (was: a KeyboardInterrupt traceback
    in the log)."""
    process, run_dir = _start_and_wait_for_checkpoint(
        _downstream("-c", DEMO, *SMALL, "--batch_size", "4", "--num_epoch", "100", "--output_dir", tmp_path), tmp_path)
    config = (run_dir / "config.yaml").read_bytes()
    time.sleep(0.5)  # inside an epoch, most likely
    process.send_signal(signal.SIGINT)
    _, stderr = finish(process, 60)
    sentence = f"interrupted; resume with --resume {run_dir}"
    assert process.returncode == 130 and stderr.rstrip("\n").splitlines()[-1] == sentence, stderr[-3000:]
    assert "Traceback" not in stderr and "Traceback" not in (run_dir / "log.txt").read_text()
    assert _last_line(run_dir / "log.txt").endswith(" " + sentence)
    assert (run_dir / "config.yaml").read_bytes() == config
    epoch = checkpoint.load(run_dir / "last.pth")["epoch"]
    resumed = run_command(_downstream("--resume", run_dir, "--train.num_epoch", str(epoch + 1)), 300, cwd=ROOT,
                          env=_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "epoch" in r] == list(range(1, epoch + 2)) and "final" in records[-1]


@pytest.mark.parametrize("checkpointed", [True, False], ids=["after a checkpoint", "before one"])
def test_ctrl_c_inside_any_training_command_becomes_its_line(tmp_path, checkpointed):
    """Fine-tuning and pre-training share `training.training_run`: a KeyboardInterrupt inside it becomes
    `errors.Interrupted`, whose sentence says whether and how to resume, and log.txt gets that line."""
    from esm_gearnet.errors import Interrupted
    from esm_gearnet.commands.run import training_run

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as error:
        with training_run(["-c", str(DEMO), *SMALL, "--output_dir", str(tmp_path)], "test") as (_, _, run_dir, _):
            if checkpointed:
                (run_dir / "last.pth").write_bytes(b"weights")
            raise KeyboardInterrupt
    assert signal.getsignal(signal.SIGINT) is handler  # ignored only during the clean-up
    wanted = (f"interrupted; resume with --resume {run_dir}" if checkpointed else
              f"interrupted before the first checkpoint; nothing in {run_dir} to resume, start the run again")
    assert str(error.value) == wanted and _last_line(run_dir / "log.txt").endswith(" " + wanted)
    assert error.value.__cause__ is None and error.value.__suppress_context__


@pytest.mark.slow
def test_ctrl_c_under_torchrun_ends_every_rank(tmp_path):
    """Ctrl-C in a terminal: SIGINT to torchrun and both ranks (torchrun forwards it too). Each rank ends with the
    one line, nothing of the process group stays alive, and no traceback of this framework is printed."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "script/downstream.py", "-c", str(DEMO), *SMALL, "--batch_size", "2", "--num_epoch", "100",
               "--output_dir", str(tmp_path)]
    process, run_dir = _start_and_wait_for_checkpoint(command, tmp_path)
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = finish(process, 120)
    sentence = f"interrupted; resume with --resume {run_dir}"
    assert stderr.count(sentence) == 2, stderr[-3000:]  # one line per rank
    assert f'File "{ROOT / "esm_gearnet"}' not in stderr, stderr[-3000:]
    assert _last_line(run_dir / "log.txt").endswith(" " + sentence)
    deadline = time.monotonic() + 10
    while _group_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_members(process.pid)
    checkpoint.load(run_dir / "last.pth")  # whole and verified by its digest


# ---- workers end with their parent --------------------------------------------------------------------------
PARENT = """
import sys, time
from esm_gearnet.data.parallel import ordered_map

def parse(job):
    time.sleep(120)  # a long parse
    return job

if __name__ == "__main__":
    for _ in ordered_map(parse, list(range(8)), workers=2, progress=False):
        pass
"""


def _alive(pid):
    """Whether `pid` is a live process (a zombie waiting for PID 1 to reap it counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _children(pid):
    return [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat")
            if _read_ppid(stat) == pid]


def _read_ppid(stat):
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill -9", "SIGTERM"])
def test_workers_end_when_their_parent_is_killed(tmp_path, how):
    """kill -9 of `embed`, SIGTERM of a dataset build, while its 2 workers parse: both workers are gone within
    seconds (were: alive under PID 1, 180 MB each, after 90 s)."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline, workers = time.monotonic() + 60, []
        while len(workers) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.1)
            workers = _children(parent.pid)
        assert len(workers) == 2, f"the parent did not start 2 workers: {parent.stderr.read()[-3000:]}"
        time.sleep(0.5)  # the workers are inside a job
        parent.send_signal(how)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers)), f"workers {[w for w in workers if _alive(w)]} outlived their parent"
    finally:
        try:
            os.killpg(parent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        parent.communicate()


# ---- resuming at another number of processes: refused before anything is built ------------------------------
def test_resume_at_another_world_size_is_refused_before_building(learned, tmp_path, cli, monkeypatch):
    """A last.pth written by 2 ranks, resumed by 1 process: refused by `checkpoint.check_resumable` before the
    dataset and model (was: after 9 s of building)."""
    from esm_gearnet.commands import finetune

    run_dir = tmp_path / "run"
    shutil.copytree(learned, run_dir)
    state = checkpoint.load(run_dir / "last.pth")
    state["training"]["world_size"] = 2
    checkpoint.save_atomic(state, run_dir / "last.pth")
    before = _hashes(run_dir)

    def build(*args, **kwargs):
        raise AssertionError("the run was built before its checkpoint was refused")

    monkeypatch.setattr(finetune, "build_downstream", build)
    code, _, err = cli("downstream", "--resume", run_dir)
    assert code == 2 and err.strip() == (f"error: {run_dir / 'last.pth'} was written by 2 process(es) but 1 run "
                                         "now; resume with the same number."), err
    assert _hashes(run_dir) == before


# ---- report on a torn metrics.jsonl ---------------------------------------------------------------------------
def test_report_draws_a_run_whose_last_line_is_cut_off_and_names_a_damaged_line(learned, tmp_path, cli, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(learned, run_dir)
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines) + "\n" + lines[0][:40])  # a record cut off while being written
    code, out, _ = cli("report", run_dir, "-o", tmp_path / "report.png")
    assert code == 0 and (tmp_path / "report.png").is_file(), out
    assert f"{metrics} line {len(lines) + 1} is cut off" in caplog.text
    metrics.write_text(lines[0][:40] + "\n" + "\n".join(lines) + "\n")  # damaged before its last line
    code, _, err = cli("report", run_dir, "-o", tmp_path / "report.png")
    assert code == 2 and err.startswith(f"error: {metrics} line 1 is not a JSON record ("), err


def test_ctrl_c_while_a_checkpoint_is_written_is_raised_once_it_is_whole(tmp_path, monkeypatch):
    """torch.save interrupted inside its zip writer raised a RuntimeError of its own ("unexpected pos"), and a run
    under torchrun printed a traceback instead of its line (found by CI): the Ctrl-C waits for the file."""
    import os
    import signal

    import torch

    from esm_gearnet import checkpoint

    save = torch.save

    def interrupted_save(obj, handle):  # SIGINT arrives in the middle of the write
        handle.write(b"")
        os.kill(os.getpid(), signal.SIGINT)
        save(obj, handle)

    monkeypatch.setattr(torch, "save", interrupted_save)
    content = {"weights": torch.randn(300, 300)}
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic(content, tmp_path / "last.pth")
    monkeypatch.undo()
    torch.testing.assert_close(checkpoint.load(tmp_path / "last.pth")["weights"], content["weights"])
