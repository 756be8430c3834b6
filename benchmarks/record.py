"""Run one benchmark script and keep its figures: `benchmarks/results/NAME.json`.

    python benchmarks/record.py structure_io [--repeats 15]      # runs benchmarks/structure_io.py --repeats 15
    python benchmarks/record.py --as embed_650m embed --sizes 650M

The script's output streams through unchanged; its `RESULT {...}` lines, the command line, the commit, the time
and the machine (CPU, cores, Python, torch, the load average before and after) are written to the results file,
which is committed. Nothing is written when the script fails or prints no RESULT line. `make figures`
(`benchmarks/figures.py`) renders the tables of the README, benchmarks/README.md and the docs from these files.
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = Path(os.environ.get("ESM_GEARNET_BENCH_RESULTS", HERE / "results"))


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    torch_version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch_version}


def commit():
    def git(*args):
        return subprocess.run(["git", "-C", str(HERE), *args], capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD")
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--as", dest="name", help="the results file's name (default: the script's)")
    parser.add_argument("script", help="a script of benchmarks/, without .py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    args = parser.parse_args()
    script = HERE / f"{args.script}.py"
    if not script.is_file():
        sys.exit(f"benchmarks/{args.script}.py does not exist; name a script of benchmarks/ without .py.")
    command = ["python", f"benchmarks/{script.name}", *args.args]
    load_before, start = os.getloadavg()[0], time.monotonic()
    process = subprocess.Popen([sys.executable, "-u", str(script), *args.args], stdout=subprocess.PIPE, text=True,
                               cwd=HERE.parent)
    results = []
    for line in process.stdout:
        sys.stdout.write(line)
        if line.startswith("RESULT "):
            results.append(json.loads(line[len("RESULT "):]))
    if process.wait() != 0 or not results:
        sys.exit(f"{shlex.join(command)} {'failed' if process.returncode else 'printed no RESULT line'}; "
                 "nothing recorded.")
    record = {
        "command": shlex.join(command),
        "measured": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "seconds": round(time.monotonic() - start),
        "machine": {**machine(), "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)]},
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{args.name or args.script}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"recorded {path}")


if __name__ == "__main__":
    main()
