"""The GPU check: the CUDA tests and the GPU benchmarks in one call that fits its budget and loses nothing.

    python benchmarks/gpu_check.py --out DIR [--data DIR] [--deadline S] [--only STEP,...]   (on a CUDA machine)
    python benchmarks/gpu_check.py --rehearse --out DIR       every step on the CPU, tiny sizes, short limits
    python benchmarks/gpu_check.py --print-command            the one command line for the GPU machine
    python benchmarks/gpu_check.py --pack-data                copy the data the steps read into .gpu/data

Steps run in priority order (`STEPS`), each in a process session of its own with its own time limit, killed
with all its children at that limit (benchmarks/step_process.py); output unbuffered. After every step the
output folder holds, rewritten:

    report.md      the device, driver, torch and CUDA versions, a table of the steps (status, seconds, expected,
                   limit) and the last lines of every step's output (where the scripts print their figures)
    log.txt        every step's full output so far, as it was printed
    results.json   the status of every step and its `RESULT {...}` lines, parsed

The check owns the GPU budget: a global deadline (8 minutes by default on CUDA), each step's expected time
printed before it runs and its limit cut to the time left; a step whose expected time no longer fits is
skipped and named. Models are built on the device; references run at small fixed batches; CPU rows are not run
on CUDA. The tests run with ESM_GEARNET_REQUIRE_DATA=1: a test that would skip for missing data fails.

`--rehearse` runs every step on the CPU with tiny sizes through the same code (step processes, report after
each step, the deadline), plus a planted step that overruns its limit (benchmarks/planted_overrun.py), which
must be killed with its children and leave no process; the whole rehearsal takes under 3 minutes.

Without CUDA and without --rehearse it says so in one line and exits 0. Left out of the steps for time:
saprot_step.py (SaProt against ESM-2 of one size: equal within the run-to-run spread on the CPU) and
esm_attention.py's part 1 (equal lengths, no padding); run them by hand when a GPU session has time left.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.step_process import Outcome, run_step  # noqa: E402

# What the steps read: the CUDA tests (structures, alphafold via all_proteins, fidelity) and the benchmarks
# (structures, alphafold). Carried to the GPU machine as .gpu/data (`--pack-data`).
DATA_FOLDERS = ("structures", "alphafold", "fidelity")
CARRIED = Path(".gpu")  # relative to the repository root: wheels/ and data/
REPORT, LOG, RESULTS = "report.md", "log.txt", "results.json"
DEADLINE = {"cuda": 480.0, "rehearse": 170.0}


@dataclass
class Step:
    """One step: `args` follow the Python executable, with {device}, {peak} (TFLOP/s measured by the peak step,
    0 until then: the script measures its own) and {results} (the results file) filled in at run time.
    `limit` and `expected` are seconds on one H200 (estimates until measured there); `rehearse_*` the CPU
    rehearsal's arguments and seconds. A step with `args` None runs only in the rehearsal."""
    name: str
    what: str
    args: Optional[List[str]]
    limit: float
    expected: float
    rehearse_args: List[str]
    rehearse_limit: float
    rehearse_expected: float
    must_time_out: bool = False  # the planted step: killed at its limit is its success

    def plan(self, rehearse: bool):
        """(args, limit, expected) for this run."""
        if rehearse:
            return self.rehearse_args, self.rehearse_limit, self.rehearse_expected
        return self.args, self.limit, self.expected


ESM_650M = ["--esm", "33,1280,20"]
TINY_EC = ["-c", "config/demo/esm_gearnet.yaml", "--esm", "2,64,4"]  # GearNet 3 x 64 and a 2-layer ESM-2
COMMON = ["--device", "{device}"]
PEAK = ["--peak-tflops", "{peak}"]
STEPS = [
    Step("cuda_tests", "the tests marked `cuda` (missing data fails them, never skips them)",
         ["-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "--continue-on-collection-errors", "tests"],
         180, 100,
         ["-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "--continue-on-collection-errors", "tests"],
         90, 25),
    Step("peak", "the matrix-product peak (bf16 8192^3 on CUDA): the denominator of every MFU figure",
         ["benchmarks/peak.py", *COMMON], 40, 15,
         ["benchmarks/peak.py", *COMMON, "--size", "1024", "--repeats", "5"], 30, 5),
    Step("overrun", "planted: a step that overruns its limit, to be killed with its children",
         None, 0, 0, ["benchmarks/planted_overrun.py", "{results}"], 3, 3, must_time_out=True),
    Step("esm_mfu", "ESM-2 650M bf16 forward and forward + backward on real lengths, padded vs varlen, MFU",
         ["benchmarks/esm_attention.py", "--part", "2", *ESM_650M, "--precision", "bf16", "--repeats", "3",
          *COMMON, *PEAK], 100, 45,
         ["benchmarks/esm_attention.py", "--part", "2", "--esm", "2,64,4", "--precision", "fp32", "--repeats", "1",
          "--max-proteins", "8", *COMMON, *PEAK], 40, 15),
    Step("ec_step", "the EC training step with ESM-2 650M against the original path, a few levers, and ESM C of "
         "the same size in place of ESM-2",
         ["benchmarks/train_step.py", *ESM_650M, "--batch", "8", "--repeats", "2", "--max-proteins", "48",
          "--levers", "baseline,bf16,unpadded,frozen,esmc", *COMMON, *PEAK], 180, 100,
         ["benchmarks/train_step.py", *TINY_EC, "--batch", "4", "--repeats", "1", "--max-proteins", "8",
          "--levers", "baseline,unpadded,esmc", *COMMON, *PEAK], 75, 35),
    Step("embed", "frozen ESM-2 8M-650M embedding proteins/s and tokens/s: embed's path vs fair-esm, transformers",
         ["benchmarks/embed.py", "--sizes", "8M,35M,150M,650M", "--precision", "fp32,bf16", "--proteins", "32",
          "--batch", "8", "--rounds", "2", *COMMON, *PEAK], 120, 60,
         ["benchmarks/embed.py", "--sizes", "2x64x4", "--precision", "fp32", "--proteins", "4", "--batch", "2",
          "--rounds", "1", *COMMON, *PEAK], 60, 20),
    Step("foldcomp_embed", "embed from a FoldComp database: frozen ESM-2 650M, bf16, unpadded, length-bucketed, "
         "proteins/s (the aim: 3 M an hour, 830/s)",
         ["benchmarks/embed_stream.py", *ESM_650M, "--entries", "20000", "--warmup", "2000", "--precision", "bf16",
          "--workers", "8", *COMMON], 150, 70,
         ["benchmarks/embed_stream.py", "--esm", "2,64,4", "--entries", "200", "--warmup", "50", "--precision",
          "fp32", "--workers", "1", "--shard-size", "100", *COMMON], 60, 20),
    Step("sharding", "engine.strategy fsdp on one GPU vs the plain run (fp32, bf16); ESM-2 3B serial fusion, one "
         "step with LoRA and with full fine-tuning under fsdp + activation checkpointing: peak memory, tokens/s",
         ["benchmarks/sharding.py", "--part", "gpu", *COMMON], 180, 100,
         ["benchmarks/sharding.py", "--part", "gpu", "--small-esm", "2,64,4", "--big-esm", "2,64,4", "--length", "64",
          "--steps", "2", "--gearnet", "32,32", *COMMON], 75, 30),
    Step("graph_construction", "EC graph construction proteins/s",
         ["benchmarks/graph_construction.py", *COMMON], 45, 15,
         ["benchmarks/graph_construction.py", *COMMON, "--max-proteins", "8", "--repeats", "1"], 30, 6),
    Step("encoders", "structure encoders forward + backward proteins/s",
         ["benchmarks/encoders.py", *COMMON], 60, 25,
         ["benchmarks/encoders.py", *COMMON, "--batch-size", "1", "--repeats", "1", "--width", "16"], 40, 12),
    Step("largest_batch", "the largest batch of the unpadded EC step (ESM-2 650M, bf16) that fits",
         ["benchmarks/train_step.py", *ESM_650M, "--batch", "8", "--repeats", "1", "--max-proteins", "48",
          "--levers", "unpadded", "--max-batch", "unpadded", "--batch-limit", "512", *COMMON, *PEAK], 120, 90,
         ["benchmarks/train_step.py", *TINY_EC, "--batch", "2", "--repeats", "1", "--max-proteins", "4",
          "--levers", "unpadded", "--max-batch", "unpadded", "--batch-limit", "4", *COMMON, *PEAK], 60, 25),
]


@dataclass
class Record:
    """A step's line in the report and in results.json."""
    name: str
    what: str
    command: str
    expected: float
    limit: float
    status: str = "pending"
    seconds: Optional[float] = None
    results: List[Dict] = field(default_factory=list)
    tail: List[str] = field(default_factory=list)
    passed: Optional[bool] = None


def command_line() -> str:
    """The one command line for the GPU machine (run in the repository root, with .gpu carried and OUT set)."""
    return (
        f'D={CARRIED}/data; W={CARRIED}/wheels; for f in {" ".join(DATA_FOLDERS)}; do [ -d "$D/$f" ] || {{ echo '
        '"gpu-command: $D/$f is missing: run make gpu-data gpu-wheels and carry .gpu with the working tree; '
        'nothing was run."; exit 2; }; done; ls "$W"/*.whl >/dev/null 2>&1 || { echo "gpu-command: no wheels in '
        '$W: run make gpu-wheels and carry .gpu; nothing was run."; exit 2; }; [ -n "${OUT:-}" ] || { echo '
        '"gpu-command: set OUT to the folder for the report; nothing was run."; exit 2; }; '
        'PY=$(command -v python || command -v python3); PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore '
        '"$PY" -m pip install -q --no-index --no-deps --disable-pip-version-check "$W"/*.whl || exit 2; '
        '"$PY" benchmarks/gpu_check.py --data "$D" --out "$OUT"')


def shared_data() -> Path:
    return Path(os.environ.get("ESM_GEARNET_SHARED_DATA", ROOT.parent / "shared" / "data"))


def pack_data() -> int:
    """Copy DATA_FOLDERS of the shared data into .gpu/data (replacing what was there)."""
    source, target = shared_data(), ROOT / CARRIED / "data"
    missing = [name for name in DATA_FOLDERS if not (source / name).is_dir()]
    if missing:
        print(f"gpu-check: {source} lacks {', '.join(missing)}; set ESM_GEARNET_SHARED_DATA to the shared data.")
        return 2
    shutil.rmtree(target, ignore_errors=True)
    for name in DATA_FOLDERS:  # contents only: the copy stays writable (removable) whatever the source's modes
        for file in sorted((source / name).rglob("*")):
            if file.is_file():
                copy = target / file.relative_to(source)
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, copy)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"gpu-check: {', '.join(DATA_FOLDERS)} copied from {source} into {target} ({size / 2 ** 20:.1f} MiB)")
    return 0


def device_lines(cuda: bool) -> List[str]:
    """The machine in words: device, driver, versions (CUDA is not initialised here: nvidia-smi names it)."""
    import torch

    if cuda:
        try:
            query = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                    "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            gpus = [line.strip() for line in query.stdout.strip().splitlines()]
        except (OSError, subprocess.SubprocessError):
            gpus = []
        device = "; ".join(gpus) if gpus else f"{torch.cuda.get_device_name(0)} (nvidia-smi not found)"
        lines = [f"- device: {device} ({torch.cuda.device_count()} visible; name, memory, driver)"]
    else:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor() or "unknown")
        lines = [f"- device: CPU only ({model}), {os.cpu_count()} cores, torch uses {torch.get_num_threads()} "
                 "threads; no GPU"]
    cudnn = torch.backends.cudnn.version() if cuda else None
    lines.append(f"- torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}"
                 + (f", cuDNN {cudnn}" if cudnn else "") + f"; Python {platform.python_version()}")
    return lines


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown (no git here)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git here)"


def write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


class Check:
    """The records of one run and the files of its output folder."""

    def __init__(self, out: Path, title: str, header: List[str], records: List[Record]):
        self.out, self.title, self.header, self.records = out, title, header, records
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def table(self) -> List[str]:
        lines = ["| # | step | status | seconds | expected | limit |", "|---|---|---|---|---|---|"]
        for i, r in enumerate(self.records, 1):
            seconds = "" if r.seconds is None else f"{r.seconds:.0f}"
            lines.append(f"| {i} | {r.name} | {r.status} | {seconds} | {r.expected:.0f} | {r.limit:.0f} |")
        return lines

    def sections(self) -> List[str]:
        lines = []
        for i, r in enumerate(self.records, 1):
            lines += ["", f"## {i}. {r.name}: {r.what}", "", f"`{r.command}`", "", f"**{r.status}**"
                      + ("" if r.seconds is None else f" in {r.seconds:.0f} s")
                      + f" (expected {r.expected:.0f} s, limit {r.limit:.0f} s)"]
            if r.tail:
                lines += ["", "```", *r.tail, "```"]
        return lines

    def write(self) -> None:
        """Rewrite report.md and results.json (each replaced whole, never left half-written)."""
        body = [f"# {self.title}", "", *self.header, f"- elapsed {self.elapsed():.0f} s", "", *self.table(),
                *self.sections(), ""]
        write_atomic(self.out / REPORT, "\n".join(body))
        write_atomic(self.out / RESULTS, json.dumps({"title": self.title, "header": self.header,
                                                     "elapsed_s": round(self.elapsed(), 1),
                                                     "steps": [vars(r) for r in self.records]}, indent=1))


def step_output(log: Path, offset: int) -> str:
    with open(log, "rb") as handle:
        handle.seek(offset)
        return handle.read().decode(errors="replace")


def parse_results(output: str) -> List[Dict]:
    results = []
    for line in output.splitlines():
        if line.startswith("RESULT "):
            try:
                results.append(json.loads(line[len("RESULT "):]))
            except ValueError:
                pass
    return results


def status_of(step: Step, outcome: Outcome) -> tuple:
    """(status text, passed)."""
    text = outcome.describe()
    if step.must_time_out:
        passed = outcome.timed_out and not outcome.left
        return ("as planted: " if passed else "NOT AS PLANTED: ") + text, passed
    return text, outcome.code == 0 and not outcome.left


def interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="output folder: report.md, log.txt, results.json")
    parser.add_argument("--data", default=None, help="the data the steps read (default: ESM_GEARNET_SHARED_DATA, "
                        "else .gpu/data when present, else ../shared/data)")
    parser.add_argument("--rehearse", action="store_true", help="every step on the CPU, tiny sizes, short limits")
    parser.add_argument("--deadline", type=float, default=None,
                        help=f"seconds for all steps (default {DEADLINE['cuda']:.0f} on CUDA, "
                             f"{DEADLINE['rehearse']:.0f} rehearsing)")
    parser.add_argument("--only", default=None, help="comma-separated step names (default: all)")
    parser.add_argument("--print-command", action="store_true", help="print the GPU machine's command line")
    parser.add_argument("--pack-data", action="store_true", help="copy the data the steps read into .gpu/data")
    args = parser.parse_args(argv)
    if args.print_command:
        print(command_line())
        return 0
    if args.pack_data:
        return pack_data()
    if not args.out:
        parser.error("--out DIR is required: the folder for report.md, log.txt and results.json.")
    import torch

    cuda = torch.cuda.is_available() and not args.rehearse
    if not cuda and not args.rehearse:
        print(f"gpu-check: no CUDA device on this machine (torch {torch.__version__}); nothing to check "
              "(--rehearse runs every step on the CPU).")
        return 0
    carried = ROOT / CARRIED / "data"
    if args.data:
        data = Path(args.data)
    else:
        data = shared_data() if "ESM_GEARNET_SHARED_DATA" in os.environ or not carried.is_dir() else carried
    data = data.resolve()
    missing = [name for name in DATA_FOLDERS if not (data / name).is_dir()]
    if missing:
        print(f"gpu-check: {data} lacks {', '.join(missing)}, which the tests and benchmarks read: carry .gpu/data "
              "(make gpu-data) or give --data; nothing was run.")
        return 2
    steps = [s for s in STEPS if args.rehearse or s.args is not None]
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {s.name for s in steps})
        if unknown:
            parser.error(f"--only: unknown {', '.join(unknown)}; choose from {', '.join(s.name for s in steps)}.")
        steps = [s for s in steps if s.name in names]
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file; give a folder.")
    out.mkdir(parents=True, exist_ok=True)
    log = out / LOG
    log.write_bytes(b"")

    deadline = args.deadline or DEADLINE["rehearse" if args.rehearse else "cuda"]
    device = "cuda" if cuda else "cpu"
    title = "GPU check" if cuda else "GPU check rehearsal: every step on the CPU with tiny sizes and short limits"
    header = [*device_lines(cuda), f"- commit {commit()}; data {data}",
              f"- started {datetime.datetime.now().isoformat(timespec='seconds')}; deadline {deadline:.0f} s",
              f"- files: {REPORT} (this), {LOG} (every step's full output), {RESULTS} (statuses, RESULT lines)"]
    env = dict(os.environ, ESM_GEARNET_SHARED_DATA=str(data), ESM_GEARNET_REQUIRE_DATA="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH")
                                                          else [])))
    if args.rehearse:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the rehearsal is the CPU's, even on a GPU machine
        # tiny steps are all thread barriers: on a loaded 2-core machine 2 threads made `encoders` 8x slower
        # (34 s against 4 s with one), so the rehearsal uses one unless told otherwise
        env.setdefault("OMP_NUM_THREADS", "1")
        header.append(f"- the steps run with OMP_NUM_THREADS={env['OMP_NUM_THREADS']}")
    context = {"device": device, "peak": "0", "results": str(out / RESULTS)}
    records = []
    for step in steps:
        step_args, limit, expected = step.plan(args.rehearse)
        command = " ".join(shlex.quote(a) for a in ["python", *step_args])
        records.append(Record(step.name, step.what, command, expected, limit))
    check = Check(out, title, header, records)
    planned = sum(r.expected for r in records)
    print(f"gpu-check: {len(steps)} steps on {device}, {planned:.0f} s expected of a {deadline:.0f} s deadline; "
          f"output in {out}", flush=True)
    check.write()
    signal.signal(signal.SIGTERM, interrupted)
    try:
        for i, (step, record) in enumerate(zip(steps, records), 1):
            left = deadline - check.elapsed()
            if left < record.expected:
                record.status = f"skipped: expected {record.expected:.0f} s, {max(left, 0):.0f} s left"
                print(f"gpu-check [{i}/{len(steps)}] {step.name}: {record.status}", flush=True)
                check.write()
                continue
            limit = record.limit = min(record.limit, left)
            step_args = [a.format(**context) for a in step.plan(args.rehearse)[0]]
            record.command = " ".join(shlex.quote(a) for a in ["python", *step_args])
            record.status = "running"
            print(f"gpu-check [{i}/{len(steps)}] {step.name}: expected {record.expected:.0f} s, limit {limit:.0f} s, "
                  f"{left:.0f} s left", flush=True)
            check.write()
            offset = log.stat().st_size
            with open(log, "a") as handle:
                handle.write(f"===== {i}. {step.name}: {record.command} (limit {limit:.0f} s)\n")
            outcome = run_step([sys.executable, *step_args], limit, log, ROOT, env)
            record.seconds = outcome.seconds
            record.status, record.passed = status_of(step, outcome)
            with open(log, "a") as handle:
                handle.write(f"===== {i}. {step.name}: {record.status} in {outcome.seconds:.1f} s\n")
            output = step_output(log, offset)
            record.results = parse_results(output)
            record.tail = output.rstrip("\n").splitlines()[1:-1][-40:]
            if step.name == "peak" and record.results:
                context["peak"] = repr(record.results[-1]["tflops"])
            check.write()
            print(f"gpu-check [{i}/{len(steps)}] {step.name}: {record.status} in {outcome.seconds:.0f} s", flush=True)
    except KeyboardInterrupt as error:
        running = [r for r in records if r.status == "running"]
        for r in running:
            r.status, r.passed = f"interrupted ({error})", False
        check.write()
        print(f"gpu-check: interrupted ({error}); the report so far is in {out / REPORT}", flush=True)
        return 130
    failed = [r.name for r in records if r.passed is False]
    skipped = [r.name for r in records if r.status.startswith("skipped")]
    print("\n".join(["", *check.table(), ""]))
    print(f"gpu-check: {len(records) - len(failed) - len(skipped)} of {len(records)} steps passed in "
          f"{check.elapsed():.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else "")
          + (f"; skipped for time: {', '.join(skipped)}" if skipped else "") + f"; report in {out / REPORT}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
