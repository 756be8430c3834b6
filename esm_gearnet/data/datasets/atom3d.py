"""ATOM3D datasets read straight from their LMDB files: `PSRDataset` (model quality) and `MSPDataset` (mutation
stability), plus the reader and writer of the format.

An ATOM3D dataset is an LMDB folder. Key `num_examples` holds the item count, `serialization_format` is json
or msgpack, and `id_to_idx` maps item ids to indices. Keys `b"0"`, `b"1"`, ... hold gzip-compressed items. Each
item is a dict whose atom tables ("atoms", "original_atoms", "mutated_atoms") are pandas DataFrames stored
`orient="split"`: {"columns": [...], "index": [...], "data": [[row], ...]}. The columns are ensemble, subunit,
structure, model, chain, hetero, insertion_code, residue, segid, resname, altloc, occupancy, bfactor, x, y, z,
element, name, fullname and serial_number. pandas is not needed to read them.

Bounds, checked before anything is inflated or listed: `num_examples` may not declare more items than the LMDB
holds records, and an item inflating past `MAX_ITEM_BYTES` is refused (that item is skipped, the others read).

The `atom3d` package is not used: it pins old libraries and does not install from wheels on Python 3.11.
"""
from __future__ import annotations

import ast
import gzip
import json
import logging
import os
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Literal, Tuple

import numpy as np
import torch

from ...errors import InputError
from ...registry import register
from ..io import StructureError, read_atom_table
from ..parallel import ordered_map
from ..protein import Protein
from .base import StructureDataset
from ..foldseek import add_states, require_encoder
from .cache import PackedProteins, cache_key, cached, three_di_option, write_skipped
from .download import download, extract

logger = logging.getLogger("esm_gearnet")
SPLITS = ("train", "val", "test")
# One item inflated: the largest ATOM3D PSR/MSP items are a few MiB of JSON; past this a record is refused before
# it is inflated further (a gzip bomb of 1 MiB inflates to GiBs). Raise it for a genuine larger item.
MAX_ITEM_BYTES = 256 << 20


# ---- the container ----------------------------------------------------------------------------------------
class LMDBError(InputError):
    """An ATOM3D LMDB that cannot be read; the message names its path."""


@contextmanager
def _reading(path: Path, what: str):
    """Any error of the lmdb library, the decompression or the decoding while reading `what` of the LMDB at
    `path`, raised again as one LMDBError sentence naming the path."""
    try:
        yield
    except (LMDBError, FileNotFoundError, ImportError):
        raise
    except Exception as error:  # noqa: BLE001 - lmdb, gzip, zlib, json and msgpack each raise their own
        text = str(error).splitlines()[0] if str(error) else ""
        raise LMDBError(f"{path}: {what} cannot be read ({type(error).__name__}{': ' + text if text else ''}); "
                        "the LMDB is damaged or not ATOM3D's: download it again.") from error


def _open(path):
    import lmdb

    path = Path(path)
    if not (path / "data.mdb").is_file():
        raise FileNotFoundError(f"{path}: no ATOM3D LMDB here (data.mdb is missing); check the dataset path.")
    return lmdb.open(str(path), max_readers=1, readonly=True, lock=False, readahead=False, meminit=False)


def _deserialize(data: bytes, fmt: str):
    if fmt == "json":
        return json.loads(data)
    import msgpack

    return msgpack.unpackb(data, raw=False)


def _declared_count(path: Path, raw: bytes, entries: int) -> int:
    """The item count `num_examples` declares, which must be a whole number of records the LMDB holds: a 12 KiB
    file declaring millions of items would otherwise make as many jobs and skipped rows."""
    try:
        count = int(raw)
    except ValueError:
        raise LMDBError(f"{path}: num_examples is {raw[:40]!r}, not a whole number; the LMDB is damaged or not "
                        "ATOM3D's: download it again.") from None
    if not 0 <= count <= entries:
        raise LMDBError(f"{path}: num_examples declares {count} items, but the LMDB holds {entries} records in all; "
                        "it is damaged or not ATOM3D's: download it again.")
    return count


def _inflate(data: bytes, path: Path, index: int) -> bytes:
    """A gzip record inflated, refused once it passes `MAX_ITEM_BYTES` (never more is held in memory)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip header and trailer
    text = inflater.decompress(data, MAX_ITEM_BYTES + 1)
    if len(text) > MAX_ITEM_BYTES:
        raise LMDBError(f"{path}: item {index} inflates past {MAX_ITEM_BYTES >> 20} MiB from {len(data)} bytes "
                        "(a decompression bomb, or raise esm_gearnet.data.datasets.atom3d.MAX_ITEM_BYTES if the item "
                        "is genuine); it was not inflated further.")
    if not inflater.eof:
        raise LMDBError(f"{path}: item {index} is truncated (its gzip stream ends early); the LMDB is damaged: "
                        "download it again.")
    return text


class LMDBFile:
    """Read-only view of one ATOM3D LMDB folder: `len()`, `[i]` -> item dict, `ids`."""

    def __init__(self, path):
        self.path = Path(os.path.expanduser(str(path)))
        self._env = None
        with _reading(self.path, "the header (num_examples, serialization_format, id_to_idx)"), \
                _open(self.path).begin() as txn:
            count = txn.get(b"num_examples")
            if count is None:
                raise LMDBError(f"{self.path}: not an ATOM3D LMDB (no num_examples key).")
            self.length = _declared_count(self.path, count, txn.stat()["entries"])
            self.format = (txn.get(b"serialization_format") or b"json").decode()
            if self.format not in ("json", "msgpack"):
                raise LMDBError(f"{self.path}: serialization format {self.format!r} is not read here (only json "
                                 "and msgpack; pickled LMDBs can run code when loaded): convert it with atom3d's "
                                 "make_lmdb_dataset(..., serialization_format='json').")
            raw = txn.get(b"id_to_idx")
            self.ids = None
            if raw is not None:
                id_to_idx = _deserialize(raw, self.format)
                self.ids = [None] * self.length
                for name, index in id_to_idx.items():
                    self.ids[int(index)] = name

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"{self.path}: index {index} out of range (0..{self.length - 1}).")
        with _reading(self.path, f"item {index}"):
            if self._env is None:  # opened lazily: an open LMDB environment must not cross a fork
                self._env = _open(self.path)
            with self._env.begin() as txn:
                data = txn.get(str(index).encode())
            if data is None:
                raise LMDBError(f"{self.path}: item {index} is missing.")
            item = _deserialize(_inflate(data, self.path, index), self.format)
            if not isinstance(item, dict):
                raise LMDBError(f"{self.path}: item {index} is a {type(item).__name__}, not a dict.")
        item.setdefault("id", str(index))
        item.setdefault("file_path", str(self.path))
        return item

    def __getstate__(self):
        return {**self.__dict__, "_env": None}


def write_lmdb(path, items: Iterable[Dict[str, Any]], serialization_format: str = "json") -> int:
    """Write items in ATOM3D's format, as its `make_lmdb_dataset` does (records gzip level 6, `types` added).

    Atom tables are given in DataFrame split form {"columns", "index", "data"} and typed as DataFrames, so
    that ATOM3D's own reader rebuilds them. Returns the number of items written.
    """
    import lmdb

    frame_type = "<class 'pandas.core.frame.DataFrame'>"

    def encode(obj) -> bytes:
        if serialization_format == "json":
            return json.dumps(obj).encode()
        if serialization_format == "msgpack":
            import msgpack

            return msgpack.packb(obj, use_bin_type=True)
        raise ValueError(f"write_lmdb: serialization_format must be json or msgpack, got {serialization_format!r}.")

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 36)
    id_to_idx = {}
    count = 0
    with env.begin(write=True) as txn:
        for count, item in enumerate(items, 1):
            item = dict(item)
            types = {k: frame_type if isinstance(v, dict) and set(v) == {"columns", "index", "data"}
                     else str(type(v)) for k, v in item.items()}
            types["types"] = str(dict)
            item["types"] = types
            txn.put(str(count - 1).encode(), gzip.compress(encode(item), compresslevel=6))
            id_to_idx[item["id"]] = count - 1
        txn.put(b"num_examples", str(count).encode())
        txn.put(b"serialization_format", serialization_format.encode())
        txn.put(b"id_to_idx", encode(id_to_idx))
    env.close()
    return count


# ---- atom table -> Protein ----------------------------------------------------------------------------------
# DEVIATION: ATOM3D items were read here by rules of their own (the first altloc of each atom won, repeated atoms
# were kept silently, a residue was every run of rows). They are now read by the one atom -> residue reader of
# structure files (`data.io.read_atom_table`: the altloc of highest occupancy per residue, repeated atoms refused,
# residues grouped as gemmi groups them), so a PSR/MSP item and the same atoms as a PDB file give equal proteins,
# as the README states. An item that reader refuses is reported and skipped; caches of the old rules are rebuilt
# (`READER` in the cache key).
READER = 2


def atoms_to_arrays(frame: Dict[str, Any], name: str) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """The residue-level arrays of `Protein` (and its metadata) from an ATOM3D atom table (split-form dict), by
    the rules of structure files (`data.io.read_atom_table`).

    Raises:
        StructureError: one sentence naming `name` (and the table's row).
    """
    return read_atom_table(frame, name)


def atoms_to_protein(frame: Dict[str, Any], name: str = "") -> Protein:
    arrays, meta = atoms_to_arrays(frame, name)
    return Protein.from_arrays(arrays, **meta)


# ---- datasets -----------------------------------------------------------------------------------------------
_OPEN_FILES: Dict[str, LMDBFile] = {}


def _parse_item(job):
    """(record, None) or (None, reason) for item `index` of an LMDB, in a worker process; with `three_di`, the
    proteins' arrays carry their 3Di states."""
    path, index, kind, three_di = job
    where = f"{path}[{index}]"
    try:
        if path not in _OPEN_FILES:
            _OPEN_FILES[path] = LMDBFile(path)
        item = _OPEN_FILES[path][index]
        name = str(item.get("id", index))
        def parsed(frame, what):
            arrays, meta = atoms_to_arrays(frame, what)
            return (add_states(arrays) if three_di else arrays), meta

        if kind == "psr":
            return {"id": name, "proteins": [parsed(item["atoms"], name)],
                    "score": {k: float(v) for k, v in item["scores"].items()
                                                                 if isinstance(v, (int, float))}}, None
        wild = parsed(item["original_atoms"], name + " (original)")
        mutant = parsed(item["mutated_atoms"], name + " (mutated)")
        if len(wild[0]["residue_type"]) != len(mutant[0]["residue_type"]):
            raise StructureError(f"the original and mutated structures have {len(wild[0]['residue_type'])} and "
                                 f"{len(mutant[0]['residue_type'])} residues; a pair needs the same residues")
        label = item["label"]
        return {"id": name, "proteins": [wild, mutant], "label": float(str(label) == "1")}, None
    except LMDBError as error:
        return None, str(error)
    except KeyError as error:
        return None, f"{where}: the item has no field {error}."
    except Exception as error:  # noqa: BLE001 - one bad item never ends the preprocessing
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        return None, f"{where}: {text}"


def _died(job, how: str):
    """The (None, reason) of an item whose process died, also when run again alone (`ordered_map`'s on_death)."""
    path, index = job[:2]
    return None, f"{path}[{index}]: the process reading this item died ({how}), also when retried alone."


class _Atom3D(StructureDataset):
    url: str
    md5: str
    dir_name: str
    split_dir: str
    kind: str

    def _load(self, path, workers: int, progress: bool, three_di: bool = False) -> Dict:
        root = Path(os.path.expanduser(str(path))) / self.dir_name
        lmdbs = [root / self.split_dir / "data" / s for s in SPLITS]
        if not all((p / "data.mdb").is_file() for p in lmdbs):
            extract(download(self.url, root, self.md5), root)
        cache_file = root / f"{self.dir_name}.cache.pt"

        def build():
            if three_di:  # a missing mini3di is one clear error here, not a reason to skip every item
                require_encoder()
            jobs = [(str(p), i, self.kind, three_di) for p in lmdbs for i in range(len(LMDBFile(p)))]
            records, skipped, split = [], [], []
            for (lmdb_path, *_), (record, reason) in zip(jobs, ordered_map(
                    _parse_item, jobs, workers, progress, f"reading {self.dir_name}", on_death=_died)):
                if record is None:
                    skipped.append((f"{lmdb_path}", reason))
                    logger.warning("skipped %s", reason)
                else:
                    records.append(record)
                    split.append(SPLITS.index(Path(lmdb_path).name))
            ids = [r["id"] for r in records]
            packs = [PackedProteins.pack([Protein.from_arrays(arrays, **meta) for arrays, meta in
                                          (r["proteins"][k] for r in records)], ids, three_di=three_di).state()
                     for k in range(1 if self.kind == "psr" else 2)]
            write_skipped(cache_file, skipped, len(jobs), what="LMDB items")
            for k, lmdb_path in enumerate(lmdbs):  # an LMDB none of whose items reads is not a smaller dataset
                reasons = [reason for where, reason in skipped if where == str(lmdb_path)]
                if reasons and k not in split:
                    raise LMDBError(f"{lmdb_path}: none of its {len(reasons)} items could be read (first: "
                                    f"{' '.join(reasons[:2])}); the LMDB is damaged or not {self.dir_name}'s: "
                                    "download it again.")
            return {"packs": packs, "records": [{k: v for k, v in r.items() if k != "proteins"} for r in records],
                    "split": split, "skipped": [list(s) for s in skipped]}

        def check(state):
            packs = state["packs"]
            if len(packs) != (1 if self.kind == "psr" else 2):
                raise ValueError(f"holds {len(packs)} packs of proteins")
            for pack in packs:
                PackedProteins.check(pack, three_di=three_di)
                if not len(pack["lengths"]) == len(state["records"]) == len(state["split"]):
                    raise ValueError(f"holds {len(pack['lengths'])} proteins for {len(state['records'])} records "
                                     f"and {len(state['split'])} split labels")
            if not isinstance(state["skipped"], list):
                raise ValueError("lacks the list of skipped items")

        key = cache_key([p / "data.mdb" for p in lmdbs], {"kind": self.kind, "reader": READER,
                                                             **three_di_option(three_di)})
        state = cached(cache_file, key, build, check)
        self.skipped = [tuple(s) for s in state["skipped"]]
        self.split_indices = [[i for i, s in enumerate(state["split"]) if s == k] for k in range(len(SPLITS))]
        return state


@register
class PSRDataset(_Atom3D):
    """ATOM3D Protein Structure Ranking, split by year: decoy models of CASP targets, regression on GDT_TS.

    Items are {"graph": Protein, "targets": [1] gdt_ts, "target_id": CASP target, "decoy": model name}; the
    target id lets PropertyPrediction report the per-target Spearman correlation.

    Args:
        path: folder holding (or receiving) `PSR-split-by-year/split-by-year/data/{train,val,test}`.
        transform: applied to every item; workers: processes for the first preprocessing.
        three_di: compute every protein's Foldseek 3Di states once, in preprocessing, and keep them in the cache
            (`Protein.three_di_state`; see `esm_gearnet.data.three_di`).
    """
    url = "https://zenodo.org/record/4915648/files/PSR-split-by-year.tar.gz"
    md5 = "8647b9d10d0a79dff81d1d83c825e74c"
    dir_name, split_dir, kind = "PSR-split-by-year", "split-by-year", "psr"
    tasks = ["gdt_ts"]

    def __init__(self, path, transform=None, workers: int = 2, progress: bool = True, verbose: int = 0,
                 atom_feature: None = None, bond_feature: None = None,
                 residue_feature: Literal["default"] = "default", three_di: bool = False):
        state = self._load(path, workers, progress, three_di)
        self.proteins = PackedProteins(state["packs"][0])
        ids = [ast.literal_eval(r["id"]) if r["id"].startswith("(") else ("", r["id"]) for r in state["records"]]
        self.target_ids = [str(target) for target, _ in ids]
        self.decoys = [str(decoy) for _, decoy in ids]
        self.scores = [r["score"] for r in state["records"]]
        self.targets = torch.tensor([[s.get("gdt_ts", float("nan"))] for s in self.scores],
                                    dtype=torch.float32).reshape(-1, 1)
        self.transform = transform

    def item(self, index: int) -> Dict:
        return {"graph": self.proteins[index], "targets": self.targets[index],
                "target_id": self.target_ids[index], "decoy": self.decoys[index]}


@register
class MSPDataset(_Atom3D):
    """ATOM3D Mutation Stability Prediction, split at 30 % sequence identity: does a point mutation make the
    complex bind better? Items are {"graph1": wild type, "graph2": mutant, "targets": [1] label, "mutation"}.

    Args:
        path: folder holding (or receiving)
            `MSP-split-by-sequence-identity-30/split-by-sequence-identity-30/data/{train,val,test}`.
        transform, workers, three_di: as for PSRDataset.
    """
    url = "https://zenodo.org/record/4962515/files/MSP-split-by-sequence-identity-30.tar.gz"
    md5 = "6628e8efac12648d3b78bb0fc0d8860c"
    dir_name, split_dir, kind = "MSP-split-by-sequence-identity-30", "split-by-sequence-identity-30", "msp"
    tasks = ["label"]

    def __init__(self, path, transform=None, workers: int = 2, progress: bool = True, verbose: int = 0,
                 atom_feature: None = None, bond_feature: None = None,
                 residue_feature: Literal["default"] = "default", three_di: bool = False):
        state = self._load(path, workers, progress, three_di)
        self.proteins = PackedProteins(state["packs"][0])
        self.mutants = PackedProteins(state["packs"][1])
        self.ids = [r["id"] for r in state["records"]]
        self.targets = torch.tensor([[r["label"]] for r in state["records"]], dtype=torch.float32).reshape(-1, 1)
        self.transform = transform

    def item(self, index: int) -> Dict:
        return {"graph1": self.proteins[index], "graph2": self.mutants[index], "targets": self.targets[index],
                "mutation": self.ids[index].split("_")[-1]}
