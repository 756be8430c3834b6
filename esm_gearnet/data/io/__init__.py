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

The package, one concept per module: `text` (bytes and 8-byte words: control bytes, line numbers, hashing of
word codes), `numbers` (strict fixed-width numbers, their defaults and limits), `atoms` (the atom table both
readers fill), `pdb`, `mmcif` and `table` (ATOM3D's atom tables): each source's atom records and ligand rules,
`residues` (atoms grouped into
residues, altlocs, residue types, the atom14 arrays), `errors` (`StructureError`); here: the file (its kind, its
bytes under the size cap) and the public API.
"""
from __future__ import annotations

import gzip
import io
import logging
import os
import stat
import zlib
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from ..parallel import ordered_map
from ..protein import Protein
from .errors import StructureError, _first_line
from .foldcomp import EntryError
from .mmcif import _cif_atoms
from .numbers import COORDINATE_LIMIT, _parse_numbers
from .pdb import _pdb_atoms
from .residues import _TYPE_OF_RESIDUE, _atoms_to_arrays, residue_arrays, residue_type_of
from .table import table_atoms
from .text import _refuse_control_bytes

__all__ = ["COORDINATE_LIMIT", "EntryError", "MAX_STRUCTURE_BYTES", "STRUCTURE_SUFFIXES", "StructureError",
           "is_structure_file",
           "load_structure", "load_structures", "protein_name", "read_atom_table", "read_structure_arrays",
           "residue_arrays", "residue_type_of", "structure_format"]
__all__ += ["_TYPE_OF_RESIDUE", "_parse_numbers"]  # private, read here by the tests as before the split

logger = logging.getLogger(__name__)

STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif")
PathLike = Union[str, os.PathLike]

MAX_STRUCTURE_BYTES = 1 << 30  # 1 GiB of text: several times the largest PDB entry, far below a decompression bomb
_CHUNK = 1 << 18  # .gz read in chunks of 256 KiB
_RAISE_LIMIT = "raise esm_gearnet.data.io.MAX_STRUCTURE_BYTES if the file is genuine"


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


# ---- reading the bytes ------------------------------------------------------------------------------------------
# Here rather than in `text`: `open` is looked up in this module, where the tests replace it.
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
            return raw.read() if path.suffix.lower() != ".gz" else _gunzip(raw, path, limit)
    except FileNotFoundError:
        raise StructureError(f"{path}: no such file.") from None
    except PermissionError:
        raise StructureError(f"{path}: permission denied; make the file readable or leave it out.") from None
    except OSError as error:
        raise StructureError(f"{path}: cannot be read ({error.strerror or _first_line(error)}).") from None


def _given_bytes(data: bytes, path: Path, limit: int) -> bytes:
    """Bytes read elsewhere (a member of an archive) named `path`, decompressed for .gz, under the same limits."""
    if not data:
        raise StructureError(f"{path}: the file is empty.")
    if len(data) > limit:
        raise StructureError(f"{path}: the file is larger than {limit} bytes, more than any real structure; "
                             f"refusing it ({_RAISE_LIMIT}).")
    return data if path.suffix.lower() != ".gz" else _gunzip(io.BytesIO(data), path, limit)


def _gunzip(raw, path: Path, limit: int) -> bytes:
    """The decompressed content of the gzip stream `raw`, in chunks, refused past `limit` bytes."""
    chunks, size = [], 0
    try:
        with gzip.GzipFile(fileobj=raw) as handle:
            while size <= limit:
                chunk = handle.read(min(_CHUNK, limit + 1 - size))
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
                size += len(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise StructureError(f"{path}: the compressed file is damaged or truncated ({_first_line(error)}).") from None
    raise StructureError(f"{path}: decompresses to more than {limit} bytes, more than any real structure (a "
                         f"decompression bomb?); refusing it ({_RAISE_LIMIT}).")


def read_structure_arrays(path: PathLike, chain: Optional[str] = None, max_bytes: Optional[int] = None,
                          data: Optional[bytes] = None):
    """Parse a structure file into numpy arrays (the fields of `Protein`) plus metadata.

    Kept separate from `load_structure` so that worker processes send plain arrays back.

    Args:
        path: `.pdb`, `.ent`, `.cif`, `.mmcif`, or any of them `.gz`-compressed.
        chain: keep only this chain (author chain id); all chains by default.
        max_bytes: refuse files (or `.gz` contents) larger than this; default `MAX_STRUCTURE_BYTES`.
        data: the file's bytes as stored (still compressed for `.gz`), read elsewhere (a member of an archive);
            then `path` only names them: its suffixes choose the format, errors and the protein's name use it.
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
    limit = MAX_STRUCTURE_BYTES if max_bytes is None else max_bytes
    data = _read_bytes(path, limit) if data is None else _given_bytes(data, path, limit)
    if fmt == "pdb":
        atoms = _pdb_atoms(data, path)
    else:
        _refuse_control_bytes(data, path)
        atoms = _cif_atoms(data, path)
    arrays, chain_ids, num_dropped = _atoms_to_arrays(atoms, path, chain)
    return arrays, {"chain_ids": chain_ids, "name": protein_name(path), "num_dropped": num_dropped}


def read_atom_table(frame, name: str):
    """Like `read_structure_arrays`, for an ATOM3D atom table (`table`): the same rules as structure files
    (residues, altlocs, duplicate atoms, modified residues, dropped residues), ligands by the table's hetero flags.
    Errors name `name` and the table's row."""
    arrays, chain_ids, num_dropped = _atoms_to_arrays(table_atoms(frame, name), name, None)
    return arrays, {"chain_ids": chain_ids, "name": name, "num_dropped": num_dropped}


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
    path, chain, three_di = job
    try:
        arrays, meta = read_structure_arrays(path, chain)
        if three_di:
            from ..foldseek import add_states

            arrays = add_states(arrays)
        return (arrays, meta), None
    except StructureError as error:
        return None, str(error)
    except Exception as error:  # never let one file end a run of thousands
        return None, f"{path}: unexpected error while reading ({type(error).__name__}: {_first_line(error)})."


def load_structures(paths: Sequence[PathLike], chain: Optional[str] = None, workers: int = 0,
                    progress: bool = True, description: str = "parsing structures", three_di: bool = False
                    ) -> Tuple[List[Protein], List[Tuple[str, str]]]:
    """Read many structure files, skipping the bad ones.

    Args:
        paths: structure files.
        chain: chain filter applied to every file.
        workers: worker processes (0 = in this process).
        progress: show a tqdm progress bar.
        three_di: also compute each protein's Foldseek 3Di states (`Protein.three_di_state`) in the workers.
    Returns:
        (proteins in the order of `paths` minus the skipped ones, [(path, reason)] of the skipped files).
    """
    if three_di:  # a missing mini3di is one clear error here, not a reason to skip every file
        from ..foldseek import require_encoder

        require_encoder()
    jobs = [(str(p), chain, three_di) for p in paths]
    proteins, skipped = [], []

    def died(job, how):  # a file whose reading killed its worker process twice: skipped like any bad file
        return None, f"{job[0]}: the process reading it died ({how}), also when run again alone."

    for (path, _, _), (parsed, reason) in zip(jobs, ordered_map(_parse_for_pool, jobs, workers, progress, description,
                                                              unit="file", on_death=died)):
        if parsed is None:
            skipped.append((path, reason))
            logger.warning("skipped %s", reason)
        else:
            arrays, meta = parsed
            proteins.append(Protein.from_arrays(arrays, **meta))
    return proteins, skipped
