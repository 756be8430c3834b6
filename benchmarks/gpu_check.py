"""The GPU path in one command: the CUDA tests, then the GPU benchmarks, written into one markdown report.

    python benchmarks/gpu_check.py [--report gpu_report.md] [--quick]      (what `make gpu-check` runs)

The report names the device, driver, torch and CUDA versions, and gives each figure with the command that
measured it (the scripts' `RESULT {...}` lines). Without CUDA it says so in one line and exits 0. Each step
has its own time limit, so the whole check stays within 10 minutes; a step that fails or runs out of time is
reported as such and the others still run.
"""
import argparse
import datetime
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (what, command, time limit in seconds): 540 s in all, so install and report fit in 10 minutes
STEPS = [
    ("CUDA tests", [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"], 130),
    ("ESM-2 attention paths (33 x 1280 on CUDA)", [sys.executable, "benchmarks/esm_attention.py", "--repeats", "3"],
     80),
    ("ESM-GearNet EC training step, lever by lever (ESM-2 650M architecture)",
     [sys.executable, "benchmarks/train_step.py", "--esm", "33,1280,20", "--batch", "8", "--repeats", "2",
      "--max-proteins", "48", "--max-batch", "unpadded"], 190),
    ("EC graph construction, CPU vs GPU", [sys.executable, "benchmarks/graph_construction.py"], 40),
    ("structure encoders", [sys.executable, "benchmarks/encoders.py"], 50),
    ("SaProt-GearNet vs ESM-GearNet training step, same language model size",
     [sys.executable, "benchmarks/saprot_step.py", "--esm", "12,480,20", "--repeats", "3", "--max-proteins", "24"],
     50),
]


def _device_lines():
    import torch

    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        driver = "unknown (nvidia-smi not found)"
    return [f"- device: {props.name}, {props.total_memory / 2 ** 30:.0f} GiB, {torch.cuda.device_count()} visible",
            f"- driver: {driver}", f"- torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}", f"- Python {sys.version.split()[0]}",
            f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}"]


def _run(command, limit):
    """(exit code or 'timed out', seconds, output)."""
    started = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        code, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as error:
        code = "timed out"
        output = (error.stdout or b"").decode(errors="replace") if isinstance(error.stdout, bytes) else \
            (error.stdout or "")
    return code, time.perf_counter() - started, output


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", default=str(ROOT / "gpu_report.md"))
    parser.add_argument("--quick", action="store_true", help="the CUDA tests only")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device on this machine (torch {torch.__version__}); nothing to check.")
        return 0
    lines = ["# GPU check", "", *_device_lines(), ""]
    failed = []
    for what, command, limit in STEPS[:1] if args.quick else STEPS:
        code, seconds, output = _run(command, limit)
        shown = " ".join(shlex.quote(c if c != sys.executable else "python") for c in command)
        lines += [f"## {what}", "", f"`{shown}` — exit {code}, {seconds:.0f} s", ""]
        results = [line for line in output.splitlines() if line.startswith("RESULT ")]
        tail = results or output.strip().splitlines()[-15:]
        lines += ["```", *tail, "```", ""]
        if code != 0:
            failed.append(what)
        print(f"gpu-check: {what}: exit {code} in {seconds:.0f} s", flush=True)
    Path(args.report).write_text("\n".join(lines))
    print(f"gpu-check: report in {args.report}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
