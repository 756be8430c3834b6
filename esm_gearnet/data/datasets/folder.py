"""`ProteinFolder`: your own structures (a folder of PDB/mmCIF files, .gz too) and a CSV of labels."""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ...registry import register
from ..io import is_structure_file, protein_name
from .base import StructureDataset
from .cache import load_or_build

logger = logging.getLogger("esm_gearnet")
KINDS = ("regression", "classification", "multi_label")


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
        with open(labels, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or "id" not in rows[0]:
            raise ValueError(f"{labels}: the label CSV needs a header with an `id` column and at least one row.")
        by_id = {row["id"]: row for row in rows}
        columns = list(columns or [c for c in rows[0] if c not in ("id", "split")])
        if task != "regression" and len(columns) != 1:
            raise ValueError(f"{labels}: task {task} reads one label column; give it with `columns: [name]`.")
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
        self.tasks, self.targets = self._targets([by_id[i] for i in ids], columns, task)
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
    def _targets(rows, columns, task):
        if task == "regression":
            values = [[float(row[c]) if row[c].strip() else float("nan") for c in columns] for row in rows]
            return columns, torch.tensor(values, dtype=torch.float32).reshape(len(rows), len(columns))
        names = [[n.strip() for n in (row[columns[0]].split(";") if task == "multi_label" else [row[columns[0]]])
                  if n.strip()] for row in rows]
        classes = sorted({n for row in names for n in row})
        index = {c: i for i, c in enumerate(classes)}
        targets = torch.zeros(len(rows), len(classes))
        for i, row in enumerate(names):
            targets[i, [index[n] for n in row]] = 1
        return classes, targets
