"""FoldComp databases of the real structures, for the benchmarks that stream them (`stream.py`, `train_step.py
--levers stream`).

`real_records` compresses each real structure of ../shared/data and keeps those FoldComp holds faithfully;
`write_repeated` writes a database of any size from them: the data file holds each distinct record once and the
index and lookup files (the official layout, `esm_gearnet.data.io.foldcomp`) list them again and again under
new keys and names, so a 1 M-entry database takes a few MB of data and 50 MB of index.
"""
import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks._common import real_structure_files
from esm_gearnet.data.io import load_structure
from esm_gearnet.data.io.errors import StructureError
from esm_gearnet.data.io.foldcomp import decode, write_database
from esm_gearnet.data.synthetic import pdb_text

MAX_CA_ERROR = 1.0  # Å: FoldComp keeps no chain break; a structure with one decodes tens of Å off, and is left out
_COMPRESS = "import foldcomp, sys; sys.stdout.buffer.write(foldcomp.compress(sys.argv[1], sys.stdin.read()))"


def real_records(min_length=0, files=None):
    """[(name, record, protein)] of the real structures (`files`, default all) of at least `min_length` residues
    that FoldComp keeps: each compressed from the PDB text of `load_structure(file)` in a process of its own
    (`foldcomp.compress` crashes on some inputs), kept when every decoded Cα lies within MAX_CA_ERROR of the
    file's."""
    kept = []
    for path in real_structure_files() if files is None else files:
        try:
            protein = load_structure(path)
        except StructureError:
            continue
        if protein.num_residue < min_length:
            continue
        name = path.name.split(".")[0]
        done = subprocess.run([sys.executable, "-c", _COMPRESS, name], input=pdb_text(protein).encode(),
                              capture_output=True)
        if done.returncode != 0:
            continue
        arrays, _ = decode(done.stdout, name, name)
        if len(arrays["atom_pos"]) != protein.num_residue:
            continue
        error = np.linalg.norm(arrays["atom_pos"][:, 1] - protein.pos.numpy(), axis=-1).max()
        if error < MAX_CA_ERROR:
            kept.append((name, done.stdout, protein))
    return kept


def write_repeated(path, records, entries):
    """A FoldComp database at `path` with `entries` entries: entry k (key k, name `NAME-k`) is record
    k mod len(records), each record stored once in the data file."""
    write_database(path, [(name, record) for name, record, _ in records])
    index = [line.split("\t") for line in Path(f"{path}.index").read_text().splitlines()]
    offsets = [int(offset) for _, offset, _ in index]
    sizes = [int(size) for _, _, size in index]
    names = [name for name, _, _ in records]
    count = len(records)
    with open(f"{path}.index", "w") as out_index, open(f"{path}.lookup", "w") as out_lookup:
        for first in range(0, entries, 1 << 16):  # in pieces: bounded memory for any size
            keys = range(first, min(first + (1 << 16), entries))
            out_index.write("".join(f"{k}\t{offsets[k % count]}\t{sizes[k % count]}\n" for k in keys))
            out_lookup.write("".join(f"{k}\t{names[k % count]}-{k}\t0\n" for k in keys))
    return Path(path)


def write_gz_files(folder, records):
    """[path] of one `.pdb.gz` per record, the PDB text its record was compressed from."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, _, protein in records:
        path = folder / f"{name}.pdb.gz"
        path.write_bytes(gzip.compress(pdb_text(protein).encode()))
        paths.append(path)
    return paths
