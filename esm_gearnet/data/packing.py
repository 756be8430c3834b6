"""A structure's chains as FoldComp records that are checked against the structure: what `esm-gearnet pack`
writes into a database, one call per structure file (in a worker process: foldcomp can crash).

`pack_structure` reads the file with the project's reader (`io.read_structure_arrays`: first model, altlocs,
insertion codes, modified residues and ligands by its rules), and for each chain:

1. names it: the file's protein name (`io.protein_name`: `1ABC-A`, `AF-Q9XYZ1-F1-model_v4`), plus `_CHAIN` when
   the file has several chains; with `split_breaks`, a chain with breaks is packed as its segments, named
   `NAME_seg1`, `NAME_seg2`, ... (a chain without breaks keeps its name);
2. encodes it (`io.foldcomp.encode`: clean PDB text of its atom14 atoms given to `foldcomp.compress`);
3. decodes the record again (`io.foldcomp.decode`) and compares it with the chain: the same residue types in
   the same order, and every Cα atom within `max_ca_error` Å of the chain's own. A chain that fails is left out,
   with one sentence saying why.

A chain break is a pair of consecutive residues whose Cα atoms are more than `BREAK_DISTANCE` Å apart (a
missing stretch; a peptide bond puts them 3.8 Å apart, a cis one 2.9 Å). FoldComp cannot represent one: it
rebuilds a chain from torsion angles with ideal bond geometry, so the residues after a gap are displaced
(measured on the 11 broken chains of ../shared/data: Cα errors of 3.4-20 Å whole, 0.02-0.21 Å per segment).

`Packed` (one per entry or per thing left out):

============  ================  ==================================================================================
field         type              meaning
============  ================  ==================================================================================
name          str               the entry's name (for a file that could not be read: the file's protein name)
record        bytes or None     the FoldComp record (without the database's NUL); None when left out
reason        str               "" when packed; else one sentence naming the file, the chain and why
ca_error      float             largest Cα distance (Å) between the decoded record and the chain; nan if none
============  ================  ==================================================================================
"""
from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional

import numpy as np

from . import constants
from .io import StructureError, protein_name, read_structure_arrays
from .io.foldcomp import EntryError, decode, encode

BREAK_DISTANCE = 4.2  # Å between consecutive Cα atoms: more is a chain break
_LETTERS = constants.RESIDUE_LETTERS + constants.UNKNOWN_LETTER


class Packed(NamedTuple):
    """One entry of a structure, packed or left out (module docstring)."""
    name: str
    record: Optional[bytes]
    reason: str
    ca_error: float = math.nan


def chain_breaks(ca: np.ndarray) -> np.ndarray:
    """Where a chain breaks.

    Args:
        ca: [R, 3] Cα coordinates (Å) of the chain's residues in order.
    Returns:
        [K] int64, the index of the first residue after each break (consecutive Cα more than `BREAK_DISTANCE`
        Å apart), ascending.
    """
    gaps = np.linalg.norm(np.diff(np.asarray(ca, np.float64), axis=0), axis=1)
    return np.flatnonzero(gaps > BREAK_DISTANCE) + 1


def pack_structure(path, data: Optional[bytes] = None, max_ca_error: float = 1.0,
                   split_breaks: bool = False) -> List[Packed]:
    """The entries of a structure file, each packed or left out (module docstring).

    Args:
        path: the structure file (with `data`, only its name: a member of an archive).
        data: the file's bytes as stored, read elsewhere (`io.read_structure_arrays`).
        max_ca_error: the largest Cα error (Å) an entry may have after decoding.
        split_breaks: pack the segments of a broken chain instead of leaving it out.
    Returns:
        one `Packed` per entry or per thing left out, in the file's chain order; a file that cannot be read is one
        `Packed` with its reason.
    """
    try:
        arrays, meta = read_structure_arrays(path, data=data)
    except StructureError as error:
        return [Packed(protein_name(path), None, str(error))]
    stem, chain_ids = meta["name"], meta["chain_ids"]
    packed: List[Packed] = []
    for index, chain_id in enumerate(chain_ids):
        rows = np.flatnonzero(arrays["chain_index"] == index)
        name = stem if len(chain_ids) == 1 else f"{stem}_{chain_id}"
        where = f"{path}, chain {chain_id}"
        breaks = chain_breaks(arrays["atom_pos"][rows, 1])
        if split_breaks and len(breaks):
            for number, part in enumerate(np.split(rows, breaks), 1):
                span = f"residues {_label(arrays, part[0])}..{_label(arrays, part[-1])}"
                packed.append(_pack_chain(arrays, part, chain_id, f"{name}_seg{number}",
                                          f"{where}, {span} (entry {name}_seg{number})", max_ca_error, ()))
        else:
            packed.append(_pack_chain(arrays, rows, chain_id, name, f"{where} (entry {name})", max_ca_error,
                                      breaks))
    return packed


def _pack_chain(arrays: Dict[str, np.ndarray], rows: np.ndarray, chain_id: str, name: str, where: str,
                max_ca_error: float, breaks) -> Packed:
    """One entry: encoded, decoded and compared (module docstring); `breaks` are the chain's, for the reason."""
    try:
        record = encode(arrays, rows, chain_id, name)
        decoded, _ = decode(record, where, name)
    except ValueError as error:  # encode's refusals; EntryError (a ValueError) when the record does not decode
        text = str(error) if isinstance(error, EntryError) else f"{where}: {error}."
        return Packed(name, None, text)
    types = arrays["residue_type"][rows]
    if len(decoded["residue_type"]) != len(rows):
        return Packed(name, None, f"{where}: decodes to {len(decoded['residue_type'])} residues, not its "
                                  f"{len(rows)}.")
    differ = np.flatnonzero(decoded["residue_type"] != types)
    if len(differ):
        at = int(differ[0])
        return Packed(name, None, f"{where}: decodes to {_LETTERS[decoded['residue_type'][at]]} where it has "
                                  f"{_LETTERS[types[at]]} (residue {_label(arrays, rows[at])}).")
    distances = np.linalg.norm(decoded["atom_pos"][:, 1].astype(np.float64)
                               - arrays["atom_pos"][rows, 1].astype(np.float64), axis=1)
    error = float(distances.max())
    if error <= max_ca_error:
        return Packed(name, record, "", error)
    bound = f"above the bound of {max_ca_error:g} Å (--max-ca-error)"
    if len(breaks):
        first = int(breaks[0])
        gap = float(np.linalg.norm(arrays["atom_pos"][rows[first], 1] - arrays["atom_pos"][rows[first - 1], 1]))
        return Packed(name, None, f"{where}: FoldComp cannot represent its chain break ({len(breaks)} break(s), the "
                                  f"first between residues {_label(arrays, rows[first - 1])} and "
                                  f"{_label(arrays, rows[first])}, Cα {gap:.1f} Å apart): Cα error {error:.1f} Å "
                                  f"after decoding, {bound}; --split-breaks packs its {len(breaks) + 1} segments.",
                      error)
    return Packed(name, None, f"{where}: Cα error {error:.2f} Å after decoding, {bound}.", error)


def _label(arrays: Dict[str, np.ndarray], row: int) -> str:
    """A residue as the file numbers it: `139`, `52A`."""
    icode = chr(int(arrays["insertion_code"][row])).strip()
    return f"{int(arrays['residue_number'][row])}{icode}"


__all__ = ["BREAK_DISTANCE", "Packed", "chain_breaks", "pack_structure"]
