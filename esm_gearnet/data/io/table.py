"""Atom tables (ATOM3D's split-form frames) into an `_Atoms` table, and which residues are ligands there.

ATOM3D stores each structure as Biopython parsed it: one row per atom with the columns model, chain, hetero,
insertion_code, residue, segid, resname, altloc, occupancy, bfactor, x, y, z, element, name (see
`data.datasets.atom3d`). Residues are then formed and chosen by `residues`, exactly as for PDB and mmCIF files.
Ligands: Biopython's hetero flag is all the table says about entities, so a residue flagged hetero (`H_...`) whose
name is a standard amino acid is a ligand (a free amino acid), a hetero modified residue (MSE) is part of the
chain, and `W` is water.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from .. import constants
from .atoms import _Atoms
from .errors import StructureError

NEEDED_COLUMNS = ("model", "chain", "hetero", "insertion_code", "residue", "resname", "name", "element",
                  "x", "y", "z", "bfactor")


def _codes(texts: Sequence[str], width: int) -> Tuple[np.ndarray, ...]:
    """The texts as little-endian integer codes of their bytes, NUL-padded: one uint64 array per 8 bytes (a
    single uint32 array for `width` 4, atom names as mmCIF gives them)."""
    encoded = np.array([str(t).encode("latin-1", "replace") for t in texts], dtype=f"S{width}")
    if width == 4:
        return (encoded.view("<u4"),)
    return tuple(encoded.view("<u8").reshape(len(encoded), width // 8).T.copy())


def _width(texts: Sequence[str]) -> int:
    return 8 * max(1, -(-max((len(str(t)) for t in texts), default=1) // 8))


def table_atoms(frame: Dict[str, Any], name: str) -> _Atoms:
    """The first model's atom records of an ATOM3D atom table, in table order.

    Raises:
        StructureError: naming `name` when the table lacks a column, holds no atom, or a value is not a number.
    """
    columns = list(frame["columns"])
    missing = [c for c in NEEDED_COLUMNS if c not in columns]
    if missing:
        raise StructureError(f"{name}: the atom table lacks the column(s) {', '.join(missing)}.")
    rows: List[list] = frame["data"]
    if not rows:
        raise StructureError(f"{name}: the atom table holds no atom.")
    c = {k: columns.index(k) for k in columns}
    first_model = rows[0][c["model"]]
    rows = [row for row in rows if row[c["model"]] == first_model]
    get = lambda key, default=" ": [row[c[key]] for row in rows] if key in c else [default] * len(rows)  # noqa: E731
    try:
        numbers = np.array([[row[c["x"]], row[c["y"]], row[c["z"]],
                             row[c["occupancy"]] if "occupancy" in c else 1.0, row[c["bfactor"]], row[c["residue"]]]
                            for row in rows], dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise StructureError(f"{name}: the atom table holds a coordinate, occupancy, B-factor or residue number "
                             f"that is not a number ({error}).") from None
    if not np.isfinite(numbers[:, 5]).all() or (numbers[:, 5] != np.round(numbers[:, 5])).any():
        row = int((~np.isfinite(numbers[:, 5]) | (numbers[:, 5] != np.round(numbers[:, 5]))).nonzero()[0][0])
        raise StructureError(f"{name}: row {row} of the atom table: the residue number {rows[row][c['residue']]!r} "
                             "is not an integer.")
    icode = np.array([ord(str(i).strip()[:1] or " ") for i in get("insertion_code")], np.uint8)
    altloc = np.array([ord(str(a).strip()[:1] or " ") for a in get("altloc")], np.uint8)
    chains, resnames, segids = get("chain"), get("resname"), get("segid", "")
    hetero = np.array([str(h).strip() for h in get("hetero")])
    element = np.array([str(e).strip().upper() for e in get("element")])
    resname_codes = _codes([str(r).strip() for r in resnames], 8)[0]
    names = [str(n).strip() for n in get("name")]
    name_codes = _codes(names, 4)[0]
    name_codes[[len(n) > 4 for n in names]] = 0  # as mmCIF's reader: no atom14 name is longer

    def entity(res, water, candidate):  # [R] bool: the residue is water or a ligand
        flag = hetero[res.first_in_file]
        standard = np.isin(resname_codes[res.first_in_file], _codes(sorted(constants.THREE_TO_ONE), 8)[0])
        return water | (flag == "W") | (np.char.startswith(flag, "H_") & standard)

    return _Atoms(
        chain=_codes(chains, _width(chains)),
        key=(resname_codes, numbers[:, 5].copy(), icode, *_codes([str(s).strip() for s in segids], _width(segids))),
        name=name_codes,
        altloc=altloc, hydrogen=np.isin(element, ("H", "D")), numbers=np.ascontiguousarray(numbers),
        number_status=np.zeros(len(rows), np.int8), number_text=lambda i: str(rows[i][c["residue"]]),
        icode=icode, where=lambda i: f"row {i} of the atom table", entity=entity, merge_chain_parts=False)
