"""Dataset item transforms, with the original config names.

Items are dicts as datasets return them, `{"graph": Protein, ...}`; a bare `Protein` is accepted too.
Transforms return new items and never change their input.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from ..registry import register
from .protein import Protein


def _apply(item, keys, fn):
    if isinstance(item, Protein):
        return fn(item)
    new_item = dict(item)
    for key in keys:
        new_item[key] = fn(item[key])
    return new_item


def _keys(keys: Union[str, Sequence[str]]):
    return (keys,) if isinstance(keys, str) else tuple(keys)


@register
class ProteinView:
    """Chooses the node view of the protein. Only the residue view exists here: models work on residues.

    Args:
        view: "residue" ("atom" views of the original are not supported).
    """

    def __init__(self, view: str = "residue", keys: Union[str, Sequence[str]] = "graph"):
        if view != "residue":
            raise ValueError(f"ProteinView: view {view!r} is not supported; esm_gearnet models work on residues, "
                             "use view: residue.")
        self.view = view
        self.keys = _keys(keys)

    def __call__(self, item):
        return item

    def __repr__(self):
        return f"ProteinView(view={self.view!r})"


@register
class TruncateProtein:
    """Keeps at most `max_length` consecutive residues: the first ones, or a random window when `random`.

    Args:
        max_length: the longest protein kept whole.
        random: draw the window start uniformly (torch's generator, so DataLoader workers are seeded).
        keys: item keys holding proteins.
    """

    def __init__(self, max_length: Optional[int] = None, random: bool = False, keys: Union[str, Sequence[str]] = "graph"):
        self.max_length = max_length
        self.random = random
        self.keys = _keys(keys)

    def truncate(self, protein: Protein) -> Protein:
        length = protein.num_residue
        if self.max_length is None or length <= self.max_length:
            return protein
        start = int(torch.randint(length - self.max_length + 1, ())) if self.random else 0
        return protein.subresidue(torch.arange(start, start + self.max_length))

    def __call__(self, item):
        return _apply(item, self.keys, self.truncate)

    def __repr__(self):
        return f"TruncateProtein(max_length={self.max_length}, random={self.random})"


@register
class TruncateProteinPair:
    """Cuts a wild-type / mutant pair (`graph1`, `graph2`) to the same window of at most `max_length` residues
    around the mutation (the first residue whose types differ).

    Without `random` the window is centred on the mutation (moved inwards at the ends); with `random` its
    start is drawn uniformly among the windows that hold the mutation. A pair without a differing residue is
    cut from its start. DEVIATION: the original's random branch called `math.randint`, which does not exist.
    """

    def __init__(self, max_length: Optional[int] = None, random: bool = False):
        self.max_length = max_length
        self.random = random

    def __call__(self, item):
        wild, mutant = item["graph1"], item["graph2"]
        length = wild.num_residue
        if self.max_length is None or length <= self.max_length:
            return item
        if mutant.num_residue != length:
            raise ValueError(f"TruncateProteinPair: the pair has {length} and {mutant.num_residue} residues; "
                             "the wild type and the mutant must have the same residues.")
        window = self.max_length
        mutated = (wild.residue_type != mutant.residue_type).nonzero()
        site = int(mutated[0, 0]) if len(mutated) else 0
        if self.random and len(mutated):
            low, high = max(site - window + 1, 0), min(site, length - window)
            start = low + int(torch.randint(high - low + 1, ()))
        else:
            start = min(max(site - window // 2, 0), length - window) if len(mutated) else 0
        index = torch.arange(start, start + window)
        return {**item, "graph1": wild.subresidue(index), "graph2": mutant.subresidue(index)}

    def __repr__(self):
        return f"TruncateProteinPair(max_length={self.max_length}, random={self.random})"


@register
class ResidueGraph:
    """Removes residues without a CA atom (the nodes of CDConv are CA atoms)."""

    def __init__(self, keys: Union[str, Sequence[str]] = "graph"):
        self.keys = _keys(keys)

    @staticmethod
    def keep_alpha_carbons(protein: Protein) -> Protein:
        has_ca = protein.atom_mask[:, 1]
        return protein if bool(has_ca.all()) else protein.subresidue(has_ca)

    def __call__(self, item):
        return _apply(item, self.keys, self.keep_alpha_carbons)

    def __repr__(self):
        return "ResidueGraph()"


@register
class Orientation:
    """Accepted for the original CDConv configs, and returns items unchanged: CDConv computes the residue
    frames itself on the device from the CA positions it is given (`esm_gearnet.models.cdconv.local_frames`),
    which gives the same frames as computing them here after truncation."""

    def __init__(self, keys: Union[str, Sequence[str]] = "graph"):
        self.keys = _keys(keys)

    def __call__(self, item):
        return item

    def __repr__(self):
        return "Orientation()"


@register
class Compose:
    """Applies transforms one after the other."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, item):
        for transform in self.transforms:
            item = transform(item)
        return item

    def __repr__(self):
        return f"Compose({self.transforms!r})"
