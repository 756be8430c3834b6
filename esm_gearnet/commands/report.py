"""`esm-gearnet report`: training curves of one or more runs side by side.

    esm-gearnet report RUN_DIR... [--label NAME...] [-o report.png]
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from .arguments import report_parser
from .exits import one_sentence


@one_sentence
def main(argv: Optional[List[str]] = None) -> int:
    from ..engine.report import plot_runs  # matplotlib: imported when drawing

    args = report_parser().parse_args(argv)
    output = args.output or str(Path(args.runs[0]) / "report.png")
    plot_runs(args.runs, output, args.label)
    print(f"wrote {output}")
    return 0
