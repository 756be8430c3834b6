"""FoldComp databases: the published layout read into compact arrays, entries decoded into `Protein` arrays, and
a database written entry by entry (atomic and resumable).

A FoldComp database `DB` is the MMseqs2 database layout that the `foldcomp` tool writes and the published
databases (AlphaFold DB, ESM Atlas) use:

==============  ==================================================================================================
file            content
==============  ==================================================================================================
DB              the entries one after another: each a FoldComp record ("FCMP", a header, the compressed torsion
                angles) followed by one NUL byte
DB.index        text, one line per entry: key TAB offset TAB size (size counts the NUL), sorted by key
DB.lookup       text, one line per entry: key TAB name TAB file key
DB.dbtype       4 bytes: the database type, a little-endian int32 (12: "generic", what `foldcomp` writes)
DB.source       text: file key TAB source name (optional, not read)
==============  ==================================================================================================

`Entries` holds the index as numbers, not Python objects: key (uint32), offset (int64), size (uint32), problem
(uint8), the entry's line of the lookup file (int64) and where that line's name sits in the memory-mapped file
(int64 + uint16), 35 bytes an entry (35 MB for 1 M entries; `benchmarks/stream.py`); names are read from the
lookup file only when asked for. The data file is memory-mapped by each process that reads it (a process forked
after opening maps it again). Entries the files disagree about are kept in the index but marked bad with the reason
(`Entries.problem`); reading one raises `EntryError` naming the database and the entry:

* an offset and size that run past the end of the data file (a truncated or damaged file), or a size too small
  for a record; a record that does not start with "FCMP" or does not end with NUL; one that does not decode;
* a key of the index with no name in the lookup file (the lookup disagrees with the index). Names of the lookup
  file without an entry of the index cannot be read and are counted (`Entries.unindexed`).

Decoding (`decode`) reads the record's header for the first residue number and the chain, and the coordinates
through `foldcomp.get_data` (no PDB text is written or parsed). FoldComp stores, per residue, every heavy atom of
its residue type in the atom14 order of `constants.SIDE_CHAIN_ATOMS` (plus OXT after the last residue, dropped
here; of an unknown residue only N, CA and C); side-chain atoms missing from the file it was made from are
rebuilt by FoldComp, so every slot of the residue's type is set. Residues are numbered consecutively from the
header's first number (FoldComp keeps no gaps and no insertion codes); pLDDT is the B-factor column of AlphaFold
DB models and lands in `bfactor`. A record of fewer than `MIN_RESIDUES` residues is refused (EntryError) before
foldcomp sees it: its decoder crashes the process on one.

Encoding (`encode`) compresses one chain of `Protein` arrays: the chain is written as clean PDB text
(`chain_text`: ATOM records of one model and one chain, the atom14 atoms of `atom_mask`, residue names from
`residue_type`, residues numbered consecutively from the chain's first number, B-factor = `bfactor`) and given to
`foldcomp.compress`. The text FoldComp is given matters: raw PDB files with alternate locations, insertion codes,
several models or numbering gaps crash foldcomp 1.0.0 (SIGSEGV) or merge residues, while the same structures
written this way compress (measured on the 43 real chains of ../shared/data: 9 crashes from raw text, none from
clean text). FoldComp cannot represent a chain break (a missing stretch: it rebuilds the chain from torsion
angles with ideal bond geometry, so every residue after the gap is displaced, 3-20 Å measured); the caller
compares the decoded Cα atoms with its own (`esm-gearnet pack` does, and can pack a broken chain's segments).
"""
from __future__ import annotations

import ctypes
import itertools
import os
import struct
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple, Union

import numpy as np

from .. import constants
from .errors import StructureError, _first_line
from .residues import residue_arrays

SUFFIXES = ("", ".index", ".lookup", ".dbtype")  # the files a database needs; ".source" is optional
GENERIC_DBTYPE = 12  # what `foldcomp compress --db` writes (MMseqs2's "generic" type)
MAGIC = b"FCMP"
# magic, residues, atoms, first residue number, first atom, anchors, chain, (pad), side-chain torsions, first and
# last residue, (pad), title length: the record's header as FoldComp writes it (`CompressedFileHeader`)
_HEADER = struct.Struct("<4sHHhHBc2xIcc2xI")
_HEADER_PADDING = (14, 22)  # where the two padding pairs sit in a record
_UINT32 = (1 << 32) - 1  # keys and sizes are held as uint32
_CHUNK = 1 << 24  # index and lookup files are scanned 16 MiB at a time (bounded memory for 214 M entries)

# problems an entry can have (Entries.problem), 0 = none
PROBLEMS = ("", "its offset and size run past the end of the data file (a truncated or damaged file)",
            "its size is too small for a FoldComp record", "it has no name in the lookup file (the lookup "
            "disagrees with the index)", "its key appears twice in the index")

# residue letter (byte) -> residue type; any other letter is unknown (20)
_TYPE_OF_LETTER = np.full(256, constants.UNKNOWN, np.int64)
for _letter, _type in constants.LETTER_TO_TYPE.items():
    _TYPE_OF_LETTER[ord(_letter)] = _type
# atoms FoldComp stores for each residue type: backbone + side chain; of an unknown residue (UNK, letter X) only
# N, CA and C (measured with foldcomp 1.0.0: its O and CB are not stored)
ATOMS_PER_TYPE = np.array([4 + len(constants.SIDE_CHAIN_ATOMS[constants.ONE_TO_THREE[letter]])
                           for letter in constants.RESIDUE_LETTERS] + [3], np.int64)
MIN_RESIDUES = 2  # foldcomp 1.0.0's decoder (get_data, decompress) crashes (SIGSEGV) on a record of 1 residue
MAX_RESIDUES = 65535  # the header counts residues in 16 bits
# the PDB columns the encoder writes: numbers that do not fit them cannot be written
PDB_COORDINATE_RANGE = (-999.999, 9999.999)  # Å, 8.3f
PDB_RESIDUE_NUMBERS = (-999, 9999)  # 4 columns


class EntryError(StructureError):
    """An entry of a FoldComp database that cannot be read; the message names the database and the entry."""
    __module__ = "esm_gearnet.data.io"


def database_files(path) -> List[Path]:
    """The files of the database `path` that must exist."""
    return [Path(f"{path}{suffix}") for suffix in SUFFIXES]


def is_database(path) -> bool:
    """Whether `path` names a FoldComp database (its data, index and lookup files exist)."""
    return all(p.is_file() for p in database_files(path)[:3])


class Entries:
    """The index and lookup of a FoldComp database as compact arrays (module docstring).

    Attributes:
        keys: [n] uint32, sorted; offsets: [n] int64; sizes: [n] uint32 (bytes, the NUL included).
        problem: [n] uint8, 0 or an index into `PROBLEMS`.
        unindexed: names of the lookup file whose key is not in the index.
    """

    def __init__(self, path, data_size: int):
        self.path = str(path)
        rows = _numbers(Path(f"{path}.index"), 3, self.path)
        if (rows[:, 0] > _UINT32).any() or (rows[:, 2] > _UINT32).any():  # stored as uint32: refuse, never wrap
            raise ValueError(f"FoldComp database {self.path}: {Path(f'{path}.index').name} holds a key or size "
                             "beyond 32 bits; the index is damaged (download or pack the database again).")
        if (np.diff(rows[:, 0]) < 0).any():  # published indexes are sorted by key: no copy of 214 M rows then
            rows = rows[np.argsort(rows[:, 0], kind="stable")]
        self.keys = rows[:, 0].astype(np.uint32)
        self.offsets = rows[:, 1].astype(np.int64)
        self.sizes = rows[:, 2].astype(np.uint32)
        del rows
        self.problem = np.zeros(len(self.keys), np.uint8)
        self.problem[self.sizes < _HEADER.size + 1] = 2
        self.problem[self.offsets + self.sizes.astype(np.int64) > data_size] = 1
        self.problem[self.offsets < 0] = 1
        repeated = np.zeros(len(self.keys), bool)
        repeated[1:] = self.keys[1:] == self.keys[:-1]
        self.problem[repeated] = 4
        self._lookup_path = Path(f"{path}.lookup")
        lookup_keys, self._name_start, self._name_length = _lookup(self._lookup_path, self.path)
        at = np.minimum(np.searchsorted(lookup_keys, self.keys), max(len(lookup_keys) - 1, 0))
        named = (lookup_keys[at] == self.keys) if len(lookup_keys) else np.zeros(len(self.keys), bool)
        self.problem[~named & (self.problem == 0)] = 3
        self._name_at = np.where(named, at, -1)
        indexed = np.zeros(len(lookup_keys), bool)
        indexed[at[named]] = True
        self.unindexed = int((~indexed).sum())
        self._lookup = None
        del lookup_keys, at, named, indexed
        _give_back_freed_memory()

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self):  # the mapped lookup file is mapped again where it is read, never pickled
        return {**self.__dict__, "_lookup": None}

    def name(self, i: int) -> str:
        """The name of entry `i` (its key, as text, when the lookup file has none)."""
        at = int(self._name_at[i])
        if at < 0:
            return str(int(self.keys[i]))
        if self._lookup is None or self._lookup[1] != os.getpid():
            self._lookup = (np.memmap(self._lookup_path, np.uint8, mode="r"), os.getpid())
        start = int(self._name_start[at])
        return bytes(self._lookup[0][start:start + int(self._name_length[at])]).decode("utf-8", "replace")

    def where(self, i: int) -> str:
        return f"FoldComp database {self.path}, entry {self.name(i)} (key {int(self.keys[i])})"

    def positions_of_keys(self, keys: Sequence[int]) -> np.ndarray:
        """Positions of the entries with these keys; a key that is not in the index raises ValueError."""
        keys = np.asarray(keys, np.int64)
        at = np.minimum(np.searchsorted(self.keys, keys), max(len(self.keys) - 1, 0))
        missing = (self.keys[at] != keys) if len(self.keys) else np.ones(len(keys), bool)
        if missing.any():
            raise ValueError(f"FoldComp database {self.path}: no entry with key {int(keys[missing][0])} "
                             f"({int(missing.sum())} of the {len(keys)} keys asked for are not in its index).")
        return at.astype(np.int64)

    def positions_of_names(self, names: Iterable[str]) -> np.ndarray:
        """Positions of the entries with these names (one pass over the lookup file); a name the database does
        not hold raises ValueError."""
        wanted = {name: None for name in names}
        for i in range(len(self)):
            name = self.name(i)
            if name in wanted and wanted[name] is None:
                wanted[name] = i
        missing = [name for name, at in wanted.items() if at is None]
        if missing:
            raise ValueError(f"FoldComp database {self.path}: no entry named {missing[0]!r} ({len(missing)} of the "
                             f"{len(wanted)} names asked for are not in {self._lookup_path}).")
        return np.array(sorted(wanted.values()), np.int64)


class Database:
    """A FoldComp database opened for reading: `len`, `name(i)`, `num_residues(positions)` from the records'
    headers, `arrays(i)` decoded. Cheap to send to worker processes (the data file is mapped again there).

    Raises:
        FileNotFoundError: one sentence naming the database and the missing files.
    """

    def __init__(self, path):
        self.path = str(path)
        missing = [p.name for p in database_files(self.path) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"FoldComp database {self.path}: {', '.join(missing)} missing (a database is "
                                    f"the files {', '.join(p.name for p in database_files(self.path))}); "
                                    "download it with esm_gearnet.data.datasets.foldcomp.download_database or "
                                    "write one with esm-gearnet pack.")
        self.data_size = os.path.getsize(self.path)
        self.entries = Entries(self.path, self.data_size)
        self._data = None

    def __len__(self) -> int:
        return len(self.entries)

    def __getstate__(self):
        return {**self.__dict__, "_data": None}

    def name(self, i: int) -> str:
        return self.entries.name(i)

    def _mapped(self) -> np.ndarray:
        if self._data is None or self._data[1] != os.getpid():
            data = np.memmap(self.path, np.uint8, mode="r") if self.data_size else np.zeros(0, np.uint8)
            self._data = (data, os.getpid())
        return self._data[0]

    def record(self, i: int) -> bytes:
        """The FoldComp record of entry `i` (without its NUL). Raises EntryError for a bad entry."""
        problem = int(self.entries.problem[i])
        if problem:
            raise EntryError(f"{self.entries.where(i)}: {PROBLEMS[problem]}.")
        offset, size = int(self.entries.offsets[i]), int(self.entries.sizes[i])
        data = self._mapped()
        header = bytes(data[offset:offset + _HEADER.size])
        if header.startswith(MAGIC) and len(header) == _HEADER.size:  # a damaged size: refused before it is copied
            _, residues, _, _, _, anchors, _, torsions, _, _, title = _HEADER.unpack(header)
            if size - 1 != record_size(residues, anchors, torsions, title):
                raise EntryError(f"{self.entries.where(i)}: does not decode (its size in the index, {size} bytes, is "
                                 "not that of the FoldComp record its header describes: a damaged index or entry).")
        blob = bytes(data[offset:offset + size])
        if not blob.startswith(MAGIC) or blob[-1:] != b"\0":
            raise EntryError(f"{self.entries.where(i)}: the bytes at offset {offset} are not a FoldComp record "
                             "(no FCMP at its start or no NUL at its end: the index does not match the data file).")
        return blob[:-1]

    def num_residues(self, positions: Union[Sequence[int], np.ndarray]) -> np.ndarray:
        """[len(positions)] int64 residues of these entries, read from their headers (0 for a bad entry)."""
        positions = np.asarray(positions, np.int64)
        good = self.entries.problem[positions] == 0
        offsets = self.entries.offsets[positions[good]]
        data = self._mapped()
        counts = np.zeros(len(positions), np.int64)
        counts[good] = data[offsets + 4].astype(np.int64) | (data[offsets + 5].astype(np.int64) << 8)
        return counts

    def arrays(self, i: int) -> Tuple[Dict[str, np.ndarray], Dict]:
        """(the `Protein` arrays, {"chain_ids", "name", "num_dropped"}) of entry `i`, as `read_structure_arrays`
        gives them. Raises EntryError."""
        return decode(self.record(i), self.entries.where(i), self.name(i))


def decode(record: bytes, where: str, name: str) -> Tuple[Dict[str, np.ndarray], Dict]:
    """A FoldComp record (without its NUL) -> (`Protein` arrays, metadata); `where` names it in errors."""
    import foldcomp

    if not record.startswith(MAGIC) or len(record) < _HEADER.size:
        raise EntryError(f"{where}: not a FoldComp record (no FCMP header at its start).")
    _, num_residue, _, first, _, anchors, chain, torsions, _, _, title = _HEADER.unpack_from(record, 0)
    if num_residue < MIN_RESIDUES:
        raise EntryError(f"{where}: its header counts {num_residue} residue(s); foldcomp's decoder crashes on "
                         f"records of fewer than {MIN_RESIDUES}, so it is not decoded.")
    # the size the header implies (measured on records of foldcomp 1.0: fixed parts, anchors, 9 bytes a residue,
    # one a side-chain torsion, the title): a truncated or damaged record is refused before the library reads it,
    # which it does past the end of short input (a segmentation fault)
    expected = record_size(num_residue, anchors, torsions, title)
    if len(record) != expected:
        raise EntryError(f"{where}: does not decode (the record is {len(record)} bytes, its header says "
                         f"{expected}: a truncated or damaged entry).")
    try:
        data = foldcomp.get_data(record)
    except Exception as error:  # the library's ValueError
        raise EntryError(f"{where}: does not decode ({_first_line(error)}).") from None
    letters = np.frombuffer(data["residues"].encode("latin-1"), np.uint8)
    types = _TYPE_OF_LETTER[letters]
    counts = ATOMS_PER_TYPE[types]
    # a list of (x, y, z) tuples: flattened first, as numpy converts a list of floats faster than a list of tuples
    # (measured: 1.03 ms against 1.75 ms for the 2,558 atoms of a 327-residue protein)
    xyz = np.array(list(itertools.chain.from_iterable(data["coordinates"])), np.float32).reshape(-1, 3)
    expected = int(counts.sum())
    if len(xyz) == expected + 1:  # OXT of the last residue
        xyz = xyz[:-1]
    if len(types) != num_residue or len(xyz) != expected or len(data["b_factors"]) != len(types):
        raise EntryError(f"{where}: decodes to {len(types)} residues and {len(xyz)} atoms, not the {num_residue} "
                         f"residues and {expected} atoms its header and residue types need.")
    starts = np.cumsum(counts) - counts
    residue = np.repeat(np.arange(len(types)), counts)
    slots = residue * constants.NUM_ATOM_SLOTS + (np.arange(expected) - starts[residue])
    chain_id = chain.decode("latin-1").strip() or "A"
    numbers = first + np.arange(len(types), dtype=np.int64)
    arrays = residue_arrays(where, slots, xyz, types, numbers, np.full(len(types), 32, np.uint8),
                            np.zeros(len(types), np.int64), np.asarray(data["b_factors"], np.float32), (chain_id,))
    return arrays, {"chain_ids": (chain_id,), "name": name, "num_dropped": 0}


def record_size(num_residue: int, anchors: int, torsions: int, title: int) -> int:
    """Bytes of a FoldComp record with these header fields."""
    return 97 + 40 * anchors + 9 * num_residue + torsions + title


# ---- encoding ------------------------------------------------------------------------------------------------
_THREE = np.array([constants.ONE_TO_THREE[letter] for letter in constants.RESIDUE_LETTERS] + ["UNK"])
# PDB atom name (columns 13-16) and element of each slot of each residue type ("" for a slot the type lacks)
_ATOM_NAMES = np.array([[(name if len(name) == 4 else f" {name}").ljust(4) for name in sorted(layout, key=layout.get)]
                        + [""] * (constants.NUM_ATOM_SLOTS - len(layout)) for layout in constants.ATOM_SLOTS])
_ELEMENTS = np.array([[name.strip()[:1] for name in row] for row in _ATOM_NAMES])
_ATOM_LINE = "ATOM  %5d %s %s %s%4d    %8.3f%8.3f%8.3f  1.00%6.2f           %s  "


def chain_text(arrays: Dict[str, np.ndarray], rows: np.ndarray, chain_id: str) -> str:
    """The residues `rows` of `Protein` arrays as the clean PDB text `foldcomp.compress` is given (module
    docstring): ATOM records of the atoms of `atom_mask` in atom14 order, one model, chain `chain_id` (its first
    character; "A" when blank), residues numbered consecutively from the first row's number (from 1 when the
    numbers would not fit 4 columns), occupancy 1, B-factor = `bfactor`.

    Args:
        arrays: `residue_type` [L], `atom_pos` [L, 14, 3], `atom_mask` [L, 14], `residue_number` [L],
            `bfactor` [L] (as `read_structure_arrays` gives them).
        rows: [R] the residues to write, in order.
    Raises:
        ValueError: a coordinate outside what PDB's columns hold (`PDB_COORDINATE_RANGE`).
    """
    rows = np.asarray(rows, np.int64)
    types = arrays["residue_type"][rows]
    # [A] residue (position in rows) and slot of every atom written, residue by residue in atom14 order; a slot
    # the residue type has no atom for is never set by the reader, and never written
    residue, slot = np.nonzero(arrays["atom_mask"][rows] & (_ATOM_NAMES[types] != ""))
    xyz = arrays["atom_pos"][rows[residue], slot].astype(np.float64)  # [A, 3]
    low, high = PDB_COORDINATE_RANGE
    if ((xyz < low) | (xyz > high)).any():
        raise ValueError(f"a coordinate outside {low:g}..{high:g} Å, which PDB text cannot hold")
    first = int(arrays["residue_number"][rows[0]]) if len(rows) else 1
    if first < PDB_RESIDUE_NUMBERS[0] or first + len(rows) - 1 > PDB_RESIDUE_NUMBERS[1]:
        first = 1
    chain = (chain_id.strip() or "A")[0]
    bfactor = np.clip(arrays["bfactor"][rows], -99.99, 999.99)[residue]
    atom_types = types[residue]
    columns = zip((np.arange(len(residue)) % 99999 + 1).tolist(), _ATOM_NAMES[atom_types, slot].tolist(),
                  _THREE[atom_types].tolist(), (first + residue).tolist(), xyz[:, 0].tolist(), xyz[:, 1].tolist(),
                  xyz[:, 2].tolist(), bfactor.tolist(), _ELEMENTS[atom_types, slot].tolist())
    lines = [_ATOM_LINE % (serial, name, three, chain, number, x, y, z, b, element)
             for serial, name, three, number, x, y, z, b, element in columns]
    return "\n".join(lines + ["TER", "END", ""])


def encode(arrays: Dict[str, np.ndarray], rows: np.ndarray, chain_id: str, name: str) -> bytes:
    """The FoldComp record (without its NUL) of the residues `rows` of `Protein` arrays, named `name` in it.

    Args:
        arrays, rows, chain_id: as for `chain_text`.
    Raises:
        ValueError: one sentence (without the input's name) when the residues cannot be encoded: fewer than
            `MIN_RESIDUES` or more than `MAX_RESIDUES`, a residue without its N, CA or C atom (FoldComp would
            drop it), a coordinate PDB text cannot hold, or foldcomp's own refusal.
    """
    import foldcomp

    rows = np.asarray(rows, np.int64)
    if not MIN_RESIDUES <= len(rows) <= MAX_RESIDUES:
        raise ValueError(f"{len(rows)} residue(s): a FoldComp record holds {MIN_RESIDUES} to {MAX_RESIDUES} "
                         f"(foldcomp's decoder crashes on fewer)")
    backbone = arrays["atom_mask"][rows][:, :3]
    if not backbone.all():
        residue, slot = np.argwhere(~backbone)[0]
        number = int(arrays["residue_number"][rows[residue]])
        icode = chr(int(arrays["insertion_code"][rows[residue]])).strip() if "insertion_code" in arrays else ""
        raise ValueError(f"residue {_THREE[arrays['residue_type'][rows[residue]]]} {number}{icode} has no "
                         f"{constants.BACKBONE_ATOMS[slot]} atom; FoldComp needs N, CA and C of every residue (it "
                         "would drop the residue)")
    text = chain_text(arrays, rows, chain_id)
    try:
        record = bytearray(foldcomp.compress(name, text))
    except Exception as error:  # the library's own refusal (a crash of it cannot be caught here)
        raise ValueError(f"foldcomp refused it ({_first_line(error)})") from None
    # foldcomp copies its header struct into the record with the struct's padding uninitialised (the 2 bytes
    # after the chain letter, and the 2 after the last residue's letter): the same chain gave other bytes 14-15
    # from one process to the next. Nothing reads them; they are set to zero, so that a record, and a database
    # `esm-gearnet pack` writes, depends on its inputs alone (a continued pack equals an uninterrupted one byte
    # for byte).
    for start in _HEADER_PADDING:
        record[start:start + 2] = b"\0\0"
    return bytes(record)


def _give_back_freed_memory() -> None:
    """Hand the pages of the heap that are free back to the system (glibc's `malloc_trim`; elsewhere nothing).

    Reading an index leaves its temporaries (tens of MB per million entries) freed but resident: glibc serves
    allocations below its adaptive mmap threshold, which rises to the size of the largest block freed, from the
    heap, and shrinks the heap only from its top, where the index's arrays now sit. Measured on a 1 M-entry
    database: 93 MB more resident after opening it without the trim, 44 MB with it (35 MB of them its arrays)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (TypeError: Windows has no default library)
        return
    trim(0)


# ---- reading the text files ----------------------------------------------------------------------------------
def _chunks(path: Path):
    """(start, bytes) of `path` in pieces of about `_CHUNK` bytes that end at a line break."""
    with open(path, "rb") as handle:
        start, rest = 0, b""
        while True:
            block = handle.read(_CHUNK)
            if not block:
                if rest:
                    yield start, rest
                return
            block = rest + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                rest = block
                continue
            yield start, block[:cut]
            start += cut
            rest = block[cut:]


def _numbers(path: Path, columns: int, database: str) -> np.ndarray:
    """[lines, columns] int64 of a text file of tab-separated non-negative integers (the index).

    Parsed by numpy's C text reader (`np.fromstring` with a separator: any whitespace), not through Python objects:
    `bytes.split` made three objects a line, 5 times slower, 200 MB for 1 M entries at its peak and tens of MB the
    process kept after they were freed (a fragmented heap)."""
    parts = []
    for _, block in _chunks(path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # text that is not a number: numpy warns now, will raise later
                values = np.fromstring(block, dtype=np.int64, sep=" ")
        except (ValueError, DeprecationWarning):
            values = None
        if (values is None or len(values) % columns or (values == np.iinfo(np.int64).max).any()  # overflowed
                or block.count(b"\n") + (not block.endswith(b"\n")) != len(values) // columns):
            raise ValueError(f"FoldComp database {database}: {path.name} is not {columns} numbers a line; the "
                             "index is damaged (download or pack the database again).")
        parts.append(values.reshape(-1, columns))
    return np.concatenate(parts) if parts else np.zeros((0, columns), np.int64)


def _lookup(path: Path, database: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys [m] uint32 sorted, where each name starts in the file [m] int64, its length [m] uint16)."""
    keys, starts, lengths = [], [], []
    for start, block in _chunks(path):
        buffer = np.frombuffer(block, np.uint8)
        ends = np.flatnonzero(buffer == 10)
        if len(block) and not block.endswith(b"\n"):
            ends = np.append(ends, len(block))
        begins = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
        tabs = np.flatnonzero(buffer == 9)
        lines = np.arange(len(ends))
        line_of_tab = np.searchsorted(ends, tabs)
        per_line = np.bincount(line_of_tab, minlength=len(ends))[:len(ends)]
        good = per_line == 2
        if good.all():
            first_tab, second_tab = tabs[0::2], tabs[1::2]
            width = first_tab - begins
            good = (width >= 1) & (width <= 10)
        if not good.all():
            line = int(lines[~good][0])
            raise ValueError(f"FoldComp database {database}: {path.name} line {_line_number(path, start, line)} is "
                             "not key TAB name TAB file key; the lookup file is damaged (download or pack the "
                             "database again).")
        name_end = second_tab
        key = np.zeros(len(ends), np.int64)
        for j in range(int(width.max()) if len(width) else 0):
            has = width > j
            digit = buffer[begins[has] + j].astype(np.int64) - 48
            if ((digit < 0) | (digit > 9)).any():
                line = int(np.flatnonzero(has)[np.flatnonzero((digit < 0) | (digit > 9))[0]])
                raise ValueError(f"FoldComp database {database}: {path.name} line "
                                 f"{_line_number(path, start, line)} has a key that is not a number; the lookup "
                                 "file is damaged (download or pack the database again).")
            key[has] = key[has] * 10 + digit
        keys.append(key)
        starts.append(start + first_tab + 1)
        lengths.append(np.minimum(name_end - first_tab - 1, 65535))
    if not keys:
        return np.zeros(0, np.uint32), np.zeros(0, np.int64), np.zeros(0, np.uint16)
    key, start, length = np.concatenate(keys), np.concatenate(starts), np.concatenate(lengths)
    if (key > _UINT32).any():  # held as uint32: refused, never wrapped onto another entry's key
        raise ValueError(f"FoldComp database {database}: {path.name} holds a key beyond 32 bits; the lookup file is "
                         "damaged (download or pack the database again).")
    if (np.diff(key) < 0).any():
        order = np.argsort(key, kind="stable")
        key, start, length = key[order], start[order], length[order]
    return key.astype(np.uint32), start, length.astype(np.uint16)


def _line_number(path: Path, chunk_start: int, line_in_chunk: int) -> int:
    with open(path, "rb") as handle:
        before = handle.read(chunk_start).count(b"\n")
    return before + line_in_chunk + 1


# ---- writing -------------------------------------------------------------------------------------------------
class DatabaseWriter:
    """Writes a FoldComp database entry by entry, so that a crash loses at most the inputs being written.

    The entries go to `DB.partial` and a journal `DB.partial.tsv`, one line per event, flushed as written:

    ================================  ===========================================================================
    line                              meaning
    ================================  ===========================================================================
    settings TAB TEXT                 what the entries are made with (the first line; `settings`)
    KEY TAB OFFSET TAB SIZE TAB NAME  an entry appended (`append`): its key (its position), where its record and
    TAB SOURCE                        NUL sit in `DB.partial`, its name, the input it came from
    left TAB NAME TAB REASON TAB      something of an input left out of the database and why (`leave_out`)
    SOURCE
    done TAB SOURCE                   the input is finished: its entries and left-out lines are above (`done`)
    ================================  ===========================================================================

    `done(*sources)` first flushes the data file to the disk (fsync), then journals the inputs. A writer opened
    where a journal and `DB.partial` are continues: it keeps what the journal says up to its last `done` line
    whose entries are whole in `DB.partial` (a torn last line, an entry past the data's end and everything after
    it are dropped), cuts the data file there, and `sources_done` tells the caller which inputs to skip;
    `left_out` holds the rows of those inputs. A journal begun with other `settings` is refused (ValueError): its
    entries were made differently. `close()` writes `DB.lookup`, `DB.dbtype`, `DB.source` and, last, `DB.index`
    (each atomically), renames the data file to `DB` and removes the journal: a database whose index exists is
    complete. A writer killed inside `close()` after the rename and before the index is continued too (the data
    file is moved back to `DB.partial`).

    Args:
        path: the database `DB` to write.
        settings: one line of text saying how its entries are made (e.g. a command's options), checked on resume.
    Attributes:
        sources_done: {input: entries written before it was marked done}, in the order they were marked.
        left_out: [(name, reason)] journaled with `leave_out` (those of finished inputs, on resume).
    """

    def __init__(self, path, settings: str = ""):
        from ... import writing

        self.path = Path(path)
        self._writing = writing
        self.settings = _cell(settings) if settings else ""
        self.partial = Path(f"{self.path}.partial")
        self.journal = Path(f"{self.path}.partial.tsv")
        self.rows: List[Tuple[int, int, int, str]] = []
        self.left_out: List[Tuple[str, str]] = []
        self.sources_done: Dict[str, int] = {}
        self._marks: List[Tuple[str, int, int]] = []  # (input, entries, left-out rows) at each done line, in order
        index = Path(f"{self.path}.index")
        if self.journal.is_file() and not self.partial.is_file() and self.path.is_file() and not index.is_file():
            os.replace(self.path, self.partial)  # `close` was killed between renaming the data and the index
        if self.journal.is_file() and self.partial.is_file():
            self._continue()
        else:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            self.partial.write_bytes(b"")
        end = self.rows[-1][1] + self.rows[-1][2] if self.rows else 0
        with open(self.partial, "r+b") as handle:
            handle.truncate(end)
        self._rewrite_journal()
        self._data = open(self.partial, "ab")
        self._log = open(self.journal, "a", encoding="utf-8")

    def _continue(self) -> None:
        """Reads the journal of an earlier writer (class docstring)."""
        size = self.partial.stat().st_size
        rows: List[Tuple[int, int, int, str]] = []
        left: List[Tuple[str, str]] = []
        marks: List[Tuple[str, int, int]] = []
        settings = ""
        for line in self.journal.read_text("utf-8", "replace").splitlines(keepends=True):
            cells = line[:-1].split("\t")
            if not line.endswith("\n"):
                break  # torn by a crash
            if cells[0] == "settings" and len(cells) == 2:
                settings = cells[1]
            elif cells[0] == "done" and len(cells) == 2:
                marks.append((cells[1], len(rows), len(left)))
            elif cells[0] == "left" and len(cells) == 4:
                left.append((cells[1], cells[2]))
            elif len(cells) == 5 and cells[0].isdigit() and cells[1].isdigit() and cells[2].isdigit():
                offset, length = int(cells[1]), int(cells[2])
                if offset + length > size or offset != (rows[-1][1] + rows[-1][2] if rows else 0):
                    break  # its bytes did not reach the disk: this and everything after it is written again
                rows.append((len(rows), offset, length, cells[3]))
            else:
                break  # not a line this writer writes: the rest is not trusted
        if settings != self.settings:
            raise ValueError(f"{self.partial} was begun with other settings ({settings or 'none'}) than these "
                             f"({self.settings or 'none'}); continue it with the same ones, or remove "
                             f"{self.partial} and {self.journal} to start anew.")
        kept_rows, kept_left = marks[-1][1:] if marks else (0, 0)  # what the last done line covers
        self.rows, self.left_out, self._marks = rows[:kept_rows], left[:kept_left], marks
        self.sources_done = {source: entries for source, entries, _ in marks}

    def _rewrite_journal(self) -> None:
        """The journal of what is kept, each done line after the entries and left-out rows it covers."""
        lines = [f"settings\t{self.settings}\n"] if self.settings else []
        entries = left = 0
        for source, entries_then, left_then in self._marks:
            lines += [f"{k}\t{o}\t{s}\t{n}\t-\n" for k, o, s, n in self.rows[entries:entries_then]]
            lines += [f"left\t{n}\t{r}\t-\n" for n, r in self.left_out[left:left_then]]
            lines.append(f"done\t{source}\n")
            entries, left = entries_then, left_then
        self._writing.write_atomic(self.journal, "".join(lines))

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, name: str, record: bytes, source: str = "-") -> None:
        """One entry: a FoldComp record (as `foldcomp.compress` returns it) under `name`."""
        if not record.startswith(MAGIC):
            raise ValueError(f"{name}: not a FoldComp record.")
        name = _cell(name)
        offset = self._data.tell()
        self._data.write(record + b"\0")
        self._data.flush()
        key = len(self.rows)
        self.rows.append((key, offset, len(record) + 1, name))
        self._log.write(f"{key}\t{offset}\t{len(record) + 1}\t{name}\t{_cell(source)}\n")
        self._log.flush()

    def leave_out(self, name: str, reason: str, source: str = "-") -> None:
        """Record that `name` (an input, or a part of one) is not in the database, and why."""
        self.left_out.append((_cell(name), _cell(reason)))
        self._log.write(f"left\t{_cell(name)}\t{_cell(reason)}\t{_cell(source)}\n")
        self._log.flush()

    def done(self, *sources: str) -> None:
        """Mark the inputs `sources` finished (their entries and left-out rows, if any, written before): one
        flush of the data file to the disk for all of them."""
        os.fsync(self._data.fileno())
        lines = []
        for source in sources:
            self.sources_done[_cell(source)] = len(self.rows)
            self._marks.append((_cell(source), len(self.rows), len(self.left_out)))
            lines.append(f"done\t{_cell(source)}\n")
        self._log.write("".join(lines))
        self._log.flush()

    def close(self) -> Path:
        """Finish the database (class docstring); returns its path."""
        self._data.flush()
        os.fsync(self._data.fileno())
        self._data.close()
        self._log.close()
        write = self._writing.write_atomic
        write(Path(f"{self.path}.dbtype"), struct.pack("<i", GENERIC_DBTYPE))
        write(Path(f"{self.path}.lookup"), "".join(f"{k}\t{n}\t0\n" for k, _, _, n in self.rows))
        write(Path(f"{self.path}.source"), f"0\t{self.path.name}\n")
        os.replace(self.partial, self.path)
        write(Path(f"{self.path}.index"), "".join(f"{k}\t{o}\t{s}\n" for k, o, s, _ in self.rows))
        self.journal.unlink(missing_ok=True)
        return self.path

    def abandon(self) -> None:
        """Close the files, keeping what was written for a later writer to continue."""
        for handle in (self._data, self._log):
            if not handle.closed:
                handle.close()


def _cell(text: str) -> str:
    """A name or source as one cell of a tab-separated line."""
    return " ".join(str(text).replace("\t", " ").splitlines()) or "-"


def write_database(path, entries: Iterable[Tuple[str, bytes]]) -> Path:
    """A database at `path` from (name, FoldComp record) pairs; returns its path."""
    writer = DatabaseWriter(path)
    for name, record in entries:
        writer.append(name, record)
    return writer.close()


__all__ = ["ATOMS_PER_TYPE", "Database", "DatabaseWriter", "Entries", "EntryError", "GENERIC_DBTYPE", "PROBLEMS",
           "database_files", "decode", "is_database", "write_database"]
