"""The record of a run: its history in memory, and on rank 0 the log line, `metrics.jsonl`, `curves.png` and
TensorBoard scalars.

A record is a JSON-able dict. Per-epoch records carry "epoch" (and "train", "valid", "test" dicts of metrics);
others (the final summary {"final": ...}) go to the history, the log and metrics.jsonl only.

===============  ==============================================================================================
output           written
===============  ==============================================================================================
metrics.jsonl    one line per record, appended (the source of curves.png and `script/report.py`)
curves.png       redrawn from metrics.jsonl after every per-epoch record (`report.write_curves`)
events.out.*     TensorBoard scalars "<split>/<metric>" at step = epoch; the writer is opened at the first
                 per-epoch record (so a run that trains nothing leaves no events file); optional: without
                 the tensorboard package nothing is written
===============  ==============================================================================================
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import report

logger = logging.getLogger("esm_gearnet")

SPLITS = ("train", "valid", "test")


class RunLog:
    """Keeps the history of records; the writing rank also writes them to the run directory.

    Args:
        run_dir: the run directory, or None to write no file.
        writes: whether this process writes (rank 0) or only keeps the history (the other ranks).
    """

    def __init__(self, run_dir: Optional[Path], writes: bool):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.writes = writes
        self.history: List[Dict[str, Any]] = []
        self.tensorboard = None  # a SummaryWriter once the first per-epoch record is written
        self.tensorboard_missing = False

    @property
    def metrics_file(self) -> Optional[Path]:
        return self.run_dir / "metrics.jsonl" if self.run_dir is not None else None

    def record(self, record: Dict[str, Any]) -> None:
        """Append `record` to the history and, on the writing rank, to the log, metrics.jsonl, curves.png and
        TensorBoard (the last two for per-epoch records only)."""
        self.history.append(record)
        if not self.writes:
            return
        logger.info("%s", json.dumps(record))
        if self.run_dir is None:
            return
        with open(self.metrics_file, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if "epoch" not in record:
            return
        try:
            report.write_curves(self.run_dir)
        except ImportError:  # matplotlib is a dependency; a broken install must not stop training
            logger.warning("matplotlib cannot be imported: curves.png is not drawn")
        writer = self._tensorboard()
        if writer is not None:
            for split in SPLITS:
                for key, value in record.get(split, {}).items():
                    writer.add_scalar(f"{split}/{key}", value, record["epoch"])
            writer.flush()

    def restore(self, history: List[Dict[str, Any]]) -> None:
        """Continue from `history` (a resumed run's). The writing rank rewrites metrics.jsonl to it when the file
        says something else (records an interrupted run wrote after its checkpoint); a file that already matches
        is left untouched."""
        self.history = list(history)
        if not self.writes or self.run_dir is None:
            return
        content = "".join(json.dumps(r) + "\n" for r in self.history)
        path = self.metrics_file
        current = path.read_text() if path.is_file() else ""
        if content != current:
            path.write_text(content)

    def _tensorboard(self):
        """The SummaryWriter, opened on first use; None without the tensorboard package."""
        if self.tensorboard is None and not self.tensorboard_missing:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                self.tensorboard_missing = True
                return None
            self.tensorboard = SummaryWriter(str(self.run_dir))
        return self.tensorboard
