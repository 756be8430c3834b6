"""`ProteinFolder`: your own structures (a folder of PDB/mmCIF files, .gz too) and a CSV of labels."""
from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ...errors import InputError
from ...registry import register
from ..io import is_structure_file, protein_name
from .base import StructureDataset
from .cache import load_or_build

logger = logging.getLogger("esm_gearnet")
KINDS = ("regression", "classification", "multi_label")


class LabelError(InputError):
    """A label CSV that cannot be used: one sentence naming the file and the line (and column)."""


def read_labels(path: Path) -> Tuple[List[str], Dict[str, Dict[str, str]], Dict[str, int]]:
    """(header, {id: {column: cell}}, {id: line number}) of a label CSV: UTF-8 (a byte-order mark is dropped),
    blank lines skipped.

    DEVIATION: earlier versions read the CSV with `csv.DictReader` defaults: a byte-order mark (Excel's "CSV UTF-8")
    hid the `id` header, a repeated id kept its last row silently and a short row gave None cells (an
    AttributeError later). Here a BOM is read, and a repeated id or column, an empty id and a row whose cell count
    differs from the header's are refused naming the lines.

    Raises:
        LabelError: one sentence naming the file and the line.
    """
    header: List[str] = []
    rows: Dict[str, Dict[str, str]] = {}
    lines: Dict[str, int] = {}
    start = 1  # the line a row starts on (a quoted cell may span lines)
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        try:
            for cells in reader:
                line, start = start, reader.line_num + 1
                if not any(cell.strip() for cell in cells):
                    continue
                if not header:
                    header = [cell.strip() for cell in cells]
                    twice = sorted({c for c in header if header.count(c) > 1})
                    if twice:
                        raise LabelError(f"{path}, line {line}: the header names the column {twice[0]!r} twice.")
                    if "id" not in header:
                        break
                    continue
                if len(cells) != len(header):
                    raise LabelError(f"{path}, line {line}: the row has {len(cells)} cells for the header's "
                                     f"{len(header)} columns; give every column a cell (empty for a missing value).")
                row = dict(zip(header, cells))
                name = row["id"].strip()
                if not name:
                    raise LabelError(f"{path}, line {line}: the id cell is empty.")
                if name in rows:
                    raise LabelError(f"{path}, lines {lines[name]} and {line}: both rows give the id {name!r}; keep "
                                     "one row per protein.")
                rows[name], lines[name] = row, line
        except UnicodeDecodeError as error:
            raise LabelError(f"{path}: the label CSV is not UTF-8 text (byte 0x{error.object[error.start]:02x}); "
                             "save it as UTF-8.") from None
        except csv.Error as error:
            raise LabelError(f"{path}, line {reader.line_num}: {error}.") from None
    if "id" not in header or not rows:
        raise LabelError(f"{path}: the label CSV needs a header with an `id` column and at least one row.")
    return header, rows, lines


def _number(cell: str, path: Path, line: int, column: str) -> float:
    """A regression label: a finite number, or NaN (missing) for an empty cell.

    DEVIATION: earlier versions accepted `inf`, `nan` and the like, which only showed later as a NaN loss.
    """
    if not cell.strip():
        return float("nan")
    try:
        value = float(cell)
    except ValueError:
        raise LabelError(f"{path}, line {line}, column {column!r}: {cell.strip()!r} is not a number.") from None
    if not math.isfinite(value):
        raise LabelError(f"{path}, line {line}, column {column!r}: {cell.strip()!r} is not a finite number; leave "
                         "the cell empty for a missing value.")
    return value


@register
class ProteinFolder(StructureDataset):
    """Structures of a folder with labels from a CSV.

    Args:
        path: folder searched recursively for structure files; a protein's id is its file name without the
            structure extensions (`1abc.cif.gz` -> `1abc`).
        labels: CSV with an `id` column and label columns.
        task: "regression" (one float target per column; empty cells are missing), "classification" (one
            column of class names: one-hot over the sorted classes, for MultipleBinaryClassification) or
            "multi_label" (one column of `;`-separated names: multi-hot).
        columns: label columns (default: every column except `id` and `split`).
        split: a column of train/valid/test, or fractions (train, valid, test) of a random split by `seed`.
        transform, workers, three_di: as for the other datasets. The cache is written beside the CSV.
    Files without a label row are left out and rows without a file are reported, both with a warning.
    """

    def __init__(self, path, labels, task: str = "regression", columns: Optional[Sequence[str]] = None,
                 split: Union[str, Sequence[float]] = (0.8, 0.1, 0.1), seed: int = 0, transform=None,
                 workers: int = 2, progress: bool = True, three_di: bool = False):
        if task not in KINDS:
            raise ValueError(f"ProteinFolder: task must be one of {', '.join(KINDS)}, got {task!r}.")
        folder = Path(os.path.expanduser(str(path)))
        labels = Path(os.path.expanduser(str(labels)))
        header, by_id, lines = read_labels(labels)
        columns = list(columns or [c for c in header if c not in ("id", "split")])
        unknown = [c for c in columns + ([split] if isinstance(split, str) else []) if c not in header]
        if unknown:
            raise LabelError(f"{labels}, line 1: the header has no column {unknown[0]!r} (it has "
                             f"{', '.join(header)}); check `columns` and `split` in the config.")
        if task != "regression" and len(columns) != 1:
            raise LabelError(f"{labels}: task {task} reads one label column; give it with `columns: [name]`.")
        values = ({name: [_number(row[c], labels, lines[name], c) for c in columns] for name, row in by_id.items()}
                  if task == "regression" else None)  # every row checked before any structure is read
        files = sorted(f for f in folder.rglob("*") if f.is_file() and is_structure_file(f))
        unlabeled = [f for f in files if protein_name(f) not in by_id]
        if unlabeled:
            logger.warning("%d structure files have no row in %s and are left out, e.g. %s",
                           len(unlabeled), labels, unlabeled[0].name)
        files = [f for f in files if protein_name(f) in by_id]
        missing = set(by_id) - {protein_name(f) for f in files}
        if missing:
            logger.warning("%d label rows have no structure file in %s, e.g. %s", len(missing), folder,
                           sorted(missing)[0])
        self.proteins, self.skipped = load_or_build(files, labels.with_name(labels.stem + ".cache.pt"),
                                                    options={"task": "folder"}, workers=workers, progress=progress,
                                                    three_di=three_di)
        ids = [protein_name(Path(f)) for f in self.proteins.files]
        self.tasks, self.targets = self._targets([by_id[i] for i in ids], columns, task,
                                                 None if values is None else [values[i] for i in ids])
        if isinstance(split, str):
            names = ("train", "valid", "test")
            self.split_indices = [[i for i, name in enumerate(ids) if by_id[name].get(split) == s] for s in names]
        else:
            order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
            num_train, num_valid = int(split[0] * len(ids)), int(split[1] * len(ids))
            self.split_indices = [sorted(order[:num_train]), sorted(order[num_train:num_train + num_valid]),
                                  sorted(order[num_train + num_valid:])]
        self.transform = transform

    @staticmethod
    def _targets(rows, columns, task, values=None):
        if task == "regression":
            return columns, torch.tensor(values, dtype=torch.float32).reshape(len(rows), len(columns))
        names = [[n.strip() for n in (row[columns[0]].split(";") if task == "multi_label" else [row[columns[0]]])
                  if n.strip()] for row in rows]
        classes = sorted({n for row in names for n in row})
        index = {c: i for i, c in enumerate(classes)}
        targets = torch.zeros(len(rows), len(classes))
        for i, row in enumerate(names):
            targets[i, [index[n] for n in row]] = 1
        return classes, targets
