"""`FoldCompDB`: a FoldComp database (AlphaFold DB, ESM Atlas, or one written by `esm-gearnet pack`) read entry by
entry, never cached: the dataset for pre-training and embedding at AlphaFold DB scale.

The database's index is held as compact arrays (`data.io.foldcomp.Entries`, 35 bytes an entry) and its data file
memory-mapped; an entry is decoded into a `Protein` when it is asked for, in the DataLoader's worker processes. A
training run streams it (`streamed = True`): the engine draws each epoch's order as a seeded bijection over the
entries, in windows sorted by length (`engine.stream`), never as a list of the entries. `held_out` entries, a
fixed seeded sample, are left out of training and give a validation loss (`split()`).

The official databases (`DATABASES`) download from the address the `foldcomp` package uses
(`download_database`, resumable).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ...registry import register
from ..io.foldcomp import Database, EntryError, database_files
from ..protein import Protein

logger = logging.getLogger("esm_gearnet")

BASE_URL = "https://opendata.mmseqs.org/foldcomp"  # where foldcomp.setup downloads from
DATABASES = {  # name: what it holds (entries, size), from the FoldComp and AlphaFold DB documentation
    "afdb_swissprot_v4": "AlphaFold DB v4, Swiss-Prot (542 k entries, 2.5 GB)",
    "afdb_rep_v4": "AlphaFold DB v4, representatives of the Foldseek clusters (2.27 M entries, 9.6 GB)",
    "afdb_rep_dark_v4": "AlphaFold DB v4, dark clusters' representatives (2.2 M entries)",
    "afdb_uniprot_v4": "AlphaFold DB v4, all of UniProt (214 M entries, 1 TB)",
    "esmatlas": "ESM Atlas v0, high-quality (36 M entries)",
    "esmatlas_v2023_02": "ESM Atlas v2023_02, high-quality",
    "highquality_clust30": "ESM Atlas, high-quality clustered at 30 % identity (37 M entries)",
}
SUFFIXES = ("", ".index", ".dbtype", ".lookup", ".source")  # the files foldcomp.setup fetches


def download_database(name: str, folder) -> Path:
    """Downloads the official FoldComp database `name` (`DATABASES`) into `folder` and returns its path; files
    already there are kept, interrupted downloads continued. Processes that ask at once (the ranks of a run) take
    turns under a file lock: the first downloads, the others find the files there."""
    from .download import download

    if name not in DATABASES:
        raise ValueError(f"no FoldComp database named {name!r}; the official ones are {', '.join(DATABASES)}.")
    from filelock import FileLock

    folder = Path(os.path.expanduser(str(folder)))
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / f".{name}.download.lock")):  # the ranks of a run: one downloads, the others wait
        for suffix in SUFFIXES:
            download(f"{BASE_URL}/{name}{suffix}", folder, resume=True)
    return folder / name


def _names(value) -> Optional[List[str]]:
    """A list of names or ids, or a text file of them (one a line)."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        path = Path(os.path.expanduser(str(value)))
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such list file.")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [str(v) for v in value]


@register
class FoldCompDB(torch.utils.data.Dataset):
    """The entries of a FoldComp database; items are {"graph": Protein}, its name the entry's.

    Args:
        path: the database (the path of its data file, `DB`, beside `DB.index`, `DB.lookup`, `DB.dbtype`); a name
            of `DATABASES` with `download: true` fetches it into `path`'s folder first.
        ids: keep only these entries, by key (a list, or a text file with one a line); the subset keeps the
            database's order.
        names: keep only these entries, by name in the lookup file (a list or a text file), likewise.
        transform: applied to each item (crops, views), as for the other datasets.
        three_di: compute each protein's Foldseek 3Di states (for models that read them).
        held_out: this many entries (a fixed sample, drawn with `seed`) are left out of training and form the
            validation split: a validation loss per save.
        seed: the held-out sample's seed.
        download: fetch the official database `Path(path).name` when its files are missing.
        max_skipped: the share of entries that may fail to decode before a run stops (one sentence saying so).
    """

    streamed = True

    def __init__(self, path, ids=None, names=None, transform=None, three_di: bool = False, held_out: int = 0,
                 seed: int = 0, download: bool = False, max_skipped: float = 0.01,
                 atom_feature: None = None, bond_feature: None = None, residue_feature: str = "default"):
        path = Path(os.path.expanduser(str(path)))
        # each file appears whole (renamed when complete); a rank that finds one missing waits for the download's
        # lock, held by the rank downloading
        if download and not all(p.is_file() for p in database_files(path)):
            path = download_database(path.name, path.parent)
        self.database = Database(path)
        self.path, self.transform, self.three_di = str(path), transform, three_di
        self.max_skipped = max_skipped
        if three_di:
            from ..foldseek import require_encoder

            require_encoder()
        if ids is not None and names is not None:
            raise ValueError("FoldCompDB: give ids or names, not both.")
        if ids is not None:
            keys = _names(ids)
            try:
                self.positions = np.unique(self.database.entries.positions_of_keys([int(k) for k in keys]))
            except ValueError as error:
                if "invalid literal" in str(error):
                    raise ValueError(f"FoldCompDB ids: keys are numbers ({error}); use names for entry names.") \
                        from None
                raise
        elif names is not None:
            self.positions = self.database.entries.positions_of_names(_names(names))
        else:
            self.positions = None  # every entry, position i is entry i: no array of 214 M positions
        self.num_entries = len(self.database) if self.positions is None else len(self.positions)
        if not 0 <= held_out < self.num_entries:
            raise ValueError(f"FoldCompDB held_out: {held_out} must be at least 0 and below the "
                             f"{self.num_entries} entries of {self.path}.")
        self.held_out, self.seed = held_out, seed
        problems = int((self.database.entries.problem > 0).sum())
        if problems:
            logger.warning("FoldComp database %s: %d of its %d entries cannot be read (the index and the files "
                           "disagree); they are skipped when met, each named in the log", self.path, problems,
                           len(self.database))
        if self.database.entries.unindexed:
            logger.warning("FoldComp database %s: %d names of its lookup file have no entry in its index",
                           self.path, self.database.entries.unindexed)

    # ---- the entries ------------------------------------------------------------------------------------------
    def entry(self, i: Union[int, np.ndarray]):
        """The database position(s) of this dataset's entry `i`."""
        return i if self.positions is None else self.positions[i]

    def __len__(self) -> int:
        return self.num_entries

    def name(self, i: int) -> str:
        return self.database.name(int(self.entry(i)))

    def lengths(self, indices: np.ndarray) -> np.ndarray:
        """[len(indices)] residues of these entries, from the records' headers (nothing decoded)."""
        return self.database.num_residues(self.entry(np.asarray(indices, np.int64)))

    def protein(self, i: int) -> Protein:
        """Entry `i` as a `Protein` (3Di states added when asked for). Raises EntryError."""
        arrays, meta = self.database.arrays(int(self.entry(i)))
        if self.three_di:
            from ..foldseek import add_states

            arrays = add_states(arrays)
        return Protein.from_arrays(arrays, **meta)

    def item(self, i: int, seed: Optional[int] = None) -> Dict:
        """The transformed item of entry `i`; with `seed`, the transform's random draws (crops) are seeded by it,
        so an item is the same whichever worker or rank makes it. Raises EntryError."""
        item = {"graph": self.protein(i)}
        if self.transform is None:
            return item
        if seed is None:
            return self.transform(item)
        # the CPU generator alone, which the transforms draw from and which is restored after: `torch.manual_seed`
        # also seeds every accelerator's generators (never restored), and before CUDA is initialised it records a
        # formatted stack each time for its lazy seeding (3 ms an item on 2 busy cores, a fifth of the item)
        generator = torch.random.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.transform(item)
        finally:
            generator.set_state(state)

    def __getitem__(self, i: int) -> Dict:
        return self.item(i)

    # ---- splits ---------------------------------------------------------------------------------------------
    def held_out_indices(self) -> np.ndarray:
        """The held-out entries: the last `held_out` positions of a fixed permutation drawn with `seed`, less those
        that do not decode (each named in the log: an evaluation set is read whole, every time)."""
        from ..permutation import Permutation

        order = Permutation(self.num_entries, self.seed)
        chosen = np.sort(order(np.arange(self.num_entries - self.held_out, self.num_entries)))
        readable = []
        for i in chosen.tolist():
            try:
                self.database.arrays(int(self.entry(i)))
                readable.append(i)
            except EntryError as error:
                logger.warning("left out of the held-out sample: %s", error)
        return np.array(readable, np.int64)

    def split(self) -> Sequence:
        """(training entries, held-out entries, no test): the training part is streamed; the held-out sample is
        an ordinary dataset (evaluated like a validation split)."""
        if not self.held_out:
            return [self, Subset(self, np.zeros(0, np.int64)), Subset(self, np.zeros(0, np.int64))]
        return [Training(self), Subset(self, self.held_out_indices()), Subset(self, np.zeros(0, np.int64))]

    def __repr__(self) -> str:
        return f"FoldCompDB({self.path}, entries={self.num_entries}, held_out={self.held_out})"


@register
class DemoFoldCompDB(FoldCompDB):
    """The demo's generated proteins (`DemoFolds`) written once as a FoldComp database at `path`, then read like
    any database: pre-training from a stream, offline. The ranks of a run write it once (a file lock).

    Args:
        path: the database to write (when absent) and read; num_protein, seed: as `DemoFolds`;
        other arguments: as `FoldCompDB`.
    """

    def __init__(self, path, num_protein: int = 240, seed: int = 1, **options):
        from filelock import FileLock

        from ..io.foldcomp import encode, is_database, write_database
        from .demo import DemoFolds

        path = Path(os.path.expanduser(str(path)))
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.lock"):
            if not is_database(path):
                proteins = DemoFolds(num_protein=num_protein, seed=seed).proteins
                write_database(path, ((p.name, encode({k: v.numpy() for k, v in p.residue_fields().items()},
                                                      np.arange(p.num_residue), "A", p.name)) for p in proteins))
        super().__init__(path, **options)


class Training(torch.utils.data.Dataset):
    """The entries of a `FoldCompDB` outside its held-out sample, streamed like the database: entry `i` of this
    view is `i` mapped through the dataset's fixed permutation (no list of the entries is kept)."""

    streamed = True

    def __init__(self, dataset: FoldCompDB):
        from ..permutation import Permutation

        self.dataset = dataset
        self.order = Permutation(dataset.num_entries, dataset.seed)
        self.num_entries = dataset.num_entries - dataset.held_out
        self.max_skipped, self.path = dataset.max_skipped, dataset.path

    def __len__(self) -> int:
        return self.num_entries

    def _map(self, i):
        return self.order(np.atleast_1d(np.asarray(i, np.int64)))

    def name(self, i: int) -> str:
        return self.dataset.name(int(self._map(i)[0]))

    def lengths(self, indices: np.ndarray) -> np.ndarray:
        return self.dataset.lengths(self._map(indices))

    def item(self, i: int, seed: Optional[int] = None) -> Dict:
        return self.dataset.item(int(self._map(i)[0]), seed)

    def __getitem__(self, i: int) -> Dict:
        return self.item(i)


class Subset(torch.utils.data.Dataset):
    """Some entries of a `FoldCompDB` as an ordinary (map-style) dataset: the held-out sample, evaluated in
    order. A bad entry raises `EntryError` here (an evaluation set must be readable)."""

    def __init__(self, dataset: FoldCompDB, indices: np.ndarray):
        self.dataset, self.indices = dataset, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Dict:
        return self.dataset.item(int(self.indices[i]))


__all__ = ["BASE_URL", "DATABASES", "DemoFoldCompDB", "EntryError", "FoldCompDB", "download_database"]
