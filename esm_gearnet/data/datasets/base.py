"""What structure datasets share: packed proteins from the cache, targets, splits, transforms.

The original's datasets took TorchDrug's featurisation options; EC, GO, PSR, MSP and AlphaFoldDB accept them by
name with the values the original's configs use (`atom_feature: null`, `bond_feature: null`, `residue_feature:
default`) and refuse any other, since the encoders featurise residues themselves (a 21-dim one-hot).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Union

import torch

from ..protein import Protein
from .cache import PackedProteins


class StructureDataset(torch.utils.data.Dataset):
    """Items are {"graph": Protein, "targets": [T] float}; `split()` gives (train, valid, test) subsets.

    Subclasses set `proteins` (PackedProteins, or any sequence of Protein), `targets` ([n, T] tensor), `tasks` (names) and
    `split_indices` (three index lists), and may set `transform`.
    """

    proteins: Union[PackedProteins, Sequence[Protein]]
    targets: torch.Tensor
    tasks: List[str]
    split_indices: List[List[int]]
    transform = None

    def __len__(self) -> int:
        return len(self.proteins)

    def item(self, index: int) -> Dict:
        """The untransformed item; datasets with other keys (PSR, MSP) override this."""
        return {"graph": self.proteins[index], "targets": self.targets[index]}

    def __getitem__(self, index: int) -> Dict:
        item = self.item(index)
        return self.transform(item) if self.transform is not None else item

    def split(self) -> Sequence[torch.utils.data.Subset]:
        return [torch.utils.data.Subset(self, indices) for indices in self.split_indices]

    @property
    def num_samples(self) -> List[int]:
        return [len(indices) for indices in self.split_indices]

    def __repr__(self) -> str:
        train, valid, test = self.num_samples
        return f"{type(self).__name__}(proteins={len(self)}, tasks={len(self.tasks)}, split={train}/{valid}/{test})"


class Proteins(torch.utils.data.Dataset):
    """Items {"graph": protein} of given proteins through a dataset's transform: what a trained task is fed by
    `predict`."""

    def __init__(self, proteins: Sequence[Protein], transform=None):
        self.proteins, self.transform = proteins, transform

    def __len__(self) -> int:
        return len(self.proteins)

    def __getitem__(self, index: int) -> Dict:
        item = {"graph": self.proteins[index]}
        return self.transform(item) if self.transform is not None else item
