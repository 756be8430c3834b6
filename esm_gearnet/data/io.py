"""Reading PDB / mmCIF files into `Protein`s: fast, strict, and with clear errors.

The atom records of the first model are read into NumPy arrays in one vectorised pass (PDB: the fixed columns
of the ATOM/HETATM lines, a row of bytes per record; mmCIF: the `_atom_site` loop, tokenised by NumPy) and
checked in that same pass; residues are then formed, chosen and laid out with array operations, following
gemmi's readers (which the previous version of this module used): a residue is a chain part's atoms with one
residue name, number, insertion code (and PDB segment), a change of chain name starts a chain part, and mmCIF
parts of one chain are appended to its first. Rules:

* first model only; hydrogens, waters and ligands dropped. Ligands are the residues gemmi's entity set-up marks
  as non-polymer: in PDB files the residues of a chain after its TER record (a free amino acid among them), in
  chains without TER what gemmi's heuristic (`setup_entities`, run on the first model) decides; in mmCIF files
  the residues of a `non-polymer` entity (by `_struct_asym`, else `label_entity_id`; kept when no entity is
  given);
* alternate locations: per residue, the conformer (altloc letter) of highest occupancy is kept, the first
  one on ties; when a residue number holds two residue types (micro-heterogeneity), the one of highest CA
  occupancy is kept;
* modified residues map to their standard parent where the chemical component dictionary gives one
  (MSE -> MET, its SE atom to SD), else to unknown (type 20);
* residues without a CA atom are dropped and counted in `Protein.num_dropped`;
* residues keep the file's order, insertion codes included.

Refused, with one sentence naming the file and the line (or `_atom_site` row): a control byte (NUL and the
like) anywhere in the text; an atom record whose coordinate is blank, not a number, or beyond
±`COORDINATE_LIMIT` Å; an occupancy or B-factor that is not a number; two records for one atom of a kept residue
(same chain, residue, atom name and altloc, or no altloc beside the chosen one); a kept residue whose number is
not an integer; a PDB atom record too short for its coordinates; a file, or a `.gz`'s content, over
`MAX_STRUCTURE_BYTES` (read in chunks, never held whole). A blank or absent occupancy reads as 1.0, a blank or
absent B-factor as 0.0. mmCIF needs only the coordinates and the chain, residue name, residue number and atom
name columns (auth_ or label_); label_alt_id, pdbx_PDB_ins_code, occupancy, B_iso_or_equiv, type_symbol and
pdbx_PDB_model_num are optional.
"""
from __future__ import annotations

import gzip
import logging
import os
import re
import stat
import zlib
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from . import constants
from .parallel import ordered_map
from .protein import Protein

_U64 = np.uint64
_SPACES = _U64(0x2020202020202020)  # 8 characters as a little-endian word: the first one in the lowest byte
_BYTES_BELOW = np.array([(1 << 8 * n) - 1 for n in range(9)], np.uint64)  # the first n characters of a word

logger = logging.getLogger(__name__)

STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif")
PathLike = Union[str, os.PathLike]

MAX_STRUCTURE_BYTES = 1 << 30  # 1 GiB of text: several times the largest PDB entry, far below a decompression bomb
COORDINATE_LIMIT = 1e5  # Å; no structure spans a tenth of a millimetre
_CHUNK = 1 << 18  # .gz read in chunks of 256 KiB
_RAISE_LIMIT = "raise esm_gearnet.data.io.MAX_STRUCTURE_BYTES if the file is genuine"


class StructureError(ValueError):
    """A structure file that cannot be turned into a protein; the message names the file and the reason."""


def structure_format(path: PathLike) -> Optional[str]:
    """'pdb' or 'cif' from the file name (a trailing .gz is allowed), None for other files."""
    name = str(path).lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix in STRUCTURE_SUFFIXES:
        if name.endswith(suffix):
            return "cif" if suffix in (".cif", ".mmcif") else "pdb"
    return None


def is_structure_file(path: PathLike) -> bool:
    return structure_format(path) is not None


def _first_line(error: BaseException, path: Optional[Path] = None) -> str:
    text = str(error).strip().splitlines()
    line = text[0].strip() if text else type(error).__name__
    if path is not None and line.startswith(str(path)):  # gemmi repeats the path: "file.cif:1:0(0): ..."
        line = line[len(str(path)):].lstrip(":")
    line = re.sub(r"^string:(\d+):\d+\(\d+\):", r"line \1:", line)  # gemmi's place in text it was given
    return line.rstrip(":").strip() or type(error).__name__


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


# ---- reading the bytes ------------------------------------------------------------------------------------------
def _read_bytes(path: Path, limit: int) -> bytes:
    """The file's bytes (decompressed for .gz), never holding more than `limit` + one chunk in memory."""
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise StructureError(f"{path}: is a folder, not a structure file.")
        if not stat.S_ISREG(info.st_mode):
            raise StructureError(f"{path}: is not a regular file (a device, pipe or socket?).")
        if info.st_size == 0:
            raise StructureError(f"{path}: the file is empty.")
        if info.st_size > limit:
            raise StructureError(f"{path}: the file is larger than {limit} bytes, more than any real structure; "
                                 f"refusing it ({_RAISE_LIMIT}).")
        with open(path, "rb") as raw:
            if path.suffix.lower() != ".gz":
                return raw.read()
            chunks, size = [], 0
            with gzip.GzipFile(fileobj=raw) as handle:
                while size <= limit:
                    chunk = handle.read(min(_CHUNK, limit + 1 - size))
                    if not chunk:
                        return b"".join(chunks)
                    chunks.append(chunk)
                    size += len(chunk)
    except FileNotFoundError:
        raise StructureError(f"{path}: no such file.") from None
    except PermissionError:
        raise StructureError(f"{path}: permission denied; make the file readable or leave it out.") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise StructureError(f"{path}: the compressed file is damaged or truncated ({_first_line(error)}).") from None
    except OSError as error:
        raise StructureError(f"{path}: cannot be read ({error.strerror or _first_line(error)}).") from None
    raise StructureError(f"{path}: decompresses to more than {limit} bytes, more than any real structure (a "
                         f"decompression bomb?); refusing it ({_RAISE_LIMIT}).")


_CONTROL_BYTE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _refuse_control_bytes(data: bytes, path: Path, newlines: Optional[int] = None) -> None:
    """Refuse bytes below 32 other than tab, line feed and carriage return, and DEL (`newlines`: the count of
    line feeds, when known)."""
    arr = np.frombuffer(data, np.uint8)
    allowed = np.count_nonzero(arr == 10) if newlines is None else newlines
    if b"\r" in data or b"\t" in data:
        allowed += data.count(b"\r") + data.count(b"\t")
    if np.count_nonzero(arr < 32) != allowed or b"\x7f" in data:  # fast; the regex only finds the line
        at = _CONTROL_BYTE.search(data).start()
        raise StructureError(f"{path}: line {_line_of(data, at)} holds a control byte (0x{data[at]:02x}); the file "
                             "is damaged or not a text file.")


def _perfect_hash(keys: np.ndarray, bits: int = 10) -> Tuple[np.integer, np.ndarray]:
    """A multiplier hashing the distinct unsigned `keys` into 2**bits slots without collision (`(key * m) >>
    (key bits - bits)`, found by a seeded search), and the index of the key in each slot (0 in empty ones)."""
    rng = np.random.default_rng(0)
    size = 8 * keys.itemsize
    while True:
        multiplier = keys.dtype.type(int(rng.integers(1 << (size - 2))) * 2 + 1)
        slots = (keys * multiplier) >> keys.dtype.type(size - bits)
        if len(np.unique(slots)) == len(keys):
            index = np.zeros(1 << bits, np.int64)
            index[slots] = np.arange(len(keys))
            return multiplier, index


# ---- numbers ----------------------------------------------------------------------------------------------------
# An 8-character field is one uint64 (its first character in the lowest byte). Its form is that word with each digit
# byte replaced by 0xFF: right-aligned fixed-point numbers ('  -1.234', '    12') have one of 60 forms, which give
# the position of the decimal point and the sign; any other field is read on its own with a strict pattern.
_NUMBER = re.compile(rb"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*")


def _number_forms():
    """The forms, and per form: the mask of the digit bytes before the point (they move up one byte, over it)
    and the signed power of ten to divide the joined digits by."""
    forms = {}
    for point in range(1, 9):  # 8: no point
        for digits in range(1, point + 1):
            for minus in (0, 1)[: 1 + (digits < point)]:
                text = b" " * (point - digits - minus) + b"-" * minus + b"\xff" * digits
                move, scale = 0, 1.0
                if point < 8:
                    text += b"." + b"\xff" * (7 - point)
                    move, scale = (1 << 8 * point) - 1, 10.0 ** (7 - point)
                forms[int.from_bytes(text, "little")] = (move, -scale if minus else scale)
    return (np.array(list(forms), np.uint64), np.array([m for m, _ in forms.values()], np.uint64),
            np.array([d for _, d in forms.values()]))


_FORMS, _FORM_MOVE, _FORM_DIVISOR = _number_forms()
_FORM_HASH, _FORM_OF_SLOT = _perfect_hash(_FORMS)
_ROWS_AT_ONCE = 2048


def _parse_numbers(words: np.ndarray, text: Callable[[int, int], bytes]) -> Tuple[np.ndarray, np.ndarray]:
    """Numbers in right-aligned, space-padded 8-character fields.

    The fixed-point forms are read vectorised and exactly: the digits joined into an integer by SWAR arithmetic
    (simdjson's eight-digit trick), divided once by a power of ten (so correctly rounded, like any float parser).
    Args:
        words: [n, k] uint64 (C-contiguous), the fields as words.
        text: (row, field) -> the field's full text, for the fields in no fixed-point form.
    Returns:
        (values [n, k] float64, status [n, k] int8: 0 a number, 1 blank, 2 not a number)
    """
    if len(words) > _ROWS_AT_ONCE:  # temporaries under glibc's mmap threshold: no page faults
        parts = [_parse_numbers(words[i:i + _ROWS_AT_ONCE], lambda row, j, i=i: text(row + i, j))
                 for i in range(0, len(words), _ROWS_AT_ONCE)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    digit = words.view(np.uint8) - np.uint8(48)
    is_digit = (digit < 10).view("<u8")
    mask = is_digit * _U64(0xFF)
    form = words | mask
    at = _FORM_OF_SLOT[(form * _FORM_HASH) >> _U64(54)]
    ok = _FORMS[at] == form
    x = digit.view("<u8") & mask  # the digits' values, 0 elsewhere
    x += (x & _FORM_MOVE[at]) * _U64(255)  # the digits before the point move up one byte, over it
    x = (x * _U64(2561)) >> _U64(8)
    x = ((x & _U64(0x00FF00FF00FF00FF)) * _U64(6553601)) >> _U64(16)
    x = ((x & _U64(0x0000FFFF0000FFFF)) * _U64(42949672960001)) >> _U64(32)
    values = x / _FORM_DIVISOR[at]
    status = np.zeros(words.shape, np.int8)
    for row, j in zip(*np.nonzero(~ok)) if not ok.all() else ():
        raw = text(int(row), int(j))
        if not raw.strip():
            status[row, j] = 1
        elif _NUMBER.fullmatch(raw):
            values[row, j] = float(raw)
        else:
            status[row, j] = 2
    return values, status


_NUMBER_NAMES = ("x coordinate", "y coordinate", "z coordinate", "occupancy", "B-factor", "residue number")
_NUMBER_DEFAULTS = np.array([np.nan, np.nan, np.nan, 1.0, 0.0, np.nan])  # for blank fields (NaN: refused)
_NUMBER_LIMITS = np.array([COORDINATE_LIMIT] * 3 + [float(np.finfo(np.float32).max)] * 2 + [np.inf])


def _check_numbers(path, where: Callable[[int], str], text: Callable[[int, int], bytes], values: np.ndarray,
                   status: np.ndarray) -> np.ndarray:
    """Of the x, y, z, occupancy, B-factor and residue-number columns [A, 6], the first five: blanks read as
    their default; refused (naming the record) when a coordinate is blank, anything is not a number, or beyond
    its limit. The residue numbers are checked later, for the residues kept."""
    problem = np.zeros((1, 5), np.int8)  # per field: 1 blank without a default, 2 not a number, 3 too far
    if status[:, :5].any():
        blank = status[:, :5] == 1
        values = values.copy()
        values[:, :5] = np.where(blank, _NUMBER_DEFAULTS[:5], values[:, :5])
        problem = np.where(blank & ~np.isnan(_NUMBER_DEFAULTS[:5]), 0, status[:, :5])
    far = ~(np.abs(values) <= _NUMBER_LIMITS)
    if problem.any() or far.any():
        problem = np.where(far[:, :5] & (problem == 0), 3, problem)
        row, j = (int(i) for i in np.argwhere(problem)[0])
        field = text(row, j).decode("latin-1").strip()
        what = ("is blank", f"is not a number ({field!r})",
                f"{field} is beyond ±{_NUMBER_LIMITS[j]:g} Å" if j < 3 else f"{field} is too large")
        raise StructureError(f"{path}: {where(row)}: the {_NUMBER_NAMES[j]} {what[problem[row, j] - 1]}; fix or "
                             "remove that record.")
    return values


# ---- the atom table common to both formats -----------------------------------------------------------------------
class _Atoms(NamedTuple):
    """The atom records of the first model, in file order (A atoms). Integer codes are raw bytes read as
    little-endian integers."""
    chain: Tuple[np.ndarray, ...]  # [A] codes of the chain name
    key: Tuple[np.ndarray, ...]    # [A] the residue identity in a chain part: name (key[0]), number, icode, segment
    name: np.ndarray      # [A] uint32 code of the atom name (4 bytes as written; 0 for longer names)
    altloc: np.ndarray    # [A] uint8, 32 (a space) = none
    hydrogen: np.ndarray  # [A] bool
    numbers: np.ndarray   # [A, 6] float64 (C-contiguous): x, y, z, occupancy, B-factor, residue number
    number: np.ndarray    # [A] float64: residue number where `number_status` is 0
    number_status: np.ndarray  # [A] int8: 0 a number, 1 blank, 2 not a number (see `number_text`)
    number_text: Callable[[int], str]  # atom index -> its residue number as written
    icode: np.ndarray     # [A] uint8, 32 = none
    where: Callable[[int], str]  # atom index -> "line N", for messages
    entity: Callable      # (residues, water [R], candidate [R]) -> [R] bool: the residue is a ligand or water
    merge_chain_parts: bool


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


def _element_of_symbol(c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    """gemmi's element of a 2-character symbol (`find_element`) as a class: 1 H or D, 2 C, 3 anything else."""
    first, second = c0 & 0xDF, c1 & 0xDF  # upper case; a space reads as 0
    single = np.where(first == 0, second, np.where(second < 14, first, 0))  # a one-letter symbol, or 0
    return np.where((single == 72) | (single == 68), 1, np.where(single == 67, 2, 3)).astype(np.uint8)


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


# ---- PDB ----------------------------------------------------------------------------------------------------------
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
        numbers=numbers, number=values[:, 5], number_status=status[:, 5],
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


# ---- mmCIF --------------------------------------------------------------------------------------------------------
_CIF_SPECIAL = (b"'", b'"', b"#", b";", b"_", b"$", b"[", b"]")  # quotes, comments, text fields, tags, reserved
_CIF_END_OF_LOOP = (b"#", b"_", b"loop_", b"data_", b"save_", b"global_", b"stop_")
_MAY_END_LOOP = np.zeros(256, bool)  # first characters of the lines that may end a loop
_MAY_END_LOOP[[ord(c) for c in "#_dDgGlLsS"]] = True


class _Tokens(NamedTuple):
    """The `_atom_site` table as byte offsets into `text`: column j of row i is token i * width + j."""
    text: bytes          # the file (or gemmi's tokens), and 8 spaces
    start: np.ndarray
    end: np.ndarray
    tags: Dict[str, int]
    where: Callable[[int], str]  # token index -> where it is, for messages

    def words(self, span: Tuple[np.ndarray, np.ndarray], count: int = 0) -> Tuple[np.ndarray, ...]:
        """Tokens as uint64 words of 8 characters, left-aligned and space-padded; `count` words (0: enough for
        the longest)."""
        start, end = span
        count = count or max(1, -(-int((end - start).max(initial=1)) // 8))
        windows = np.ndarray((len(self.text) - 7,), "<u8", self.text, 0, (1,))  # the 8 bytes at every offset
        words = []
        for k in range(count):
            size = _BYTES_BELOW[np.clip(end - start - 8 * k, 0, 8)]
            words.append(windows[np.minimum(start + 8 * k, len(windows) - 1)] & size | _SPACES & ~size)
        return tuple(words)

    def distinct(self, span: Tuple[np.ndarray, np.ndarray]) -> Tuple[List[str], np.ndarray]:
        """The distinct tokens as str, and the index of each token among them."""
        words = self.words(span)
        if len(words) > 1:  # tokens longer than 8 characters: one by one
            strings = [self.text[s:e].decode("latin-1") for s, e in zip(*span)]
            return strings, np.arange(len(strings))
        _, first, inverse = np.unique(words[0], return_index=True, return_inverse=True)
        return [self.text[span[0][i]:span[1][i]].decode("latin-1") for i in first.tolist()], inverse.ravel()

    def number_words(self, span: Tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Tokens as right-aligned, space-padded words; longer tokens as a word of no number form."""
        start, end = span
        windows = np.ndarray((len(self.text) - 7,), "<u8", self.text, 0, (1,))
        length = end - start
        kept = ~_BYTES_BELOW[np.maximum(8 - length, 0)]
        words = windows[np.maximum(end - 8, 0)] & kept | _SPACES & ~kept
        words[length > 8] = _U64(0xFFFFFFFFFFFFFFFF)
        return words


def _cif_tokens(data: bytes, path: Path) -> _Tokens:
    """Tokenise the `_atom_site` loop with NumPy (whitespace-separated, quotes without spaces inside); anything
    else CIF allows (text fields, comments, quoted spaces, a single-row table) goes through gemmi's parser."""
    first_tag = data.find(b"\n_atom_site.") + 1
    if first_tag and data[data.rfind(b"\n", 0, first_tag - 1) + 1:first_tag].strip().lower() == b"loop_":
        tags, body = [], first_tag
        while data.startswith(b"_atom_site.", body):
            line_end = data.find(b"\n", body) % (len(data) + 1)
            tags.append(data[body + 11:line_end].strip().decode("latin-1").lower())
            body = line_end + 1
        arr = np.frombuffer(data, np.uint8)
        lines = np.concatenate(([body], (arr[body:] == 10).nonzero()[0] + body + 1))
        lines = lines[lines < len(data)]
        ends = lines[_MAY_END_LOOP[arr[lines]]]
        body_end = next((int(e) for e in ends if data[e:e + 7].lower().startswith(_CIF_END_OF_LOOP)), len(data))
        solid = arr[body:body_end] > 32
        edges = (solid[1:] != solid[:-1]).nonzero()[0] + body + 1
        if len(solid) and solid[0]:
            edges = np.concatenate(([body], edges))
        if len(solid) and solid[-1]:
            edges = np.concatenate((edges, [body_end]))
        start, end = edges[0::2], edges[1::2]
        first = arr[start]
        simple = all(" " not in t and t for t in tags) and len(start) % max(len(tags), 1) == 0
        if simple and any(data.find(c, body, body_end) >= 0 for c in _CIF_SPECIAL):
            quoted = (first == 39) | (first == 34)
            simple = not (((quoted & ((arr[end - 1] != first) | (end - start < 2))).any())
                          or np.isin(first, (35, 36, 91, 93, 95)).any()  # # $ [ ] _ cannot start a value
                          or ((first == 59) & (arr[start - 1] == 10)).any())
            start, end = start + quoted, end - quoted
        if simple:
            return _Tokens(data + b" " * 8, start, end, {t: j for j, t in enumerate(tags)},
                           lambda token: f"line {_line_of(data, int(start[token]))}")
    import gemmi  # not the simple form: let gemmi tokenise

    try:
        document = gemmi.cif.read_string(data.decode("latin-1"))
        table = document[0].find_mmcif_category("_atom_site.") if len(document) else None
    except Exception as error:
        raise StructureError(f"{path}: not a readable mmCIF file ({_first_line(error, path)}).") from None
    if table is None or len(table) == 0:
        raise StructureError(f"{path}: the file holds no atom records (no _atom_site table).")
    values = [v if gemmi.cif.is_null(v) else gemmi.cif.as_string(v).replace("\n", " ")
              for row in table for v in row]
    lengths = np.array([len(v.encode("latin-1")) for v in values], np.int64)
    end = (lengths + 1).cumsum() + 7
    text = (" " * 8 + "\n".join(values) + " " * 9).encode("latin-1")
    tags = {t.lower()[len("_atom_site."):]: j for j, t in enumerate(table.tags)}
    return _Tokens(text, end - lengths, end, tags, lambda token: f"_atom_site row {token // len(tags) + 1}")


_NULL = (_U64(0x202020202020203F), _U64(0x202020202020202E))  # '?' and '.' as words


def _cif_atoms(data: bytes, path: Path) -> _Atoms:
    tokens = _cif_tokens(data, path)
    width = len(tokens.tags)
    rows = np.arange(len(tokens.start) // width)

    def column(*names, required=True):
        """(start, end) of the first of `names` present, a null ('?' or '.') falling back to the next one."""
        found = [tokens.tags[n] for n in names if n in tokens.tags]
        if not found:
            if required:
                raise StructureError(f"{path}: the _atom_site table has no {' or '.join(names)} column.")
            return None
        s, e = tokens.start[rows * width + found[0]], tokens.end[rows * width + found[0]]
        for j in found[1:]:
            one = (e - s == 1).nonzero()[0]  # a null is one character
            if len(one):
                null = one[np.isin(np.frombuffer(tokens.text, np.uint8)[s[one]], (46, 63))]
                s, e = s.copy(), e.copy()
                s[null], e[null] = tokens.start[rows[null] * width + j], tokens.end[rows[null] * width + j]
        return s, e

    def letter(span, none):  # a one-character value: its first character, `none` when null or absent
        if span is None:
            return np.full(len(rows), none, np.uint8)
        word = tokens.words(span, 1)[0]
        return np.where((word == _NULL[0]) | (word == _NULL[1]), none, word & _U64(0xFF)).astype(np.uint8)

    model = column("pdbx_pdb_model_num", required=False)
    if model is not None and len(rows):
        words = tokens.words(model)
        rows = rows[np.logical_and.reduce([w == w[0] for w in words])]  # gemmi's first model: the first row's
    if len(rows) == 0:
        raise StructureError(f"{path}: the file holds no atom records (the _atom_site table is empty).")
    row_token = rows * width
    where = lambda i: tokens.where(int(row_token[i]))  # noqa: E731
    spans = [column(c) for c in ("cartn_x", "cartn_y", "cartn_z")]
    spans += [column(c, required=False) for c in ("occupancy", "b_iso_or_equiv")]
    spans.append(column("auth_seq_id", "label_seq_id"))
    words = np.empty((len(rows), len(spans)), np.uint64)
    for j, span in enumerate(spans):
        words[:, j] = _SPACES if span is None else tokens.number_words(span)
    text = lambda i, j: b"" if spans[j] is None else tokens.text[spans[j][0][i]:spans[j][1][i]]  # noqa: E731
    values, status = _parse_numbers(words, text)
    numbers = _check_numbers(path, where, text, values, status)
    atom_span = column("auth_atom_id", "label_atom_id")
    atom = tokens.words(atom_span, 1)[0]
    symbol = column("type_symbol", required=False)
    if symbol is not None:
        symbol = tokens.words(symbol, 1)[0]
        hydrogen = _element_of_symbol(symbol & _U64(0xFF), (symbol >> _U64(8)) & _U64(0xFF)) == 1
    else:  # no element column: names H..., D... (or 1H...) are hydrogens
        lead = atom & _U64(0xFF)
        lead = np.where((lead >= 48) & (lead <= 57), (atom >> _U64(8)) & _U64(0xFF), lead)
        hydrogen = (lead == 72) | (lead == 68)
    icode = letter(column("pdbx_pdb_ins_code", required=False), 32)
    comp = tokens.words(column("auth_comp_id", "label_comp_id"))
    ids = [column(c, required=False) for c in ("label_entity_id", "label_asym_id")]

    def entity(res, water, candidate):  # by the label_entity_id and label_asym_id of each residue's first atom
        return _cif_entity(data, *(None if span is None else tokens.distinct((span[0][res.first_in_file],
                                                                               span[1][res.first_in_file]))
                                   for span in ids), len(res.first)) == 2

    return _Atoms(chain=tokens.words(column("auth_asym_id", "label_asym_id")),
                  key=comp + tokens.words(spans[5]) + (icode,),
                  name=np.where(atom_span[1] - atom_span[0] <= 4, atom & _U64(0xFFFFFFFF), 0).astype(np.uint32),
                  altloc=letter(column("label_alt_id", required=False), 32), hydrogen=hydrogen,
                  numbers=numbers, number=values[:, 5], number_status=status[:, 5],
                  number_text=lambda i: text(i, 5).decode("latin-1"), icode=icode, where=where, entity=entity,
                  merge_chain_parts=True)


def _cif_category(data: bytes, lowered: bytes, category: str, fields: Sequence[str]) -> List[List[str]]:
    """Rows of a small mmCIF category (`_entity.` ...), its text cut out and read by gemmi."""
    import gemmi

    name = category.encode()
    at = lowered.find(b"\n" + name) + 1
    if not at:
        return []
    start = data.rfind(b"\n", 0, at - 1) + 1
    start = start if lowered[start:at].strip() == b"loop_" else at
    pos, end, in_text = at, len(data), False
    while pos < len(data):  # the category ends at a line, outside text fields, starting another item or block
        if data.startswith(b";", pos):
            in_text = not in_text
        elif not in_text and lowered.startswith(_CIF_END_OF_LOOP, pos) and not lowered.startswith(name, pos):
            end = pos
            break
        pos = (data.find(b"\n", pos) + 1) or len(data)
    try:
        block = gemmi.cif.read_string("data_x\n" + data[start:end].decode("latin-1")).sole_block()
        table = block.find(category, ["?" + f for f in fields])
        return [[row.str(i) if row.has(i) else "" for i in range(len(fields))] for row in table]
    except Exception:  # a malformed side table loses only the entity types, as in gemmi's own reader
        return []


def _cif_entity(data: bytes, entity_ids, asym_ids, num_residue: int) -> np.ndarray:
    """Entity kinds of residues: the entity by `_struct_asym` (else label_entity_id), its kind by `_entity.type`;
    2 non-polymer or water, else 1.

    Args:
        entity_ids, asym_ids: (distinct values, [R] index among them) of the label_entity_id and label_asym_id
            of each residue's first atom, or None for an absent column.
    """
    lowered = data.lower()
    types = {r[0]: r[1].lower() for r in _cif_category(data, lowered, "_entity.", ["id", "type"])}
    for row in _cif_category(data, lowered, "_entity_poly.", ["entity_id"]):
        types[row[0]] = types.get(row[0]) or "polymer"
    of_asym = types and {r[0]: r[1] for r in _cif_category(data, lowered, "_struct_asym.", ["id", "entity_id"])}
    if of_asym:
        entity_ids = None if asym_ids is None else ([of_asym.get(a) for a in asym_ids[0]], asym_ids[1])
    if not types or entity_ids is None:
        return np.ones(num_residue, np.int8)
    kinds = np.array([2 if types.get(e) in ("non-polymer", "water") else 1 for e in entity_ids[0]], np.int8)
    return kinds[entity_ids[1]]


# ---- residues -----------------------------------------------------------------------------------------------------
class _Residues(NamedTuple):
    first: np.ndarray          # [R] first atom of each residue (atoms grouped contiguously per residue)
    first_in_file: np.ndarray  # [R] the same atom's index in file order
    of_atom: np.ndarray        # [A] residue of each atom
    part: np.ndarray           # [R] chain part of each residue
    part_start: np.ndarray     # [P] first atom of each chain part (file order)
    part_name: List[str]       # [P] chain name of each part
    run_start: np.ndarray      # first atom of each run of atoms of one residue (file order)


def _changes(columns: Tuple[np.ndarray, ...]) -> np.ndarray:
    """[A] bool: the atom differs from the one before in any of the columns (True for the first atom)."""
    change = np.empty(len(columns[0]), bool)
    change[0] = True
    change[1:] = columns[0][1:] != columns[0][:-1]
    for column in columns[1:]:
        change[1:] |= column[1:] != column[:-1]
    return change


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
    position = atoms.number[run_start] * 256 + atoms.icode[run_start]
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
    values = atoms.number[first]
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
    """The `Protein` arrays and metadata from the atom records (see the rules in the module docstring)."""
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
    same = (chain_of[1:] == chain_of[:-1]) & (numbers[1:] == numbers[:-1]) & (icodes[1:] == icodes[:-1])
    if same.any():  # micro-heterogeneity: of consecutive residues at one position, the first of highest CA occupancy
        group = np.cumsum(np.concatenate(([True], ~same)))
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
    return arrays, {"chain_ids": chain_ids, "name": protein_name(path), "num_dropped": num_dropped}


def read_structure_arrays(path: PathLike, chain: Optional[str] = None, max_bytes: Optional[int] = None):
    """Parse a structure file into numpy arrays (the fields of `Protein`) plus metadata.

    Kept separate from `load_structure` so that worker processes send plain arrays back.

    Args:
        path: `.pdb`, `.ent`, `.cif`, `.mmcif`, or any of them `.gz`-compressed.
        chain: keep only this chain (author chain id); all chains by default.
        max_bytes: refuse files (or `.gz` contents) larger than this; default `MAX_STRUCTURE_BYTES`.
    Returns:
        (arrays named like the per-residue fields of `Protein`, {"chain_ids", "name", "num_dropped"})
    Raises:
        StructureError: one sentence naming the file (and the line) and what is wrong with it.
    """
    path = Path(path)
    fmt = structure_format(path)
    if fmt is None:
        raise StructureError(f"{path}: unknown file type; expected one of "
                             f"{', '.join(STRUCTURE_SUFFIXES)} (optionally .gz).")
    data = _read_bytes(path, MAX_STRUCTURE_BYTES if max_bytes is None else max_bytes)
    if fmt == "pdb":
        atoms = _pdb_atoms(data, path)
    else:
        _refuse_control_bytes(data, path)
        atoms = _cif_atoms(data, path)
    return _atoms_to_arrays(atoms, path, chain)


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


def protein_name(path: PathLike) -> str:
    """File name without directory and structure suffixes: `a/1ABC-A.pdb.gz` -> `1ABC-A`."""
    name = os.path.basename(os.fspath(path))
    if name.lower().endswith(".gz"):
        name = name[:-3]
    stem, dot, suffix = name.rpartition(".")
    return stem if dot and "." + suffix.lower() in STRUCTURE_SUFFIXES else name


def load_structure(path: PathLike, chain: Optional[str] = None) -> Protein:
    """Read one structure file into a `Protein`.

    Args:
        path: `.pdb`, `.ent`, `.cif`, `.mmcif`, or any of them `.gz`-compressed.
        chain: keep only this chain (author chain id); all chains by default.
    Raises:
        StructureError: one sentence naming the file and what is wrong with it.
    """
    arrays, meta = read_structure_arrays(path, chain)
    return Protein.from_arrays(arrays, **meta)


def _parse_for_pool(job):
    path, chain = job
    try:
        return read_structure_arrays(path, chain), None
    except StructureError as error:
        return None, str(error)
    except Exception as error:  # never let one file end a run of thousands
        return None, f"{path}: unexpected error while reading ({type(error).__name__}: {_first_line(error)})."


def load_structures(paths: Sequence[PathLike], chain: Optional[str] = None, workers: int = 0,
                    progress: bool = True, description: str = "parsing structures"
                    ) -> Tuple[List[Protein], List[Tuple[str, str]]]:
    """Read many structure files, skipping the bad ones.

    Args:
        paths: structure files.
        chain: chain filter applied to every file.
        workers: worker processes (0 = in this process).
        progress: show a tqdm progress bar.
    Returns:
        (proteins in the order of `paths` minus the skipped ones, [(path, reason)] of the skipped files).
    """
    jobs = [(str(p), chain) for p in paths]
    proteins, skipped = [], []

    def died(job, how):  # a file whose reading killed its worker process twice: skipped like any bad file
        return None, f"{job[0]}: the process reading it died ({how}), also when run again alone."

    for (path, _), (parsed, reason) in zip(jobs, ordered_map(_parse_for_pool, jobs, workers, progress, description,
                                                              unit="file", on_death=died)):
        if parsed is None:
            skipped.append((path, reason))
            logger.warning("skipped %s", reason)
        else:
            arrays, meta = parsed
            proteins.append(Protein.from_arrays(arrays, **meta))
    return proteins, skipped
