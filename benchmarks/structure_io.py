"""Structure parsing throughput on the real files of ../shared/data.

Per file, side by side in one run: a bare `gemmi.read_structure` (parse only, no featurisation) and
`esm_gearnet.load_structure` (parse, check and featurise into a Protein), timed alternately so that both see the
same machine load; the ratio of their best times per file (the best of N runs is what the code costs without
interference from other processes, as `timeit` advises), and the median of those ratios. Also: all files
in a row, `load_structures` with 2 worker processes, biotite (parse into an AtomArray, when installed).
TorchDrug's `Protein.from_pdb` cannot be installed on Python 3.11; its times measured on this machine kind are
quoted from the issue (2N2U 43 ms, 5YH2 974 ms).

    python benchmarks/structure_io.py [--repeats 15] [--per-file]
"""
import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gemmi  # noqa: E402

from benchmarks._common import alternating_times, median_time, real_structure_files, report  # noqa: E402
from esm_gearnet.data import load_structure, load_structures  # noqa: E402

TORCHDRUG_SECONDS = {"2N2U-A.pdb": 0.043, "5YH2-A.pdb": 0.974}


def side_by_side(path, repeats):
    """Best seconds of (bare gemmi, esm_gearnet) on one file, the two timed alternately."""
    bare, ours = lambda: gemmi.read_structure(str(path)), lambda: load_structure(path)
    return tuple(map(min, alternating_times([bare, ours], repeats, warmup=1)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--per-file", action="store_true", help="print every file's times and ratio")
    args = parser.parse_args()
    files = real_structure_files()
    paths = [str(f) for f in files]

    per_file = {f.name: side_by_side(f, args.repeats) for f in files}
    ratios = {name: ours / bare for name, (bare, ours) in per_file.items()}
    bare = median_time(lambda: [gemmi.read_structure(p) for p in paths], 5)
    ours = median_time(lambda: [load_structure(p) for p in paths], 5)
    pool = median_time(lambda: load_structures(paths, workers=2, progress=False), 2)

    figures = {
        "files": len(files),
        "gemmi_read_structures_per_s": round(len(files) / bare, 1),
        "esm_gearnet_structures_per_s": round(len(files) / ours, 1),
        "esm_gearnet_2_workers_structures_per_s": round(len(files) / pool, 1),
        "ratio_to_bare_gemmi_all_files": round(ours / bare, 2),
        "ratio_to_bare_gemmi_median_file": round(statistics.median(ratios.values()), 2),
        "ratio_to_bare_gemmi_median_pdb_file": round(statistics.median(
            r for name, r in ratios.items() if name.endswith(".pdb")), 2),
        "ratio_to_bare_gemmi_worst_file": round(max(ratios.values()), 2),
    }
    for name, seconds in TORCHDRUG_SECONDS.items():
        if name in per_file:
            figures[f"speedup_vs_torchdrug_{name.split('-')[0]}"] = round(seconds / per_file[name][1], 1)
            figures[f"esm_gearnet_ms_{name.split('-')[0]}"] = round(per_file[name][1] * 1e3, 2)
    try:
        import biotite.structure.io as strucio

        biotite = median_time(lambda: [strucio.load_structure(p) for p in paths], 2)
        figures["biotite_structures_per_s"] = round(len(files) / biotite, 1)
    except ImportError:
        figures["biotite_structures_per_s"] = None
    if args.per_file:
        print(f"{'file':32s} {'gemmi ms':>9s} {'ours ms':>9s} {'ratio':>6s}")
        for name, (b, o) in sorted(per_file.items(), key=lambda item: ratios[item[0]]):
            print(f"{name:32s} {b * 1e3:9.3f} {o * 1e3:9.3f} {ratios[name]:6.2f}")
    print(f"{len(files)} real structures, {sum(load_structure(p).num_residue for p in paths)} residues")
    print(f"bare gemmi.read_structure  {len(files) / bare:8.1f} structures/s")
    print(f"esm_gearnet.load_structure {len(files) / ours:8.1f} structures/s  ({ours / bare:.2f}x bare gemmi over "
          f"all files; per file, side by side: median {figures['ratio_to_bare_gemmi_median_file']:.2f}x, "
          f"worst {figures['ratio_to_bare_gemmi_worst_file']:.2f}x)")
    print(f"load_structures, 2 workers {len(files) / pool:8.1f} structures/s")
    report("structure_io", **figures)


if __name__ == "__main__":
    main()
