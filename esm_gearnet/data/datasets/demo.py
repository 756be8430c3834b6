"""`DemoFolds`: a deterministic, download-free dataset of generated backbones for the demo and the tests.

Every protein is an ideal backbone (Engh & Huber bond geometry, see `data.synthetic`) whose secondary
structure layout follows one of a few families; its sequence is sampled residue by residue from propensities
of its secondary structure. The label of a protein is its family, given as one binary target per family so
the EC/GO task (`MultipleBinaryClassification`) runs on it unchanged. Both the sequence (composition) and the
structure (helix, strand and loop geometry) carry the label, with noise: segment lengths vary and a fraction
of residues are sampled from the background distribution.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch

from ...registry import register
from ..synthetic import backbone_protein
from .base import StructureDataset
from .cache import with_three_di

# residue letters favoured by each secondary structure, and the background of all 20
PROPENSITY = {"H": "AAELLKKMQRE", "E": "VVIIYFTWTC", "L": "GGPNDSSGTP"}
BACKGROUND = "GASPVTCILNDQKEMHFRYW"

# family: (segment kinds in order, repeats) -- lengths are drawn per segment
FAMILIES = {
    "all_alpha": ("HL", 3),
    "all_beta": ("EL", 5),
    "alpha_beta": ("HLEL", 2),
    "disordered": ("L", 1),
}
SEGMENT_LENGTH = {"H": (10, 18), "E": (5, 9), "L": (3, 6)}


def _layout(family: str, rng: np.random.Generator) -> str:
    kinds, repeats = FAMILIES[family]
    if family == "disordered":
        return "L" * int(rng.integers(40, 70))
    layout = "L" * int(rng.integers(2, 5))
    for _ in range(repeats):
        for kind in kinds:
            lo, hi = SEGMENT_LENGTH[kind]
            layout += kind * int(rng.integers(lo, hi + 1))
    return layout


def _sequence(layout: str, rng: np.random.Generator, noise: float) -> str:
    letters = []
    for kind in layout:
        pool = BACKGROUND if rng.random() < noise else PROPENSITY[kind]
        letters.append(pool[int(rng.integers(len(pool)))])
    return "".join(letters)


@register
class DemoFolds(StructureDataset):
    """Generated proteins in `len(FAMILIES)` families, split 80/10/10.

    Args:
        num_protein: proteins generated (deterministically from `seed`).
        noise: fraction of residues drawn from the background instead of their structure's propensities.
        path: accepted for config symmetry with the real datasets; nothing is read or written.
        transform: applied to every item.
        three_di: give every protein its Foldseek 3Di states (`Protein.three_di_state`), computed here once.
    """

    def __init__(self, num_protein: int = 200, seed: int = 0, noise: float = 0.5, path: Optional[str] = None,
                 transform=None, three_di: bool = False):
        rng = np.random.default_rng(seed)
        self.tasks: List[str] = list(FAMILIES)
        self.transform = transform
        self.proteins, labels = [], []
        for i in range(num_protein):
            family = i % len(FAMILIES)
            layout = _layout(self.tasks[family], rng)
            self.proteins.append(backbone_protein(_sequence(layout, rng, noise), layout, name=f"demo_{i:05d}"))
            labels.append(family)
        if three_di:
            self.proteins = with_three_di(self.proteins)
        self.targets = torch.nn.functional.one_hot(torch.tensor(labels), len(FAMILIES)).float()
        order = torch.randperm(num_protein, generator=torch.Generator().manual_seed(seed)).tolist()
        num_train, num_valid = int(0.8 * num_protein), int(0.1 * num_protein)
        self.split_indices = [order[:num_train], order[num_train:num_train + num_valid],
                              order[num_train + num_valid:]]

    def __repr__(self) -> str:
        return f"DemoFolds(num_protein={len(self)}, families={self.tasks})"
