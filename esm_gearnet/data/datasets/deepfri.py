"""`EnzymeCommission` and `GeneOntology`: the DeepFRI benchmarks in the layout the original (TorchDrug) used.

    <path>/EnzymeCommission/{train,valid,test}/<PDBID>-<chain>[_...].pdb   (or train.zip, ... beside them)
    <path>/EnzymeCommission/nrPDB-EC_annot.tsv   line 2: the 538 EC numbers; then "<chain>\\t<ec>,<ec>..."
    <path>/EnzymeCommission/nrPDB-EC_test.csv    PDB-chain,<30%,<40%,<50%,<70%,<95%  (1 = the test chain's
                                                 identity to the training set is below that cutoff; chains
                                                 with 0 in the `test_cutoff` column leave the test set)
GeneOntology likewise with nrPDB-GO_annot.tsv (12 header lines: terms and names of MF, BP, CC; then
"<chain>\\tMF terms\\tBP terms\\tCC terms"). A chain id is the file name up to its first "_" or ".".
Targets are multi-hot over the branch's terms.
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Dict, List, Literal

import torch

from ...registry import register
from ..io import is_structure_file
from .base import StructureDataset
from .cache import load_or_build
from .download import download, extract

logger = logging.getLogger("esm_gearnet")
SPLITS = ("train", "valid", "test")
TEST_CUTOFFS = (0.3, 0.4, 0.5, 0.7, 0.95)


def chain_id(path: Path) -> str:
    return path.name.split("_")[0].split(".")[0]


def read_test_csv(path: Path, test_cutoff: float) -> set:
    """Test chains removed at `test_cutoff`: those too similar to the training set (0 in its column)."""
    if test_cutoff not in TEST_CUTOFFS:
        raise ValueError(f"test_cutoff must be one of {TEST_CUTOFFS}, got {test_cutoff}.")
    column = TEST_CUTOFFS.index(test_cutoff) + 1
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        next(reader)
        return {row[0] for row in reader if row and row[column] == "0"}


def read_ec_annotation(path: Path):
    """(terms, {chain: [term index]}) of nrPDB-EC_annot.tsv."""
    with open(path, newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        next(reader)
        terms = next(reader)
        next(reader)
        index = {t: i for i, t in enumerate(terms)}
        return terms, {row[0]: [index[t] for t in row[1].split(",") if t] for row in reader if row}


def read_go_annotation(path: Path, branch: str):
    """(terms, {chain: [term index]}) of nrPDB-GO_annot.tsv for branch MF, BP or CC."""
    branches = ["MF", "BP", "CC"]
    if branch not in branches:
        raise ValueError(f"GeneOntology: branch must be MF, BP or CC, got {branch!r}; pass --branch MF.")
    b = branches.index(branch)
    with open(path, newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = [next(reader) for _ in range(12)]
        terms = header[4 * b + 1]
        next(reader)
        index = {t: i for i, t in enumerate(terms)}
        annotation = {}
        for row in reader:
            if row:
                field = row[b + 1] if b + 1 < len(row) else ""
                annotation[row[0]] = [index[t] for t in field.split(",") if t]
        return terms, annotation


class _DeepFRI(StructureDataset):
    url: str
    md5: str
    folder: str
    prefix: str

    def _prepare(self, path, test_cutoff: float, workers: int, progress: bool, three_di: bool):
        root = Path(os.path.expanduser(str(path)))
        folder = root / self.folder
        if not all((folder / s).is_dir() or (folder / f"{s}.zip").is_file() for s in SPLITS):
            extract(download(self.url, root, self.md5), root)
        for split in SPLITS:
            if not (folder / split).is_dir() and (folder / f"{split}.zip").is_file():
                extract(folder / f"{split}.zip", folder)
        files = [f for split in SPLITS for f in sorted((folder / split).iterdir()) if is_structure_file(f)]
        removed = read_test_csv(folder / f"{self.prefix}_test.csv", test_cutoff) if test_cutoff < 1 else set()
        self.proteins, self.skipped = load_or_build(files, folder / f"{self.prefix}.cache.pt", workers=workers,
                                                    progress=progress, three_di=three_di)
        return folder, removed

    def _label(self, terms: List[str], annotation: Dict[str, List[int]], removed: set):
        self.tasks = terms
        targets, splits = [], {s: [] for s in SPLITS}
        missing = []
        for i, file in enumerate(self.proteins.files):
            name, split = chain_id(Path(file)), Path(file).parent.name
            if name not in annotation:
                missing.append(name)
            vector = torch.zeros(len(terms))
            vector[annotation.get(name, [])] = 1
            targets.append(vector)
            if split != "test" or name not in removed:
                splits[split].append(i)
        if missing:
            logger.warning("%d chains have no annotation line (all-zero targets), e.g. %s", len(missing), missing[0])
        self.targets = torch.stack(targets) if targets else torch.zeros(0, len(terms))
        self.split_indices = [splits[s] for s in SPLITS]


@register
class EnzymeCommission(_DeepFRI):
    """Enzyme Commission numbers of PDB chains (538 terms); test chains filtered by `test_cutoff`.

    Args:
        path: folder holding (or receiving) `EnzymeCommission/`; test_cutoff: 0.3, 0.4, 0.5, 0.7 or 0.95;
        transform: applied to every item; workers: parsing processes for the first preprocessing.
        three_di: compute every protein's Foldseek 3Di states once, in preprocessing, and keep them in the cache
            (`Protein.three_di_state`; see `esm_gearnet.data.three_di`).
    """
    url = "https://zenodo.org/record/6622158/files/EnzymeCommission.zip"
    md5 = "33f799065f8ad75f87b709a87293bc65"
    folder, prefix = "EnzymeCommission", "nrPDB-EC"

    def __init__(self, path, test_cutoff: float = 0.95, transform=None, workers: int = 2, progress: bool = True,
                 verbose: int = 0, atom_feature: None = None, bond_feature: None = None,
                 residue_feature: Literal["default"] = "default", three_di: bool = False):
        folder, removed = self._prepare(path, test_cutoff, workers, progress, three_di)
        self._label(*read_ec_annotation(folder / f"{self.prefix}_annot.tsv"), removed)
        self.transform = transform


@register
class GeneOntology(_DeepFRI):
    """Gene Ontology terms of PDB chains for one branch (MF 489, BP 1,943, CC 320 terms).

    Args:
        path: folder holding (or receiving) `GeneOntology/`; branch: MF, BP or CC; test_cutoff, transform,
        workers, three_di: as for EnzymeCommission.
    """
    url = "https://zenodo.org/record/6622158/files/GeneOntology.zip"
    md5 = "376be1f088cd1fe720e1eaafb701b5cb"
    folder, prefix = "GeneOntology", "nrPDB-GO"

    def __init__(self, path, branch: Literal["MF", "BP", "CC"] = "MF", test_cutoff: float = 0.95, transform=None, workers: int = 2,
                 progress: bool = True, verbose: int = 0, atom_feature: None = None, bond_feature: None = None,
                 residue_feature: Literal["default"] = "default", three_di: bool = False):
        folder, removed = self._prepare(path, test_cutoff, workers, progress, three_di)
        self.branch = branch
        self._label(*read_go_annotation(folder / f"{self.prefix}_annot.tsv", branch), removed)
        self.transform = transform
