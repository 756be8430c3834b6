"""Structure parsing throughput on the real files of ../shared/data.

Compares, on the same files: a bare `gemmi.read_structure` (no featurisation), `esm_gearnet.load_structure`
(parse + featurise into a Protein), biotite (parse into an AtomArray, when installed), and
`load_structures` with 2 worker processes. TorchDrug's `Protein.from_pdb` cannot be installed on Python 3.11;
its times measured on this machine kind are quoted from the issue (2N2U 43 ms, 5YH2 974 ms).

    python benchmarks/structure_io.py [--repeats 5]
"""
import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gemmi  # noqa: E402

from benchmarks._common import median_time, real_structure_files, report  # noqa: E402
from esm_gearnet.data import load_structure, load_structures  # noqa: E402

TORCHDRUG_SECONDS = {"2N2U-A.pdb": 0.043, "5YH2-A.pdb": 0.974}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    files = real_structure_files()
    paths = [str(f) for f in files]

    bare = median_time(lambda: [gemmi.read_structure(p) for p in paths], args.repeats)
    ours = median_time(lambda: [load_structure(p) for p in paths], args.repeats)
    per_file = {f.name: (median_time(lambda: gemmi.read_structure(str(f)), args.repeats),
                         median_time(lambda: load_structure(f), args.repeats)) for f in files}
    ratios = [o / b for b, o in per_file.values()]
    pdb_ratios = [o / b for name, (b, o) in per_file.items() if name.endswith(".pdb")]
    pool = median_time(lambda: load_structures(paths, workers=2, progress=False), max(1, args.repeats // 2))

    figures = {
        "files": len(files),
        "gemmi_read_structures_per_s": round(len(files) / bare, 1),
        "esm_gearnet_structures_per_s": round(len(files) / ours, 1),
        "esm_gearnet_2_workers_structures_per_s": round(len(files) / pool, 1),
        "ratio_to_bare_gemmi_all_files": round(ours / bare, 2),
        "ratio_to_bare_gemmi_median_file": round(statistics.median(ratios), 2),
        "ratio_to_bare_gemmi_median_pdb_file": round(statistics.median(pdb_ratios), 2),
    }
    for name, seconds in TORCHDRUG_SECONDS.items():
        if name in per_file:
            figures[f"speedup_vs_torchdrug_{name.split('-')[0]}"] = round(seconds / per_file[name][1], 1)
            figures[f"esm_gearnet_ms_{name.split('-')[0]}"] = round(per_file[name][1] * 1e3, 2)
    try:
        import biotite.structure.io as strucio

        biotite = median_time(lambda: [strucio.load_structure(p) for p in paths], max(1, args.repeats // 2))
        figures["biotite_structures_per_s"] = round(len(files) / biotite, 1)
    except ImportError:
        figures["biotite_structures_per_s"] = None
    print(f"{len(files)} real structures, {sum(load_structure(p).num_residue for p in paths)} residues")
    print(f"bare gemmi.read_structure  {len(files) / bare:8.1f} structures/s")
    print(f"esm_gearnet.load_structure {len(files) / ours:8.1f} structures/s  "
          f"({ours / bare:.2f}x bare gemmi over all files, median file {statistics.median(ratios):.2f}x)")
    print(f"load_structures, 2 workers {len(files) / pool:8.1f} structures/s")
    report("structure_io", **figures)


if __name__ == "__main__":
    main()
