"""The GPU check (benchmarks/gpu_check.py) rehearsed on the CPU through its own code: each step in a process session
of its own, the report and the log rewritten after every step, a step past its limit killed with its children."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _check(out: Path, *options: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "benchmarks/gpu_check.py", "--rehearse", "--out", str(out), *options],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _rows(report: str):
    """{step: state} of the report's table."""
    return {step: state for step, state in re.findall(r"^\| ([\w-]+) \| ([^|]+) \|", report, re.M)
            if step != "step"}


def test_two_steps_and_a_planted_overrun(tmp_path):
    check = _check(tmp_path, "--only", "peak,graphs,planted-overrun")
    report = tmp_path / "report.md"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the overrun is running: the steps before it are already reported
        rows = _rows(report.read_text()) if report.exists() else {}
        if rows.get("planted-overrun", "").strip() == "running":
            break
        time.sleep(0.1)
    else:
        check.kill()
        pytest.fail("the planted step never showed as running in the report")
    assert rows["peak"].strip() == "ok" and rows["graphs"].strip() == "ok"
    log = (tmp_path / "gpu_check.log").read_text()
    assert '"benchmark": "peak"' in log and '"benchmark": "graph_construction"' in log  # full outputs so far
    output, _ = check.communicate(timeout=60)
    assert check.returncode == 0, output
    rows = _rows(report.read_text())
    assert rows["planted-overrun"].strip() == "timed out, killed"
    (child,) = re.findall(r"^child (\d+)$", (tmp_path / "gpu_check.log").read_text(), re.M)
    time.sleep(0.5)
    assert not _alive(int(child)), "the planted step's child outlived the kill"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.log", "report.md", "results.json"]


def test_a_step_that_does_not_fit_the_deadline_is_skipped_and_named(tmp_path):
    check = _check(tmp_path, "--only", "peak,ec-step", "--deadline", "30")
    output, _ = check.communicate(timeout=120)
    rows = _rows((tmp_path / "report.md").read_text())
    assert rows["peak"].strip() == "ok"
    assert rows["ec-step"].startswith("skipped: expected 45 s"), output


@pytest.mark.slow
def test_the_whole_rehearsal_runs_every_step_in_under_3_minutes(tmp_path):
    start = time.monotonic()
    check = _check(tmp_path)
    output, _ = check.communicate(timeout=300)
    seconds = time.monotonic() - start
    rows = _rows((tmp_path / "report.md").read_text())
    assert check.returncode == 0, output
    assert list(rows) == ["cuda-tests", "peak", "esm-650m", "ec-step", "embed", "graphs", "planted-overrun"]
    assert all(state.strip() == "ok" for step, state in rows.items() if step != "planted-overrun"), rows
    assert seconds < 180
