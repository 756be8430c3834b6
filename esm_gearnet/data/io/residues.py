"""From atoms to residues: residues grouped as gemmi forms them, residue types, the altloc and
micro-heterogeneity choices, duplicate atoms refused, and the atom14 arrays of `Protein`."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from .. import constants
from .atoms import _Atoms, _changes
from .errors import StructureError
from .text import _perfect_hash

# residue name -> residue type index, or None for residues that are not amino acids (filled lazily)
_TYPE_OF_RESIDUE = {three: constants.LETTER_TO_TYPE[one] for three, one in constants.THREE_TO_ONE.items()}


def residue_type_of(code: str) -> Optional[int]:
    if code in _TYPE_OF_RESIDUE:
        return _TYPE_OF_RESIDUE[code]
    result = None
    if constants.is_amino_acid(code):
        letter = constants.residue_letter(code)
        result = constants.LETTER_TO_TYPE.get(letter, constants.UNKNOWN)
    _TYPE_OF_RESIDUE[code] = result
    return result


def _name_table():
    """The uint32 codes of every placement of the atom14 names in 4 characters (and unpadded, as mmCIF writes
    them), their name column, the slot of each (residue type, name column) flattened (the last row, not a
    candidate residue, and the last column, not an atom14 name, hold -1), and the number of columns."""
    names = sorted({n for layout in constants.ATOM_SLOTS for n in layout} | set(constants.ATOM_ALIASES))
    codes = {}
    for i, name in enumerate(names):
        for left in range(5 - len(name)):
            codes[int.from_bytes((" " * left + name).ljust(4).encode(), "little")] = i
    for i, name in enumerate(names):  # names as mmCIF gives them (no padding)
        codes.setdefault(int.from_bytes(name.encode(), "little"), i)
    slots = np.full((len(constants.ATOM_SLOTS) + 1, len(names) + 1), -1, np.int64)
    for rtype, layout in enumerate(constants.ATOM_SLOTS):
        for i, name in enumerate(names):
            slot = layout.get(name, layout.get(constants.ATOM_ALIASES.get(name)))
            slots[rtype, i] = -1 if slot is None else slot
    return np.array(list(codes), np.uint32), np.array(list(codes.values())), slots.ravel(), len(names) + 1


_NAME_KEYS, _NAME_COLUMN, _SLOT_OF, _NUM_NAME_COLUMNS = _name_table()
_NAME_HASH, _NAME_OF_SLOT = _perfect_hash(_NAME_KEYS, 12)
_NAME_SHIFT = np.uint32(32 - 12)
_NOT_CANDIDATE = len(constants.ATOM_SLOTS)


class _Residues(NamedTuple):
    first: np.ndarray          # [R] first atom of each residue (atoms grouped contiguously per residue)
    first_in_file: np.ndarray  # [R] the same atom's index in file order
    of_atom: np.ndarray        # [A] residue of each atom
    part: np.ndarray           # [R] chain part of each residue
    part_start: np.ndarray     # [P] first atom of each chain part (file order)
    part_name: List[str]       # [P] chain name of each part
    run_start: np.ndarray      # first atom of each run of atoms of one residue (file order)


def _group(atoms: _Atoms) -> Tuple[Optional[np.ndarray], _Residues]:
    """Residues as gemmi forms them: a change of chain name starts a chain part; within a part, the atoms of one
    residue key belong to one residue even when apart; mmCIF parts of one chain name are appended to the first.

    Returns:
        (the atom order that makes residues contiguous, None when they already are; the residues)
    """
    new_part = _changes(atoms.chain)
    new_run = new_part | _changes(atoms.key)
    part_start, run_start = new_part.nonzero()[0], new_run.nonzero()[0]
    part_name = [b"".join(int(c[i]).to_bytes(c.dtype.itemsize, "little") for c in atoms.chain)
                 .decode("latin-1").strip(" \0") for i in part_start.tolist()]
    part_of_run = part_start.searchsorted(run_start, side="right") - 1
    run_of_atom = new_run.cumsum() - 1
    merge = atoms.merge_chain_parts and len(set(part_name)) < len(part_name)
    position = atoms.numbers[run_start, 5] * 256 + atoms.icode[run_start]
    if not merge and ((position[1:] > position[:-1]) | new_part[run_start[1:]]).all():
        # residue numbers rise within every part: no residue comes back
        return None, _Residues(run_start, run_start, run_of_atom, part_of_run, part_start, part_name, run_start)
    run_key = [k[run_start] for k in atoms.key]
    by_key = np.lexsort((*run_key[::-1], part_of_run))
    repeat = _changes(tuple(k[by_key] for k in (part_of_run, *run_key)))[1:] == 0
    if not repeat.any() and not merge:
        return None, _Residues(run_start, run_start, run_of_atom, part_of_run, part_start, part_name, run_start)
    first_run = np.arange(len(run_start))  # the first run of each residue key within its part
    for i in repeat.nonzero()[0]:  # lexsort is stable: a key's runs are consecutive, its first run first
        first_run[by_key[i + 1]] = first_run[by_key[i]]
    rank = np.arange(len(part_start))
    if merge:  # gemmi.read_structure appends the later parts of a chain to its first part
        first_part: Dict[str, int] = {}
        rank = np.array([first_part.setdefault(n, p) for p, n in enumerate(part_name)])
    _, residue_of_run = np.unique(rank[part_of_run] * len(run_start) + first_run, return_inverse=True)
    of_atom = residue_of_run.ravel()[run_of_atom]
    order = np.argsort(of_atom, kind="stable")
    of_atom = of_atom[order]
    first = _changes((of_atom,)).nonzero()[0]
    first_in_file = order[first]
    part = part_start.searchsorted(first_in_file, side="right") - 1
    return order, _Residues(first, first_in_file, of_atom, part, part_start, part_name, run_start)


def _reorder(atoms: _Atoms, order: np.ndarray) -> _Atoms:
    """The atoms in another order."""
    fields = {k: (v[order] if isinstance(v, np.ndarray) else tuple(c[order] for c in v) if isinstance(v, tuple) else v)
              for k, v in atoms._asdict().items()}
    fields["where"] = lambda i: atoms.where(int(order[i]))
    return _Atoms(**fields)


def _best_altloc(of_atom: np.ndarray, atoms: _Atoms, num_residue: int) -> np.ndarray:
    """[R] uint8: per residue, the altloc letter whose heavy atoms reach the highest occupancy (first letter in
    file order on ties), 32 where no heavy atom has one."""
    best = np.full(num_residue, 32, np.uint8)
    pick = ((atoms.altloc != 32) & ~atoms.hydrogen).nonzero()[0]
    if len(pick) == 0:
        return best
    group = of_atom[pick] * 256 + atoms.altloc[pick]
    order = np.lexsort((pick, group))
    group, occ, first = group[order], atoms.numbers[pick[order], 3].astype(np.float32), pick[order]
    starts = _changes((group,)).nonzero()[0]
    top, group, first = np.maximum.reduceat(occ, starts), group[starts], first[starts]
    choice = np.lexsort((first, -top, group // 256))
    residue = (group // 256)[choice]
    winners = choice[_changes((residue,))]
    best[group[winners] // 256] = group[winners] % 256
    return best


def _residue_numbers(path, atoms: _Atoms, first: np.ndarray) -> np.ndarray:
    """Numbers of the residues starting at atoms `first`; PDB's hybrid-36 numbers read as gemmi does."""
    values = atoms.numbers[first, 5]
    numbers = values.astype(np.int64)
    for i in ((numbers != values) | (atoms.number_status[first] != 0)).nonzero()[0]:
        text = atoms.number_text(int(first[i])).strip()
        if text[:1].isalpha() and text.isalnum() and len(text) == 4:  # hybrid-36 (gemmi's reading)
            numbers[i] = int(text, 36) - 466560 + 10000
        else:
            raise StructureError(f"{path}: {atoms.where(int(first[i]))}: the residue number {text!r} is not an "
                                 "integer; fix or remove that record.")
    return numbers


_RESIDUE_TABLE = (np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, bool))  # codes seen: type, water


def _residue_types(codes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Residue type (-1 for residues that are not amino acids) and water flag of residue-name codes."""
    global _RESIDUE_TABLE
    keys, types, water = _RESIDUE_TABLE
    at = np.minimum(keys.searchsorted(codes), max(len(keys) - 1, 0))
    if len(keys) == 0 or not (keys[at] == codes).all():  # names not seen before: look them up once
        table = dict(zip(keys.tolist(), zip(types.tolist(), water.tolist())))
        for code in set(codes.tolist()) - set(table):
            name = code.to_bytes(8, "little").rstrip(b"\0").decode("latin-1").strip()
            rtype = residue_type_of(name) if name else None
            table[code] = (-1 if rtype is None else rtype, name.upper() in ("HOH", "DOD", "WAT", "H2O"))
        keys = np.array(sorted(table), np.uint64)
        _RESIDUE_TABLE = (keys, np.array([table[k][0] for k in keys.tolist()], np.int64),
                          np.array([table[k][1] for k in keys.tolist()], bool))
        return _residue_types(codes)
    return types[at], water[at]


def _atoms_to_arrays(atoms: _Atoms, path: Path, chain: Optional[str]):
    """The `Protein` arrays, the chain names and the number of residues dropped, from the atom records (see the
    rules in the docstring of `esm_gearnet.data.io`)."""
    order, res = _group(atoms)
    if order is not None:
        atoms = _reorder(atoms, order)
    num_residue, of_atom = len(res.first), res.of_atom
    rtype, water = _residue_types(atoms.key[0][res.first].astype(np.uint64))
    candidate = rtype >= 0
    if chain is not None:
        candidate &= np.array([n == chain for n in res.part_name])[res.part]
    if candidate.any():
        candidate &= ~atoms.entity(res, water, candidate)
    at = _NAME_OF_SLOT[(atoms.name * _NAME_HASH) >> _NAME_SHIFT]
    column = np.where(_NAME_KEYS[at] == atoms.name, _NAME_COLUMN[at], _NUM_NAME_COLUMNS - 1)
    slot = _SLOT_OF[np.where(candidate, rtype, _NOT_CANDIDATE)[of_atom] * _NUM_NAME_COLUMNS + column]
    keep = (slot >= 0) & ~atoms.hydrogen
    if (atoms.altloc != 32).any():
        best = _best_altloc(of_atom, atoms, num_residue)
        keep &= (atoms.altloc == 32) | (atoms.altloc == best[of_atom])
    kept = keep.nonzero()[0]
    flat = of_atom[kept] * constants.NUM_ATOM_SLOTS + slot[kept]
    counts = np.bincount(flat, minlength=num_residue * constants.NUM_ATOM_SLOTS)
    if counts.max() > 1:
        twice = (flat == np.argmax(counts)).nonzero()[0]
        raise StructureError(f"{path}: {atoms.where(int(kept[twice[1]]))} repeats the atom of "
                             f"{atoms.where(int(kept[twice[0]]))} (same residue, atom name and altloc); "
                             "remove one of the two records.")
    atom_of = np.full((num_residue, constants.NUM_ATOM_SLOTS), -1, np.int64)
    atom_of.ravel()[flat] = kept
    final = (candidate & (atom_of[:, 1] >= 0)).nonzero()[0]
    num_dropped = int(candidate.sum()) - len(final)
    if len(final) == 0:
        if chain is not None and chain not in res.part_name:
            chains = ", ".join(sorted(set(res.part_name))) or "none"
            raise StructureError(f"{path}: no chain {chain!r} in the first model (chains: {chains}).")
        raise StructureError(f"{path}: no amino-acid residue with a CA atom; is it a protein structure?")
    numbers = _residue_numbers(path, atoms, res.first[final])
    icodes = atoms.icode[res.first[final]]
    chain_names = sorted(set(res.part_name))
    chain_of = np.array([chain_names.index(n) for n in res.part_name])[res.part[final]]
    change = _changes((chain_of, numbers, icodes))
    # micro-heterogeneity: of consecutive residues at one position, the first of highest CA occupancy
    if not change.all():
        group = np.cumsum(change)
        occ = atoms.numbers[atom_of[final, 1], 3].astype(np.float32)
        order = np.lexsort((np.arange(len(final)), -occ, group))
        winners = np.sort(order[_changes((group[order],))])
        final, numbers, icodes, chain_of = final[winners], numbers[winners], icodes[winners], chain_of[winners]
    new_chain = _changes((chain_of,))
    chain_ids = tuple(chain_names[c] for c in chain_of[new_chain].tolist())
    atoms14 = atom_of[final].ravel()
    slots = (atoms14 >= 0).nonzero()[0]
    arrays = residue_arrays(path, slots, np.take(atoms.numbers, atoms14[slots], axis=0)[:, :3], rtype[final], numbers,
                            icodes, new_chain.cumsum() - 1, atoms.numbers[atom_of[final, 1], 4], chain_ids)
    return arrays, chain_ids, num_dropped

def residue_arrays(where: str, slots, xyz, residue_types, numbers, icodes, chain_index, bfactors, chain_ids):
    """The per-residue numpy arrays of `Protein` from parsed residues and their atoms.

    Args:
        slots: flat index residue * 14 + atom slot of every atom; xyz: its coordinates (flat or [A, 3]);
        residue_types, numbers, icodes, chain_index, bfactors: one entry per residue; chain_ids: the chain names.
    Raises:
        StructureError: naming `where` and the residue when a coordinate is not finite.
    """
    num_residue = len(residue_types)
    atom_pos = np.zeros((num_residue * constants.NUM_ATOM_SLOTS, 3), dtype=np.float32)
    atom_mask = np.zeros(num_residue * constants.NUM_ATOM_SLOTS, dtype=bool)
    index = np.asarray(slots, dtype=np.int64)
    xyz = np.ascontiguousarray(xyz, dtype=np.float32).reshape(-1, 3)
    atom_pos.view("V12")[index, 0] = xyz.view("V12")[:, 0]  # whole rows at once: faster than a 2-D scatter
    atom_mask[index] = True
    if not np.isfinite(atom_pos).all():
        bad = int((~np.isfinite(atom_pos).all(-1)).nonzero()[0][0]) // constants.NUM_ATOM_SLOTS
        raise StructureError(f"{where}: non-finite coordinates in residue {chain_ids[chain_index[bad]]} "
                             f"{numbers[bad]}.")
    return {
        "residue_type": np.asarray(residue_types, dtype=np.int64),
        "atom_pos": atom_pos.reshape(num_residue, constants.NUM_ATOM_SLOTS, 3),
        "atom_mask": atom_mask.reshape(num_residue, constants.NUM_ATOM_SLOTS),
        "residue_number": np.asarray(numbers, dtype=np.int64),
        "insertion_code": np.asarray(icodes, dtype=np.uint8),
        "chain_index": np.asarray(chain_index, dtype=np.int64),
        "bfactor": np.asarray(bfactors, dtype=np.float32),
    }
