"""Shared helpers of the benchmark scripts: where the real data is, timing, and the result line."""
import json
import os
import statistics
import time
from pathlib import Path

SHARED_DATA = Path(os.environ.get("ESM_GEARNET_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def real_structure_files():
    folders = [SHARED_DATA / "structures", SHARED_DATA / "alphafold"]
    if not folders[0].exists():
        raise SystemExit(f"{folders[0]} is absent: the benchmarks run on the real structures in ../shared/data "
                         "(set ESM_GEARNET_SHARED_DATA to another copy).")
    return [p for folder in folders for p in sorted(folder.iterdir())]


def median_time(fn, repeats=5, warmup=1):
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def alternating_times(fns, repeats, warmup=0):
    """Seconds of each call of each function, [[s, ...] per function], the functions called in turn (`warmup`
    untimed rounds first), so that a change of the machine's load falls on all of them alike."""
    times = [[] for _ in fns]
    for round_ in range(warmup + repeats):
        for fn, into in zip(fns, times):
            start = time.perf_counter()
            fn()
            if round_ >= warmup:
                into.append(time.perf_counter() - start)
    return times


def report(name, **figures):
    """Print one machine-readable line: `RESULT {"benchmark": name, ...}`."""
    print("RESULT " + json.dumps({"benchmark": name, **figures}, sort_keys=True))
