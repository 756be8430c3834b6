"""Reading PDB / mmCIF files into `Protein`s, fast and with clear errors.

gemmi parses the file (C++); one pass in Python over the residues keeps the amino acids of the first model
and places their heavy atoms in the atom14 layout. Rules:

* first model only; hydrogens, waters and ligands dropped (a free amino acid that gemmi's entity set-up marks
  as a non-polymer ligand is dropped too);
* alternate locations: per residue, the conformer (altloc letter) of highest occupancy is kept, the first
  one on ties; when a residue number holds two residue types (micro-heterogeneity), the one of highest CA
  occupancy is kept;
* modified residues map to their standard parent where the chemical component dictionary gives one
  (MSE -> MET, its SE atom to SD), else to unknown (type 20);
* residues without a CA atom are dropped and counted in `Protein.num_dropped`;
* residues keep the file's order, insertion codes included.
"""
from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from . import constants
from .parallel import ordered_map
from .protein import Protein

logger = logging.getLogger(__name__)

STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif")
PathLike = Union[str, os.PathLike]


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


def _first_model_only(data: bytes) -> bytes:
    """PDB text up to the end of the first model: gemmi need not parse the rest of an NMR ensemble."""
    end = data.find(b"\nENDMDL")
    if end < 0:
        return data
    line_end = data.find(b"\n", end + 1)
    return data if line_end < 0 else data[: line_end + 1]


def _read_gemmi(path: Path, fmt: str):
    import gemmi

    compressed = path.suffix.lower() == ".gz"
    try:
        if fmt == "cif" and not compressed:
            return gemmi.read_structure(str(path), format=gemmi.CoorFormat.Mmcif)
        # gemmi reads .gz itself, but a truncated stream must be an error, not a silently short protein
        if compressed:
            with gzip.open(path, "rb") as handle:
                data = handle.read()
        else:
            data = path.read_bytes()
        if fmt == "pdb":
            structure = gemmi.read_pdb_string(_first_model_only(data).decode("latin-1"))
        else:
            structure = gemmi.make_structure_from_block(gemmi.cif.read_string(data.decode("latin-1")).sole_block())
        structure.setup_entities()
    except (EOFError, gzip.BadGzipFile, OSError) as error:
        raise StructureError(f"{path}: the compressed file is damaged or truncated ({_first_line(error)}).") from None
    except UnicodeDecodeError:
        raise StructureError(f"{path}: the file is binary, not a {fmt.upper()} text file.") from None
    except Exception as error:  # gemmi raises RuntimeError / ValueError with its own wording
        raise StructureError(f"{path}: not a readable {'mmCIF' if fmt == 'cif' else 'PDB'} file "
                             f"({_first_line(error, path)}).") from None
    return structure


def _append_best_conformer(res, layout, base, slots, xyz):
    """Append the atoms of the residue's highest-occupancy conformer; return its CA atom (or None)."""
    occupancy = {}
    for atom in res:
        if atom.altloc != "\0" and atom.occ > occupancy.get(atom.altloc, -1.0):
            occupancy[atom.altloc] = atom.occ
    best = max(occupancy, key=occupancy.get)  # the first letter wins ties
    ca = None
    for atom in res:
        if atom.altloc not in ("\0", best):
            continue
        slot = layout.get(atom.name)
        if slot is None:
            slot = layout.get(constants.ATOM_ALIASES.get(atom.name))
            if slot is None:
                continue
        if slot == 1:
            ca = atom
        slots.append(base + slot)
        xyz.extend(atom.pos.tolist())
    return ca


def read_structure_arrays(path: PathLike, chain: Optional[str] = None):
    """Parse a structure file into numpy arrays (the fields of `Protein`) plus metadata.

    Kept separate from `load_structure` so that worker processes send plain arrays back.
    """
    path = Path(path)
    fmt = structure_format(path)
    if fmt is None:
        raise StructureError(f"{path}: unknown file type; expected one of "
                             f"{', '.join(STRUCTURE_SUFFIXES)} (optionally .gz).")
    if path.is_dir():
        raise StructureError(f"{path}: is a folder, not a structure file.")
    if not path.is_file():
        raise StructureError(f"{path}: no such file.")
    if path.stat().st_size == 0:
        raise StructureError(f"{path}: the file is empty.")
    structure = _read_gemmi(path, fmt)
    if len(structure) == 0:
        raise StructureError(f"{path}: the file holds no atoms (no model).")
    model = structure[0]
    if model.has_hydrogen():
        model.remove_hydrogens()  # in C++: NMR models carry as many hydrogens as heavy atoms
    import gemmi

    non_polymer = gemmi.EntityType.NonPolymer
    chain_ids: List[str] = []
    residue_types: List[int] = []
    numbers: List[int] = []
    icodes: List[int] = []
    chain_index: List[int] = []
    bfactors: List[float] = []
    slots: List[int] = []  # flat index residue * 14 + slot of every kept atom
    xyz: List[float] = []
    num_dropped = 0
    seen_chains = []
    add_slot, add_xyz = slots.append, xyz.extend
    aliases = constants.ATOM_ALIASES
    prev_key = None  # (chain, seqid) of the previous kept residue, for micro-heterogeneity
    prev_occ = 0.0
    prev_start = 0
    for ch in model:
        if chain is not None and ch.name != chain:
            continue
        seen_chains.append(ch.name)
        for res in ch:
            rtype = _TYPE_OF_RESIDUE.get(res.name, -1)
            if rtype == -1:
                rtype = residue_type_of(res.name)
            if rtype is None or res.entity_type == non_polymer:
                continue
            layout = constants.ATOM_SLOTS[rtype]
            slot_of = layout.get
            start = len(slots)
            base = len(residue_types) * constants.NUM_ATOM_SLOTS
            has_altloc = False
            ca = None
            # fast path: append every atom of the layout; residues with alternate locations are redone below
            for atom in res:
                slot = slot_of(atom.name)
                if slot is None:
                    slot = slot_of(aliases.get(atom.name))
                    if slot is None:
                        continue
                if atom.altloc != "\0":
                    has_altloc = True
                elif slot == 1:
                    ca = atom
                add_slot(base + slot)
                add_xyz(atom.pos.tolist())
            if has_altloc:
                del slots[start:], xyz[3 * start:]
                ca = _append_best_conformer(res, layout, base, slots, xyz)
            if ca is None:
                del slots[start:], xyz[3 * start:]
                num_dropped += 1
                continue
            seqid = res.seqid
            key = (ch.name, seqid.num, seqid.icode)
            if key == prev_key:  # micro-heterogeneity: two residue types at one position
                if ca.occ <= prev_occ:
                    del slots[start:], xyz[3 * start:]
                    continue
                # this one replaces the previous residue: drop that one and move our atoms into its rows
                last = len(residue_types) - 1
                del residue_types[last:], numbers[last:], icodes[last:], chain_index[last:], bfactors[last:]
                ours_slots = [s - constants.NUM_ATOM_SLOTS for s in slots[start:]]
                ours_xyz = xyz[3 * start:]
                del slots[prev_start:], xyz[3 * prev_start:]
                start = len(slots)
                slots.extend(ours_slots)
                xyz.extend(ours_xyz)
            if not chain_ids or chain_ids[-1] != ch.name:
                chain_ids.append(ch.name)
            prev_key, prev_occ, prev_start = key, ca.occ, start
            residue_types.append(rtype)
            numbers.append(seqid.num)
            icodes.append(ord(seqid.icode) if seqid.icode not in ("\0", " ") else 32)
            chain_index.append(len(chain_ids) - 1)
            bfactors.append(ca.b_iso)

    if not residue_types:
        if chain is not None and chain not in seen_chains:
            names = sorted({c.name for c in model})
            raise StructureError(f"{path}: no chain {chain!r} in the first model (chains: {', '.join(names) or 'none'}).")
        reason = "no amino-acid residue with a CA atom"
        raise StructureError(f"{path}: {reason}; is it a protein structure?")
    arrays = residue_arrays(str(path), slots, xyz, residue_types, numbers, icodes, chain_index, bfactors, chain_ids)
    meta = {"chain_ids": tuple(chain_ids), "name": protein_name(path), "num_dropped": num_dropped}
    return arrays, meta


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
    atom_pos[index] = np.asarray(xyz, dtype=np.float32).reshape(-1, 3)
    atom_mask[index] = True
    if not np.isfinite(atom_pos).all():
        bad = int(np.flatnonzero(~np.isfinite(atom_pos).all(-1))[0]) // constants.NUM_ATOM_SLOTS
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
    name = Path(path).name
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
    for (path, _), (parsed, reason) in zip(jobs, ordered_map(_parse_for_pool, jobs, workers, progress, description,
                                                              unit="file")):
        if parsed is None:
            skipped.append((path, reason))
            logger.warning("skipped %s", reason)
        else:
            arrays, meta = parsed
            proteins.append(Protein.from_arrays(arrays, **meta))
    return proteins, skipped
