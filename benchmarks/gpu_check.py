"""The GPU check in one call: the steps that matter most first, each in a process session of its own under its own
limit, the report and the log rewritten after every step, the steps that no longer fit the deadline skipped and
named.

    python benchmarks/gpu_check.py --out DIR [--deadline 480] [--only NAME,...]     (on a CUDA machine)
    python benchmarks/gpu_check.py --out DIR --rehearse                              (the same run, on the CPU)

Steps, in priority order (`STEPS`): the CUDA tests (with ESM_GEARNET_REQUIRE_DATA=1: data the tests read and
that is missing fails them); the bf16 matrix-product peak of this device (`benchmarks/peak.py`, the denominator
of every MFU figure after it); ESM-2 650M bf16 forward + backward, padded and unpadded (`esm_attention.py`,
MFU); the EC training step against the original path (`train_step.py`, a few levers, its references at a small
fixed batch); frozen ESM-2 embedding proteins/s and tokens/s on real lengths (`embed.py`); graph construction.
CPU rows of the benchmarks are skipped on CUDA, and their models are built on the device.

Each step's output goes unbuffered, as it comes, into `DIR/gpu_check.log` (every step's full output so far);
after each step `DIR/report.md` (the device, torch and CUDA versions, each step's state, seconds and `RESULT`
lines) and `DIR/results.json` are rewritten: a run cut short keeps everything up to its last step. A step that
runs past its limit is killed with all its processes (its session, and every descendant that left it). Each
step's expected seconds are printed before it; a step whose expected time no longer fits before the deadline is
skipped and named, and a step that starts runs for at most the time left.

`--rehearse` runs every step on the CPU with tiny sizes and short limits through this same code, plus a planted
step that overruns its limit with a child process of its own, which must be killed with it (under 3 minutes).
"""
import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
FILES = ("report.md", "gpu_check.log", "results.json")  # everything the check writes into --out


@dataclass
class Step:
    name: str
    command: Callable[[Dict], List[str]]  # context ({"peak": TFLOP/s or None}) -> argv
    limit: float       # seconds on CUDA
    expected: float    # seconds it usually takes on one H200
    rehearse: Callable[[Dict], List[str]]  # the same step, tiny, on the CPU
    rehearse_limit: float = 40.0
    env: Dict[str, str] = field(default_factory=dict)


def _peak(context) -> List[str]:
    return ["--peak-tflops", str(context["peak"])] if context.get("peak") else []


STEPS = [
    Step("cuda-tests", lambda c: [PY, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
         limit=170, expected=110,
         rehearse=lambda c: [PY, "-m", "pytest", "-q", "-m", "cuda", "--co", "-p", "no:cacheprovider", "tests"],
         env={"ESM_GEARNET_REQUIRE_DATA": "1"}),
    Step("peak", lambda c: [PY, "benchmarks/peak.py", "--size", "8192"], limit=40, expected=10,
         rehearse=lambda c: [PY, "benchmarks/peak.py", "--size", "256", "--repeats", "3"]),
    Step("esm-650m", lambda c: [PY, "benchmarks/esm_attention.py", "--part", "2", "--esm", "33,1280,20",
                                "--repeats", "2", "--max-proteins", "32", *_peak(c)], limit=120, expected=50,
         rehearse=lambda c: [PY, "benchmarks/esm_attention.py", "--part", "2", "--esm", "2,64,4", "--repeats", "1",
                             "--max-proteins", "4", "--batch", "2", *_peak(c)]),
    Step("ec-step", lambda c: [PY, "benchmarks/train_step.py", "--esm", "33,1280,20", "--batch", "8", "--repeats",
                               "2", "--max-proteins", "32", "--levers", "baseline,sparse,bf16,unpadded,frozen",
                               *_peak(c)], limit=150, expected=90,
         rehearse=lambda c: [PY, "benchmarks/train_step.py", "--esm", "2,64,4", "--batch", "2", "--repeats", "1",
                             "--max-proteins", "4", "--levers", "sparse"], rehearse_limit=90),
    Step("embed", lambda c: [PY, "benchmarks/embed.py", "--sizes", "650M", "--rounds", "2", *_peak(c)],
         limit=90, expected=40,
         rehearse=lambda c: [PY, "benchmarks/embed.py", "--sizes", "tiny", "--rounds", "1", "--proteins", "4",
                             *_peak(c)]),
    Step("graphs", lambda c: [PY, "benchmarks/graph_construction.py", "--repeats", "3"], limit=40, expected=15,
         rehearse=lambda c: [PY, "benchmarks/graph_construction.py", "--repeats", "1", "--max-proteins", "8"]),
]
# a step that overruns its limit, with a child of its own that must die with it (the rehearsal's proof)
OVERRUN = Step("planted-overrun", lambda c: [], limit=0, expected=1, rehearse_limit=3, rehearse=lambda c: [
    PY, "-c", "import os, subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
    "'import time; time.sleep(600)']); print('child', child.pid, flush=True); time.sleep(600)"])


def descendants(pid: int) -> List[int]:
    """Every process below `pid` (from /proc), also those that started sessions of their own."""
    children: Dict[int, List[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_all(process: subprocess.Popen) -> None:
    """The step's session and every descendant: SIGTERM, then SIGKILL after 5 s."""
    pids = [process.pid] + descendants(process.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        groups = set()
        for pid in pids:
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
        for group in groups:
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            process.wait(timeout=5)
            if sig == signal.SIGTERM and not any(_alive(pid) for pid in pids[1:]):
                return
        except subprocess.TimeoutExpired:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")
    return not (state.exists() and state.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def device_lines(rehearse: bool) -> List[str]:
    import torch

    if rehearse or not torch.cuda.is_available():
        device = "CPU rehearsal (no GPU figures: the sizes are tiny)"
    else:
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name}, {props.total_memory / 2 ** 30:.0f} GiB, {torch.cuda.device_count()} visible"
    return [f"- device: {device}", f"- torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"Python {sys.version.split()[0]}", f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}"]


class Check:
    def __init__(self, out: Path, steps: List[Step], rehearse: bool, deadline: float):
        self.out, self.steps, self.rehearse, self.deadline = out, steps, rehearse, deadline
        out.mkdir(parents=True, exist_ok=True)
        self.log = out / "gpu_check.log"
        self.log.write_text("")
        self.rows: List[Dict] = []
        self.header = device_lines(rehearse)
        self.context: Dict = {"peak": None}

    def write(self) -> None:
        lines = ["# GPU check" + (" (CPU rehearsal)" if self.rehearse else ""), "", *self.header,
                 f"- deadline: {self.deadline:.0f} s", "", "| step | state | seconds | expected | limit |",
                 "|---|---|---|---|---|"]
        lines += [f"| {r['step']} | {r['state']} | {r.get('seconds', '')} | {r['expected']} | {r.get('limit', '')} |"
                  for r in self.rows]
        for row in self.rows:
            if row.get("results") or row.get("tail"):
                lines += ["", f"## {row['step']}", "", f"`{row['command']}`", "", "```"]
                lines += [f"RESULT {json.dumps(r)}" for r in row.get("results", [])] or row.get("tail", [])
                lines += ["```"]
        _replace(self.out / "report.md", "\n".join(lines) + "\n")
        _replace(self.out / "results.json", json.dumps(self.rows, indent=1) + "\n")

    def run(self) -> int:
        started = time.monotonic()
        failed = 0
        for step in self.steps:
            left = self.deadline - (time.monotonic() - started)
            limit = step.rehearse_limit if self.rehearse else step.limit
            expected = limit / 2 if self.rehearse else step.expected  # tiny sizes: half the rehearsal's limit
            command = (step.rehearse if self.rehearse else step.command)(self.context)
            row = {"step": step.name, "expected": expected, "command": " ".join(_short(c) for c in command)}
            self.rows.append(row)
            if expected > left:
                row["state"] = f"skipped: expected {expected:.0f} s, {max(left, 0):.0f} s left before the deadline"
                print(f"[{step.name}] {row['state']}", flush=True)
                self.write()
                continue
            limit = min(limit, left)
            row.update(state="running", limit=round(limit))
            print(f"[{step.name}] expected {expected:.0f} s, limit {limit:.0f} s: {row['command']}", flush=True)
            self.write()
            code, seconds, output = self.run_step(step, command, limit)
            row["seconds"] = round(seconds, 1)
            row["state"] = "ok" if code == 0 else ("timed out, killed" if code is None else f"failed (exit {code})")
            row["results"] = [json.loads(line[7:]) for line in output.splitlines() if line.startswith("RESULT {")]
            if not row["results"] or code != 0:
                row["tail"] = output.splitlines()[-25:]
            if step.name == "peak" and row["results"]:
                self.context["peak"] = row["results"][-1]["tflops"]
            failed += code != 0 and step is not OVERRUN
            print(f"[{step.name}] {row['state']} in {seconds:.1f} s", flush=True)
            self.write()
        return 1 if failed else 0

    def run_step(self, step: Step, command: List[str], limit: float):
        """(exit code, or None when killed at its limit; seconds; its output)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **step.env}
        if self.rehearse:
            env["CUDA_VISIBLE_DEVICES"] = ""  # the rehearsal is the CPU run, even on a GPU machine
        with open(self.log, "a") as log:
            log.write(f"\n===== {step.name}: {' '.join(command)}\n")
            log.flush()
            start = log.tell()
            begun = time.monotonic()
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                code = process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                kill_all(process)
                code = None
            seconds = time.monotonic() - begun
            log.write(f"===== {step.name}: {'killed at its limit' if code is None else f'exit {code}'} "
                      f"after {seconds:.1f} s\n")
        with open(self.log) as log:
            log.seek(start)
            return code, seconds, log.read()


def _short(part: str) -> str:
    return "python" if part == PY else (part if re.fullmatch(r"[\w./,=:-]+", part) else json.dumps(part))


def _replace(path: Path, text: str) -> None:
    """Write `text` into `path` whole (a temporary file renamed over it)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder of report.md, gpu_check.log, "
                        "results.json")
    parser.add_argument("--deadline", type=float, default=None, help="seconds for all steps (default: 480 on "
                        "CUDA, 170 in the rehearsal)")
    parser.add_argument("--rehearse", action="store_true", help="every step on the CPU, tiny, with the planted "
                        "overrun")
    parser.add_argument("--only", default=None, help="comma-separated step names (" + ", ".join(
        s.name for s in STEPS + [OVERRUN]) + ")")
    args = parser.parse_args(argv)
    steps = STEPS + ([OVERRUN] if args.rehearse else [])
    if args.only:
        wanted = args.only.split(",")
        unknown = [n for n in wanted if n not in {s.name for s in STEPS + [OVERRUN]}]
        if unknown:
            parser.error(f"unknown step(s) {', '.join(unknown)}")
        steps = [s for s in STEPS + [OVERRUN] if s.name in wanted]
    if not args.rehearse:
        import torch

        if not torch.cuda.is_available():
            print("gpu-check: no CUDA device here; run with --rehearse to try the check on the CPU.",
                  file=sys.stderr)
            return 2
    deadline = args.deadline or (170.0 if args.rehearse else 480.0)
    check = Check(args.out, steps, args.rehearse, deadline)
    code = check.run()
    print((args.out / "report.md").read_text())
    return code


if __name__ == "__main__":
    sys.exit(main())
