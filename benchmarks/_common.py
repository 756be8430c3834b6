"""Shared helpers of the benchmark scripts: where the real data is, timing, and the result line."""
import contextlib
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


@contextlib.contextmanager
def scatter_aggregation():
    """GearNet's relational aggregation as it was before the sparse product, for the benchmarks' "off" rows:
    gather the [E, D] source rows, then one `index_add_` into [N * R, D]."""
    from esm_gearnet.models import gearnet

    def adjacency(edge_list, num_node, num_relation, num_source=None):
        return edge_list, num_node

    def relational_sum(x, graph, num_relation):
        edge_list, num_node = graph
        source, target, relation = edge_list.unbind(-1)
        out = x.new_zeros(num_node * num_relation, x.shape[-1])
        out.index_add_(0, target * num_relation + relation, x[source])
        return out.view(num_node, num_relation * x.shape[-1])

    saved = gearnet.relational_adjacency, gearnet.relational_sum
    gearnet.relational_adjacency, gearnet.relational_sum = adjacency, relational_sum
    try:
        yield
    finally:
        gearnet.relational_adjacency, gearnet.relational_sum = saved
