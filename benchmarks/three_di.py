"""Cost of Foldseek 3Di tokens (`esm_gearnet.data.three_di`) per protein on the real files of ../shared/data.

Per file: the best of `--repeats` runs of `three_di(protein)` on the parsed protein (mini3di's encoder, its
weights already loaded), and of `load_structure` on the same file, timed alternately so that both see the same
machine load; the median over the files of each, and of their ratio (what asking a dataset for 3Di adds to its
preprocessing). Also the largest file's figure, and the one-off cost of loading mini3di's weights.

    python benchmarks/three_di.py [--repeats 15] [--per-file]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import alternating_times, real_structure_files, report  # noqa: E402
from esm_gearnet.data import load_structure, three_di  # noqa: E402
from esm_gearnet.data.foldseek import require_encoder  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--per-file", action="store_true", help="print every file's times")
    args = parser.parse_args()
    start = time.perf_counter()
    require_encoder()
    weights_ms = (time.perf_counter() - start) * 1e3

    rows = []
    for path in real_structure_files():
        protein = load_structure(path)
        three_di(protein)
        tokens, parse = map(min, alternating_times([lambda: three_di(protein), lambda: load_structure(path)],
                                                   args.repeats))
        rows.append((path.name, protein.num_residue, tokens * 1e3, parse * 1e3))
    if args.per_file:
        print(f"{'file':32s} {'residues':>8s} {'3Di ms':>8s} {'parse ms':>9s}")
        for name, length, tokens, parse in sorted(rows, key=lambda row: row[1]):
            print(f"{name:32s} {length:8d} {tokens:8.2f} {parse:9.2f}")
    largest = max(rows, key=lambda row: row[1])
    figures = {
        "files": len(rows),
        "residues_median": statistics.median(row[1] for row in rows),
        "three_di_ms_per_protein_median": round(statistics.median(row[2] for row in rows), 2),
        "three_di_us_per_residue_median": round(statistics.median(row[2] / row[1] * 1e3 for row in rows), 1),
        "load_structure_ms_per_protein_median": round(statistics.median(row[3] for row in rows), 2),
        "three_di_over_load_structure_median": round(statistics.median(row[2] / row[3] for row in rows), 2),
        f"three_di_ms_largest_{largest[1]}_residues": round(largest[2], 2),
        "mini3di_weights_load_ms": round(weights_ms, 1),
    }
    print(f"3Di per protein: {figures['three_di_ms_per_protein_median']} ms median over {len(rows)} real structures "
          f"(parsing the file: {figures['load_structure_ms_per_protein_median']} ms)")
    report("three_di", **figures)


if __name__ == "__main__":
    main()
