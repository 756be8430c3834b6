"""PDB files: the ATOM/HETATM records of the first model read by fixed columns into an `_Atoms` table, and
which residues are ligands (gemmi's entity rules: TER records, else its heuristic)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

from .atoms import _Atoms, _changes, _element_of_symbol
from .errors import StructureError, _first_line
from .numbers import _check_numbers, _parse_numbers
from .text import _BYTES_BELOW, _SPACES, _refuse_control_bytes


def _element_tables():
    """gemmi's element class (1 H or D, 2 C, 3 other) of PDB atom records as two lookup tables: by the element
    columns 77-78 (as a uint16; 0 when they hold no letter), and, without one, by the padded atom name (index
    name[0] << 9 | name[1] << 1 | name[3] is not blank), as gemmi infers it."""
    code = np.arange(1 << 16)
    e0, e1 = code & 255, code >> 8
    alpha = lambda c: ((c | 0x20) >= 97) & ((c | 0x20) <= 122)  # noqa: E731
    by_symbol = np.where(alpha(e0) | alpha(e1), _element_of_symbol(e0, e1), 0).astype(np.uint8)
    code = np.arange(1 << 17)
    n0, n1, n3 = code >> 9, (code >> 1) & 255, code & 1
    digit = lambda c: (c >= 48) & (c <= 57)  # noqa: E731
    single = lambda c: np.where((c == 72) | (c == 68), 1, np.where(c == 67, 2, 3))  # noqa: E731
    upper = n0 & 0xDF
    by_name = np.where((n0 == 32) | digit(n0), single(n1),
                       np.where(digit(n1), single(n0),
                                np.where((n3 == 1) & ((upper == 72) | (upper == 68)), 1,
                                         _element_of_symbol(n0, n1))))
    return by_symbol, by_name.astype(np.uint8)


_ELEMENT_BY_SYMBOL, _ELEMENT_BY_NAME = _element_tables()


def _id(text: bytes) -> int:
    return int.from_bytes(text, "little")


_UPPER4, _RECORD3 = np.uint64(0xDFDFDFDF), np.uint64(0xD0DFDFDF)  # gemmi's TER/END: 4th character blank or punctuation
_ATOM, _HETA, _MODE, _ENDM = (np.uint64(_id(t) & 0xDFDFDFDF) for t in (b"ATOM", b"HETA", b"MODE", b"ENDM"))
_TER, _END = (np.uint64(_id(t) & 0xD0DFDFDF) for t in (b"TER\0", b"END\0"))
_DATA_ = np.uint64(_id(b"DATA_")), np.uint64(0xFFDFDFDFDF)
_COLS = np.arange(88)
_PDB_FIELDS = (slice(30, 38), slice(38, 46), slice(46, 54), slice(54, 60), slice(60, 66), slice(22, 26))
_NARROW_FIELDS = [(j, f.stop - 8, ~_BYTES_BELOW[8 - (f.stop - f.start)], _SPACES & _BYTES_BELOW[8 - (f.stop - f.start)])
                  for j, f in enumerate(_PDB_FIELDS) if f.stop - f.start < 8]


def _pdb_atoms(data: bytes, path: Path) -> _Atoms:
    arr = np.frombuffer(data, np.uint8)
    starts = np.concatenate(([0], (arr == 10).nonzero()[0] + 1, [len(arr) + 1]))
    _refuse_control_bytes(data, path, len(starts) - 2)
    padded = np.concatenate((arr, np.zeros(88, np.uint8)))
    text = np.ndarray((len(arr) + 1, 88), np.uint8, padded, 0, (1, 1))  # row i: the 88 bytes from offset i
    word = text[starts[:-1], :8].view("<u8")[:, 0]  # the first 8 characters of every line
    record, record3 = word & _UPPER4, word & _RECORD3
    stops = ((record == _ENDM) | (record3 == _END)).nonzero()[0]  # gemmi stops at END; ENDMDL ends model 1
    last = int(stops[0]) if len(stops) else len(word)
    lines = ((record[:last] == _ATOM) | (record[:last] == _HETA)).nonzero()[0]
    if len(lines) == 0:
        raise StructureError(f"{path}: the file holds no atom records (ATOM/HETATM lines).")
    before = (word[:lines[0]] & _DATA_[1] == _DATA_[0]).nonzero()[0]
    if len(before):
        raise StructureError(f"{path}: line {before[0] + 1} starts an mmCIF data block; name the file .cif.")
    models = (record[lines[0]:last] == _MODE).nonzero()[0]
    if len(models):
        raise StructureError(f"{path}: line {lines[0] + models[0] + 1}: MODEL record inside a model "
                             "(ENDMDL missing before it).")
    begin = starts[lines]
    length = starts[lines + 1] - begin - 1
    if b"\r" in data:
        length -= arr[begin + length - 1] == 13
    shortest = int(length.min())
    if shortest < 54:
        i = int(np.argmin(length))
        raise StructureError(f"{path}: line {lines[i] + 1}: the atom record is too short ({length[i]} characters; "
                             "its coordinates end at column 54).")
    M = text[begin]
    if shortest < 78:  # fields past the end of a short line are blank (columns 79-80, the charge, are not read)
        short = (length < 78).nonzero()[0]
        M[short] = np.where(_COLS >= length[short, None], np.uint8(32), M[short])
    where = lambda i: f"line {lines[i] + 1}"  # noqa: E731
    words = np.empty((len(lines), 6), np.uint64)  # x, y, z, occupancy, B-factor, residue number: 8 characters each
    words[:, :3] = M[:, 30:54].view("<u8")
    for j, start, keep, spaces in _NARROW_FIELDS:  # the 8 characters ending with the field, those before it blank
        words[:, j] = M[:, start:start + 8].view("<u8")[:, 0] & keep | spaces
    text = lambda i, j: M[i, _PDB_FIELDS[j]].tobytes()  # noqa: E731
    values, status = _parse_numbers(words, text)
    numbers = _check_numbers(path, where, text, values, status)
    element = _ELEMENT_BY_SYMBOL[M[:, 76:78].view("<u2")[:, 0]]
    if not element.all():  # no element given: gemmi's guess from the padded name
        by_name = _ELEMENT_BY_NAME[(M[:, 12].astype(np.int32) << 9) | (M[:, 13].astype(np.int32) << 1)
                                   | (M[:, 15] != 32)]
        element = np.where(element == 0, by_name, element)
    ters = lines.searchsorted((record3[:last] == _TER).nonzero()[0])  # atoms before each TER record

    def entity(res, water, candidate):
        kind = _pdb_entity(res, ters, water)
        if (candidate & (kind == 0)).any():  # an amino acid in a chain without TER: gemmi's heuristic decides
            kind = _gemmi_entity(_heuristic_text(M, lines, record3[:last] == _TER, res.run_start, element,
                                                 M[:, 12:16].view("<u4")[:, 0]), path, len(res.first))
        return kind == 2

    return _Atoms(
        chain=(M[:, 21] if (M[:, 20] == 32).all() else _left_justified(M[:, 20:22].view("<u2")[:, 0], 2),),
        key=(_left_justified(M[:, 17:21].view("<u4")[:, 0] & np.uint32(0xFFFFFF), 3),
             np.where(status[:, 5] == 0, values[:, 5], -1.0 - M[:, 22:26].view("<u4")[:, 0])
             if status[:, 5].any() else values[:, 5], M[:, 26], _left_justified(M[:, 72:76].view("<u4")[:, 0], 4)),
        name=M[:, 12:16].view("<u4")[:, 0], altloc=M[:, 16], hydrogen=element == 1,
        numbers=numbers, number_status=status[:, 5],
        number_text=lambda i: text(i, 5).decode("latin-1"), icode=M[:, 26], where=where, entity=entity,
        merge_chain_parts=False)


def _left_justified(code: np.ndarray, size: int) -> np.ndarray:
    """Codes of `size`-character fields with their leading spaces moved to the end, as gemmi strips them."""
    spaces = code.dtype.type(int.from_bytes(b" " * size, "little"))
    for _ in range(size - 1):
        lead = ((code & code.dtype.type(0xFF)) == 32) & (code != spaces)
        if not lead.any():
            break
        code = np.where(lead, (code >> code.dtype.type(8)) | code.dtype.type(32 << 8 * (size - 1)), code)
    return code


def _pdb_entity(res, ters: np.ndarray, water: np.ndarray) -> np.ndarray:
    """gemmi's PDB entity rules from TER records: in a chain part, the residues before its TER are a polymer, those
    after it non-polymers or waters, as are all residues of a later part of a chain whose first part had a TER.
    Chains without TER, or all chains when TERs are used oddly (twice in a part, a water before one), are left
    unknown (0) for gemmi's heuristic."""
    kind = np.zeros(len(res.first), np.int8)
    closes = res.part_start.searchsorted(ters - 1, side="right") - 1  # the part of the atom before each TER
    closes[ters == 0] = -1
    had_ter: Dict[str, bool] = {}
    bounds = res.part.searchsorted(np.arange(len(res.part_name) + 1))
    for part, name in enumerate(res.part_name):
        rows = slice(bounds[part], bounds[part + 1])
        own = ters[closes == part]
        if had_ter.get(name):
            kind[rows] = 2
            if len(own):
                return kind * 0
        elif len(own):
            polymer = res.first_in_file[rows] < own[0]
            kind[rows] = 2 - polymer
            if len(own) > 1 or water[rows][polymer].any():
                return kind * 0
        had_ter.setdefault(name, len(own) > 0)
    return kind


_CA_OR_P = np.array([int.from_bytes((" " * left + n).ljust(4).encode(), "little")
                     for n in ("CA", "P") for left in range(5 - len(n))], np.uint32)


def _heuristic_text(M: np.ndarray, lines: np.ndarray, is_ter: np.ndarray, run_start: np.ndarray,
                    element: np.ndarray, name: np.ndarray) -> bytes:
    """The first model as PDB text for gemmi's entity set-up, with only the records its heuristic reads: the
    first atom of each run of a residue (its name, number and record type), every atom named CA or P (gemmi's
    `get_ca`, `get_p`), the first carbon of each run (`find_by_element`), and the TER records.

    Args:
        M: [A, 88] the atom records; lines: [A] their line indices; is_ter: [L] the TER lines of the model;
        run_start: runs of atoms of one residue; element: [A] element classes (2 carbon); name: [A] uint32.
    """
    keep = np.zeros(len(M), bool)
    keep[run_start] = True
    keep |= np.isin(name, _CA_OR_P)
    carbon = (element == 2).nonzero()[0]
    if len(carbon):
        keep[carbon[_changes((run_start.searchsorted(carbon, side="right"),))]] = True
    atom_rows, ter_lines = keep.nonzero()[0], is_ter.nonzero()[0]
    rows = np.full((len(atom_rows) + len(ter_lines), 81), 10, np.uint8)
    at = np.arange(len(rows))  # the place of each record in line order
    if len(ter_lines):
        at[np.argsort(np.concatenate((lines[atom_rows], ter_lines)), kind="stable")] = np.arange(len(rows))
        rows[at[len(atom_rows):], :80] = np.frombuffer(b"TER".ljust(80), np.uint8)
    rows[at[:len(atom_rows)], :80] = M[atom_rows, :80]
    return rows.tobytes()


def _gemmi_entity(data: bytes, path: Path, num_residue: int) -> np.ndarray:
    """Entity kinds per residue of PDB text from gemmi's entity set-up (its heuristic for chains without TER)."""
    import gemmi

    try:
        structure = gemmi.read_pdb_string(data)
        structure.setup_entities()
    except Exception as error:  # gemmi raises RuntimeError / ValueError with its own wording
        raise StructureError(f"{path}: not a readable PDB file ({_first_line(error, path)}).") from None
    kinds = {gemmi.EntityType.NonPolymer: 2, gemmi.EntityType.Water: 2}
    kind = [kinds.get(r.entity_type, 1) for ch in structure[0] for r in ch] if len(structure) else []
    if len(kind) != num_residue:
        raise StructureError(f"{path}: gemmi's entity set-up sees {len(kind)} residues where this reader sees "
                             f"{num_residue}; are some ATOM/HETATM records damaged (shifted columns)?")
    return np.array(kind, np.int8)
