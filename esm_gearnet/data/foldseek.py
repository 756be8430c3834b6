"""Foldseek's 3Di structural alphabet, computed in-process with `mini3di` (a NumPy port of Foldseek's encoder
with its trained weights; no Foldseek binary).

Each residue gets one of 20 states, written as the letters `THREE_DI_LETTERS` ("ACDEFGHIKLMNPQRSTVWY", state i
is letter i, as in Foldseek and SaProt). A state describes the residue's backbone geometry together with that
of its nearest residue in space (its "partner", by the distance between virtual centres placed from CA, CB and
N). It depends only on distances and angles, so a rigid motion of the structure leaves it unchanged (up to
ties that float32 rounding can break, e.g. two partners at the same distance to within 1e-4 Å).

**Residues the encoder cannot place.** As in Foldseek, a residue gets no state when

* one of its N, CA, C atoms is missing, or that of a sequence neighbour (i - 1, i + 1) or of its partner's
  (j - 1, j, j + 1): the descriptors are built from these CA atoms;
* it is the first or the last residue of its chain (no i - 1 or i + 1);
* no partner can be found: its chain has no other complete residue besides the two chain ends.

Such residues get the placeholder letter, by default `D`: Foldseek writes its invalid state (2) there, which is
the letter D, so the default strings read like Foldseek's own, the ones SaProt's structure tokens were made from
(`d` there). Pass `placeholder="#"` (SaProt's masked-structure token) to tell them apart from a real state D;
`three_di_states` marks them with `NO_STATE` (20).

**Chains.** Each chain is encoded on its own, as Foldseek does (a residue's partner is in its own chain).
Residues are taken in the order of the protein; like Foldseek, gaps in the residue numbering within a chain
(unmodelled loops) are not detected: the residues either side of a gap are treated as neighbours. CB is the
atom from the file where there is one, else (glycine, or a missing CB) the virtual CB that Foldseek places from
N, CA and C.
"""
from __future__ import annotations

import functools
from typing import Dict

import numpy as np
import torch

THREE_DI_LETTERS = "ACDEFGHIKLMNPQRSTVWY"
NUM_STATES = 20
NO_STATE = 20  # a residue the encoder cannot place
FOLDSEEK_PLACEHOLDER = "D"  # the letter of Foldseek's INVALID_STATE (2)
_CB_SLOT = 4  # the first side-chain slot holds CB for every residue type but glycine (constants.ATOM_SLOTS)


@functools.lru_cache(maxsize=1)
def require_encoder():
    """mini3di's encoder (its weights loaded once per process); ImportError with the fix when it is absent."""
    try:
        import mini3di
    except ImportError:
        raise ImportError("3Di tokens need the mini3di package (a pure-Python wheel): pip install mini3di") from None
    return mini3di.Encoder()


def backbone_arrays(atom_pos: np.ndarray, atom_mask: np.ndarray):
    """The encoder's inputs: (CA, CB, N, C), each a float64 [L, 3] array with NaN rows for missing atoms.

    Args:
        atom_pos: [L, 14, 3], atom_mask: [L, 14], in the atom14 layout of `Protein`.

    CB is NaN for glycine and wherever CB is missing: the encoder then places a virtual CB from N, CA and C.
    """
    pos = np.asarray(atom_pos, dtype=np.float64)
    mask = np.asarray(atom_mask, dtype=bool)
    arrays = []
    for slot in (1, _CB_SLOT, 0, 2):
        xyz = pos[:, slot].copy()
        xyz[~mask[:, slot]] = np.nan
        arrays.append(xyz)
    return tuple(arrays)


def _chain_states(ca, cb, n, c) -> np.ndarray:
    """States 0..19 of one chain, `NO_STATE` where the encoder cannot place a residue."""
    # DEVIATION (from mini3di, towards Foldseek): Foldseek marks a residue without a candidate partner (no other
    # complete residue off the chain ends) invalid; mini3di's nearest-neighbour search then returns index 0 and,
    # in a chain of 3 residues, encodes a state for the middle one from it ("DVD" where Foldseek writes "DDD").
    # Chains with fewer than two complete interior residues get no state at all, as in Foldseek.
    complete = ~(np.isnan(ca).any(1) | np.isnan(n).any(1) | np.isnan(c).any(1))
    if complete[1:-1].sum() < 2:
        return np.full(len(ca), NO_STATE, dtype=np.int64)
    states = require_encoder().encode_atoms(ca, cb, n, c)
    return np.where(np.ma.getmaskarray(states), NO_STATE, np.ma.getdata(states)).astype(np.int64)


def states_of_arrays(atom_pos: np.ndarray, atom_mask: np.ndarray, chain_index: np.ndarray) -> np.ndarray:
    """`three_di_states` on numpy arrays (the per-residue fields as `io` parses them): [L] int64."""
    out = np.full(len(chain_index), NO_STATE, dtype=np.int64)
    if len(out):
        ca, cb, n, c = backbone_arrays(atom_pos, atom_mask)
        for chain in np.unique(chain_index):
            rows = np.flatnonzero(chain_index == chain)
            out[rows] = _chain_states(ca[rows], cb[rows], n[rows], c[rows])
    return out


def batch_states(batch) -> torch.Tensor:
    """`three_di_states` of every protein of a packed `ProteinBatch`, each chain of each protein on its own:
    [N] long on the batch's device."""
    num_chains = int(batch.chain_index.max()) + 1 if batch.num_residue else 1
    chain = batch.residue2graph.long() * num_chains + batch.chain_index.long()
    states = states_of_arrays(batch.atom_pos.detach().cpu().numpy(), batch.atom_mask.detach().cpu().numpy(),
                              chain.cpu().numpy())
    return torch.from_numpy(states).to(batch.atom_pos.device)


def three_di_states(protein) -> torch.Tensor:
    """Foldseek 3Di states of every residue, chain by chain.

    Args:
        protein: a `Protein` (its `atom_pos`, `atom_mask` and `chain_index` are read).
    Returns:
        [L] long, 0..19 (letters `THREE_DI_LETTERS`), `NO_STATE` (20) where the encoder cannot place the residue
        (see the module docstring), on the protein's device.
    """
    states = states_of_arrays(*(t.detach().cpu().numpy() for t in (protein.atom_pos, protein.atom_mask,
                                                                    protein.chain_index)))
    return torch.from_numpy(states).to(protein.atom_pos.device)


def add_states(arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Per-residue arrays (as `io` parses them) with their `three_di_state` added (a new dict)."""
    return {**arrays, "three_di_state": states_of_arrays(arrays["atom_pos"], arrays["atom_mask"],
                                                         arrays["chain_index"])}


def three_di_letters(states: torch.Tensor, placeholder: str = FOLDSEEK_PLACEHOLDER) -> str:
    """The string of states [L] (`NO_STATE` becomes `placeholder`, one character)."""
    if len(placeholder) != 1:
        raise ValueError(f"three_di: the placeholder must be one character, got {placeholder!r}.")
    letters = THREE_DI_LETTERS + placeholder
    return "".join(letters[i] for i in states.tolist())


def three_di(protein, placeholder: str = FOLDSEEK_PLACEHOLDER) -> str:
    """One Foldseek 3Di letter per residue, computed from the protein's backbone atoms.

    Args:
        protein: a `Protein`; every chain is encoded on its own.
        placeholder: the letter of residues the encoder cannot place (chain ends, missing N/CA/C atoms here or
            at the residues the descriptors read, no partner; see the module docstring). The default `D` is
            what Foldseek writes there (its invalid state); `#` is SaProt's masked-structure token.
    Returns:
        A string of `protein.num_residue` letters of `THREE_DI_LETTERS` and `placeholder`.

    Datasets built with `three_di=True` compute the states once, in preprocessing, and keep them in the cache:
    their proteins carry them in `Protein.three_di_state` (`three_di_letters(protein.three_di_state)` is this
    string, and crops keep it aligned).
    """
    return three_di_letters(three_di_states(protein), placeholder)
