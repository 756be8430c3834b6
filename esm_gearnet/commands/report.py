"""`esm-gearnet report`: training curves of one or more runs side by side.

    esm-gearnet report RUN_DIR... [--label NAME...] [-o report.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional

from .exits import one_sentence


@one_sentence
def main(argv: Optional[List[str]] = None) -> int:
    from ..engine.report import plot_runs  # matplotlib: imported when drawing

    parser = argparse.ArgumentParser(description="Training curves of one or more runs side by side.")
    parser.add_argument("runs", nargs="+", help="run directories (holding metrics.jsonl)")
    parser.add_argument("--label", action="append", default=None,
                        help="the name of a run in the legend, once per run in order (default: the config keys "
                             "in which the runs differ)")
    parser.add_argument("-o", "--output", default=None, help="the figure (default: report.png in the first run)")
    args = parser.parse_args(argv)
    output = args.output or str(Path(args.runs[0]) / "report.png")
    plot_runs(args.runs, output, args.label)
    print(f"wrote {output}")
    return 0
