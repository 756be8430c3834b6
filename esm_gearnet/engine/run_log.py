"""The record of a run: its history in memory, and on rank 0 the log line, `metrics.jsonl`, `curves.png` and
TensorBoard scalars.

A record is a JSON-able dict. Per-epoch records carry "epoch" (and "train", "valid", "test" dicts of metrics);
others (the final summary {"final": ...}) go to the history, the log and metrics.jsonl only.

===============  ==============================================================================================
output           written
===============  ==============================================================================================
metrics.jsonl    one line per record, appended and flushed a record at a time (the source of curves.png and
                 `script/report.py`; a torn last line, from a crash while appending, is skipped by its readers)
curves.png       redrawn from metrics.jsonl after every per-epoch record (`report.write_curves`)
events.out.*     TensorBoard scalars "<split>/<metric>" at step = epoch; the writer is opened at the first
                 per-epoch record (so a run that trains nothing leaves no events file); optional: without
                 the tensorboard package nothing is written
wandb/           with `engine.logger: wandb` (the original's option), the same scalars in a Weights & Biases run
                 (project "esm_gearnet", named after the run directory, the config attached); `WANDB_MODE=offline`
                 works without network
===============  ==============================================================================================
"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from .. import writing
from . import report

logger = logging.getLogger("esm_gearnet")

SPLITS = ("train", "valid", "test")


class RunLog:
    """Keeps the history of records; the writing rank also writes them to the run directory.

    Args:
        run_dir: the run directory, or None to write no file.
        writes: whether this process writes (rank 0) or only keeps the history (the other ranks).
        logger: "logging" (the log, metrics.jsonl, curves, TensorBoard) or "wandb" (those and Weights & Biases).
        config: the run's config, attached to the Weights & Biases run.
    """

    def __init__(self, run_dir: Optional[Path], writes: bool, logger: str = "logging",
                 config: Optional[Dict[str, Any]] = None):
        if logger not in ("logging", "wandb"):
            raise ValueError(f"engine.logger must be logging or wandb, got {logger!r}.")
        if logger == "wandb" and writes and run_dir is not None:
            if importlib.util.find_spec("wandb") is None:
                raise ImportError("engine.logger: wandb needs the wandb package: pip install wandb (set "
                                  "WANDB_MODE=offline to log without network), or use logger: logging.")
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.writes = writes
        self.logger, self.config, self.wandb = logger, config, None
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
        logger.info("%s", format_record(record))
        if self.run_dir is None:
            return
        writing.append_line(self.metrics_file, json.dumps(record))
        if "epoch" not in record:
            return
        try:
            report.write_curves(self.run_dir)
        except ImportError:  # matplotlib is a dependency; a broken install must not stop training
            logger.warning("matplotlib cannot be imported: curves.png is not drawn")
        except ValueError as error:  # a damaged line in metrics.jsonl: the figure is not worth ending the run for
            logger.warning("curves.png is not drawn: %s", error)
        scalars = {f"{split}/{key}": value for split in SPLITS for key, value in (record.get(split) or {}).items()}
        writer = self._tensorboard()
        if writer is not None:
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, record["epoch"])
            writer.flush()
        if self.logger == "wandb":
            self._wandb().log(scalars, step=record["epoch"])

    def close(self) -> None:
        """Finish the Weights & Biases run and close the TensorBoard writer (if open)."""
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def _wandb(self):
        if self.wandb is None:
            import wandb

            self.wandb = wandb.init(project="esm_gearnet", name=self.run_dir.name, dir=str(self.run_dir),
                                    config=self.config, resume="allow", id=self.run_dir.name)
        return self.wandb

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
            writing.write_atomic(path, content)

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


def format_metrics(metrics: Dict[str, Any]) -> str:
    """`{"f1_max": 0.81234, "auprc@micro": 0.7}` -> "f1_max 0.8123, auprc@micro 0.7" (4 significant digits)."""
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def format_record(record: Dict[str, Any]) -> str:
    """One readable log line for a record (metrics.jsonl keeps every digit)."""
    if "final" in record:
        final = record["final"]
        return (f"best validation epoch {final['best_epoch']}: valid {format_metrics(final['valid'])}; "
                f"test {format_metrics(final['test'])}")
    if "epoch" not in record:
        return json.dumps(record)
    parts = [f"epoch {record['epoch']}"] + [f"{split} {format_metrics(record[split])}" for split in SPLITS
                                            if record.get(split)]
    if record.get("best_epoch") is not None:
        parts.append(f"best epoch {record['best_epoch']}")
    return "; ".join(parts)
