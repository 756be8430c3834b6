"""`Protein` (one structure, residue level) and `ProteinBatch` (a packed batch of them).

Per-residue fields, with L residues of one protein or N packed residues of a batch:

=================  ==============  ==========================================================================
field              shape, dtype    meaning
=================  ==============  ==========================================================================
residue_type       [L] long        0..19 in the order of `constants.RESIDUE_LETTERS`, 20 = unknown
atom_pos           [L, 14, 3] f32  heavy-atom coordinates (Å) in the atom14 layout; slots 0-3 = N, CA, C, O
atom_mask          [L, 14] bool    which slots hold an atom read from the file
residue_number     [L] long        author residue number
insertion_code     [L] uint8       ASCII code of the insertion code, 32 (space) when there is none
chain_index        [L] long        index into the protein's `chain_ids`
bfactor            [L] f32         B-factor of the CA atom (pLDDT in AlphaFold DB files)
three_di_state     [L] long        optional (None unless a dataset computed it): Foldseek 3Di state 0..19,
                                   20 where the encoder cannot place the residue (`data.three_di`)
=================  ==============  ==========================================================================

Every field is indexed the same way, so selecting residues is one generic operation (`subresidue`) that keeps
them consistent. Objects are never changed in place: methods return new objects.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..layers import functional
from . import constants

RESIDUE_FIELDS = ("residue_type", "atom_pos", "atom_mask", "residue_number", "insertion_code", "chain_index", "bfactor")
OPTIONAL_RESIDUE_FIELDS = ("three_di_state",)  # None, or indexed like the fields above
_BLANK = ord(" ")


def _sequence(residue_type: torch.Tensor) -> str:
    letters = constants.RESIDUE_LETTERS + constants.UNKNOWN_LETTER
    return "".join(letters[i] for i in residue_type.tolist())


class _ResidueFields:
    """Views shared by Protein and ProteinBatch, over the per-residue fields."""

    @property
    def num_residue(self) -> int:
        return len(self.residue_type)

    @property
    def pos(self) -> torch.Tensor:
        """[L or N, 3] CA coordinates (Å)."""
        return self.atom_pos[:, 1]

    @property
    def backbone(self) -> torch.Tensor:
        """[L or N, 4, 3] N, CA, C, O coordinates (Å); see `backbone_mask` for missing atoms."""
        return self.atom_pos[:, :4]

    @property
    def backbone_mask(self) -> torch.Tensor:
        """[L or N, 4] bool."""
        return self.atom_mask[:, :4]

    def residue_fields(self) -> Dict[str, torch.Tensor]:
        """The per-residue tensors, the optional ones included where they are set."""
        fields = {k: getattr(self, k) for k in RESIDUE_FIELDS}
        fields.update({k: getattr(self, k) for k in OPTIONAL_RESIDUE_FIELDS if getattr(self, k) is not None})
        return fields

    def replace(self, **changes):
        """A copy with some fields changed (objects are never changed in place).

        `three_di_state` describes the atoms: a copy with new `atom_pos` or `atom_mask` and no new states has
        none (a model that reads them computes them from the new atoms), so moved or noised coordinates never
        keep the states of the old ones.
        """
        if ("atom_pos" in changes or "atom_mask" in changes) and "three_di_state" not in changes:
            changes["three_di_state"] = None
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, eq=False)
class Protein(_ResidueFields):
    """Residue-level record of one structure (see the module docstring for the fields).

    Attributes besides the per-residue fields:
        chain_ids: chain identifier of each `chain_index`.
        name: identifier, usually the file stem.
        labels: per-protein labels (tensors, numbers or strings).
        num_dropped: residues of the file left out because they had no CA atom.
        three_di_state: see the module docstring; set by datasets built with `three_di=True`.
    """

    residue_type: torch.Tensor
    atom_pos: torch.Tensor
    atom_mask: torch.Tensor
    residue_number: torch.Tensor
    insertion_code: torch.Tensor
    chain_index: torch.Tensor
    bfactor: torch.Tensor
    chain_ids: Tuple[str, ...] = ("A",)
    name: str = ""
    labels: Dict[str, Any] = field(default_factory=dict)
    num_dropped: int = 0
    three_di_state: Optional[torch.Tensor] = None

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, arrays: Dict[str, np.ndarray], **meta) -> "Protein":
        """Build from numpy arrays named like the per-residue fields (as `io` produces them); the optional
        fields are read when `arrays` holds them."""
        names = RESIDUE_FIELDS + tuple(k for k in OPTIONAL_RESIDUE_FIELDS if k in arrays)
        return cls(**{k: torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in names}, **meta)

    @classmethod
    def from_sequence(cls, sequence: str, ca: Optional[torch.Tensor] = None, name: str = "", **meta) -> "Protein":
        """A protein from a one-letter sequence and (optionally) CA coordinates [L, 3]; other atoms missing."""
        length = len(sequence)
        atom_pos = torch.zeros(length, constants.NUM_ATOM_SLOTS, 3)
        atom_mask = torch.zeros(length, constants.NUM_ATOM_SLOTS, dtype=torch.bool)
        if ca is not None:
            atom_pos[:, 1] = torch.as_tensor(ca, dtype=torch.float32)
            atom_mask[:, 1] = True
        return cls(
            residue_type=torch.tensor([constants.LETTER_TO_TYPE.get(c, constants.UNKNOWN) for c in sequence],
                                      dtype=torch.long),
            atom_pos=atom_pos, atom_mask=atom_mask,
            residue_number=torch.arange(1, length + 1),
            insertion_code=torch.full((length,), _BLANK, dtype=torch.uint8),
            chain_index=torch.zeros(length, dtype=torch.long),
            bfactor=torch.zeros(length),
            name=name, **meta,
        )

    # ---- views --------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_residue

    @property
    def sequence(self) -> str:
        """One-letter sequence, `X` for unknown residues."""
        return _sequence(self.residue_type)

    @property
    def chain(self) -> List[str]:
        """Chain identifier of every residue."""
        return [self.chain_ids[i] for i in self.chain_index.tolist()]

    @property
    def insertion_codes(self) -> str:
        """Insertion code of every residue as one string, a space where there is none."""
        return bytes(self.insertion_code.tolist()).decode("ascii")

    # ---- derived objects ----------------------------------------------------------------------------------
    def subresidue(self, index: torch.Tensor) -> "Protein":
        """The protein restricted to some residues.

        Args:
            index: [L] bool mask, or long indices (kept in the given order).
        """
        changes = {k: v[index] for k, v in self.residue_fields().items()}
        return self.replace(**changes)

    def to(self, device, non_blocking: bool = False) -> "Protein":
        return self.replace(**{k: v.to(device, non_blocking=non_blocking) for k, v in self.residue_fields().items()})

    def __repr__(self) -> str:
        return f"Protein(name={self.name!r}, num_residue={self.num_residue}, chains={''.join(self.chain_ids)!r})"


@dataclass(frozen=True, eq=False)
class ProteinBatch(_ResidueFields):
    """Packed batch of proteins: per-residue fields concatenated over B proteins (N rows in all).

    Attributes besides the per-residue fields (same names and meaning as in `Protein`):
        num_residues: [B] long, residues per protein.
        residue2graph: [N] long, protein of each residue.
        chain_ids, names, num_dropped: per protein, lists of length B.
        three_di_state: [N] long, packed like the per-residue fields, when every protein has it; else None.
        labels: per-protein labels, a tensor [B, ...] where they stack, else a list.
        edge_list: [E, 3] long (source, target, relation) indices into the packed residues, or None before
            graph construction.
        num_relation: R, the number of edge relations.
        edge_feature: [E, De] float or None.
    """

    residue_type: torch.Tensor
    atom_pos: torch.Tensor
    atom_mask: torch.Tensor
    residue_number: torch.Tensor
    insertion_code: torch.Tensor
    chain_index: torch.Tensor
    bfactor: torch.Tensor
    num_residues: torch.Tensor
    residue2graph: torch.Tensor
    chain_ids: List[Tuple[str, ...]]
    names: List[str]
    labels: Dict[str, Any] = field(default_factory=dict)
    num_dropped: List[int] = field(default_factory=list)
    edge_list: Optional[torch.Tensor] = None
    num_relation: int = 0
    edge_feature: Optional[torch.Tensor] = None
    three_di_state: Optional[torch.Tensor] = None

    @classmethod
    def pack(cls, proteins: Sequence[Protein]) -> "ProteinBatch":
        """Concatenate proteins into one packed batch."""
        if not proteins:
            raise ValueError("ProteinBatch.pack needs at least one protein.")
        fields = {k: torch.cat([getattr(p, k) for p in proteins]) for k in RESIDUE_FIELDS}
        fields.update({k: torch.cat([getattr(p, k) for p in proteins]) for k in OPTIONAL_RESIDUE_FIELDS
                       if all(getattr(p, k) is not None for p in proteins)})
        num_residues = torch.tensor([p.num_residue for p in proteins], dtype=torch.long,
                                    device=fields["residue_type"].device)
        return cls(
            **fields,
            num_residues=num_residues,
            residue2graph=functional.segment_ids(num_residues),
            chain_ids=[p.chain_ids for p in proteins],
            names=[p.name for p in proteins],
            labels=_stack_labels([p.labels for p in proteins]),
            num_dropped=[p.num_dropped for p in proteins],
        )

    # ---- views --------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return len(self.num_residues)

    def __len__(self) -> int:
        return self.batch_size

    @property
    def device(self) -> torch.device:
        return self.residue_type.device

    @property
    def offsets(self) -> torch.Tensor:
        """[B] index of each protein's first residue in the packed rows."""
        return functional.offsets(self.num_residues)

    @property
    def global_chain(self) -> torch.Tensor:
        """[N] long, a chain index unique over the whole batch."""
        num_chains = torch.tensor([len(c) for c in self.chain_ids], dtype=torch.long, device=self.device)
        return self.chain_index + functional.offsets(num_chains)[self.residue2graph]

    @property
    def num_edges(self) -> torch.Tensor:
        """[B] edges whose target lies in each protein."""
        if self.edge_list is None:
            return torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        return torch.bincount(self.residue2graph[self.edge_list[:, 1]], minlength=self.batch_size)

    @property
    def sequences(self) -> List[str]:
        text = _sequence(self.residue_type)
        bounds = np.cumsum([0] + self.num_residues.tolist())
        return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    # ---- derived objects ----------------------------------------------------------------------------------
    def subresidue(self, mask: torch.Tensor) -> "ProteinBatch":
        """Keep the residues where `mask [N]` is True; edges between kept residues survive, renumbered.

        Proteins stay in the batch (possibly with zero residues), so per-protein labels keep their meaning.
        """
        mask = mask.to(self.device)
        if mask.dtype != torch.bool:
            raise TypeError("ProteinBatch.subresidue takes a boolean mask over the packed residues.")
        changes = {k: v[mask] for k, v in self.residue_fields().items()}
        residue2graph = self.residue2graph[mask]
        changes["residue2graph"] = residue2graph
        changes["num_residues"] = torch.bincount(residue2graph, minlength=self.batch_size)
        if self.edge_list is not None:
            new_index = torch.cumsum(mask.long(), 0) - 1
            keep = mask[self.edge_list[:, 0]] & mask[self.edge_list[:, 1]]
            edges = self.edge_list[keep]
            changes["edge_list"] = torch.stack([new_index[edges[:, 0]], new_index[edges[:, 1]], edges[:, 2]], -1)
            if self.edge_feature is not None:
                changes["edge_feature"] = self.edge_feature[keep]
        return self.replace(**changes)

    def _map_tensors(self, fn) -> "ProteinBatch":
        """A copy with `fn` applied to every tensor field and tensor label."""
        def apply(v):
            return fn(v) if isinstance(v, torch.Tensor) else v

        changes = {f.name: apply(getattr(self, f.name)) for f in dataclasses.fields(self)}
        changes["labels"] = {k: apply(v) for k, v in self.labels.items()}
        return self.replace(**changes)

    def to(self, device, non_blocking: bool = False) -> "ProteinBatch":
        return self._map_tensors(lambda v: v.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "ProteinBatch":
        """Called by DataLoader(pin_memory=True)."""
        return self._map_tensors(torch.Tensor.pin_memory)

    def unpack(self) -> List[Protein]:
        """The proteins of the batch, one by one (edges are not carried over)."""
        bounds = np.cumsum([0] + self.num_residues.tolist())
        proteins = []
        for b in range(self.batch_size):
            sl = slice(int(bounds[b]), int(bounds[b + 1]))
            labels = {k: v[b] for k, v in self.labels.items()}
            proteins.append(Protein(**{k: v[sl] for k, v in self.residue_fields().items()},
                                    chain_ids=self.chain_ids[b], name=self.names[b], labels=labels,
                                    num_dropped=self.num_dropped[b] if self.num_dropped else 0))
        return proteins

    def __repr__(self) -> str:
        edges = "" if self.edge_list is None else f", num_edge={len(self.edge_list)}, num_relation={self.num_relation}"
        return f"ProteinBatch(batch_size={self.batch_size}, num_residue={self.num_residue}{edges})"


def _stack_labels(label_dicts: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Labels present in every protein, stacked into a tensor where they have one shape, else a list."""
    if not label_dicts:
        return {}
    keys = set(label_dicts[0]).intersection(*label_dicts[1:])
    out = {}
    for key in sorted(keys):
        values = [d[key] for d in label_dicts]
        try:
            out[key] = torch.stack([torch.as_tensor(v) for v in values])
        except (TypeError, ValueError, RuntimeError):
            out[key] = values
    return out


def collate(items: Sequence[Any]):
    """Collate function for `torch.utils.data.DataLoader`.

    Items may be `Protein`s (gives a `ProteinBatch`) or dicts as datasets return them,
    `{"graph": Protein, "targets": ..., ...}`: proteins are packed, tensors and numbers stacked, other values
    gathered in lists.
    """
    first = items[0]
    if isinstance(first, Protein):
        return ProteinBatch.pack(items)
    if isinstance(first, dict):
        return {key: collate([item[key] for item in items]) for key in first}
    if isinstance(first, (torch.Tensor, np.ndarray, int, float, bool, np.number)):
        return torch.stack([torch.as_tensor(v) for v in items])
    return list(items)
