"""The sharded output of `embed` (a FoldComp database, or any input under `torchrun`): a folder of shards, each
one range of the input's entries written whole and atomically, read back as one table whose arrays are
memory-mapped shard by shard (`ShardedEmbeddings`): 214 M proteins × 1280 floats (1 TB) is never loaded.

==================  ===============================================================================================
file                content
==================  ===============================================================================================
`manifest.json`     written first: `layout`, `format` ("npz" or "h5"), `shard_size` K, `entries` N (of the
                    input), `source` (what the input was: a database's path and size, or the digest of the file
                    list) and `options` (`encoding.embedding_options`: weights, config, per-residue)
`shard-00000.npz`   shard s holds the input's entries [s·K, min((s+1)·K, N)) (a fixed range whatever the number of
`shard-00001.npz`   ranks: a resume with another number of ranks finds the same shards); `.h5` with `--format h5`
`index.json`        written last, once every shard is: the manifest's keys, `rows` and `skipped` entries in all,
                    `unusable` inputs (named in skipped.tsv: a missing file, which no shard holds) and `shards`:
                    [{"file", "entries": [start, end], "rows", "skipped"}] in order. Its presence says the output
                    is complete; without it the shards present are read as a partial output
`skipped.tsv`       the entries that could not be read, `name<TAB>reason` (`writing.write_skipped`); none: absent
==================  ===============================================================================================

One shard (P rows: the range's entries that were read, in input order; D channels; R residues in all):

===================  ==================  ======================================================================
array                shape, dtype        meaning
===================  ==================  ======================================================================
`names`              [P] bytes (UTF-8)   each row's entry: its name in the database, or its input file's path
`embedding`          [P, D] float32      the per-protein embedding
`residue_embedding`  [R, D] float32      with --per-residue: every protein's residues, one after another
`residue_offsets`    [P + 1] int64       with --per-residue: protein p's residues are rows offsets[p]:offsets[p+1]
`entries`            [2] int64           the shard's entry range [start, end) of the input
`skipped`            [] text             JSON [[name, reason], ...]: the range's entries that could not be read
`options`            [] text             `encoding.embedding_options` of the run that wrote it
===================  ==================  ======================================================================

Why these files: a shard is one file, so `writing.replacing` writes it atomically (a killed writer loses only the
shard it was writing, and a shard that exists is whole); and both formats keep each array contiguous and
uncompressed in that file, so it is memory-mapped in place. `.npz` is written by `np.savez` (stored, not deflated:
`np.load` reads it as usual, and `np.load` cannot memory-map an .npz, so the reader here finds each member's
bytes through the zip headers); `.h5` datasets are contiguous (h5py's default without chunks or compression)
and mapped at `Dataset.id.get_offset()`. A folder of .npy files per shard would map as easily but could not be
replaced in one rename.
"""
from __future__ import annotations

import json
import re
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import writing

LAYOUT = "esm_gearnet sharded embeddings 1"
SHARD_FORMATS = ("npz", "h5")
MANIFEST, INDEX, SKIPPED = "manifest.json", "index.json", "skipped.tsv"
_SHARD = re.compile(r"shard-(\d{5,})\.(npz|h5)")
_OPEN_SHARDS = 64  # shards whose arrays stay mapped at once (each mapping holds a file descriptor)


def shard_path(folder, shard: int, fmt: str) -> Path:
    """OUT/shard-00042.npz: the file of shard `shard`."""
    return Path(folder) / f"shard-{shard:05d}.{fmt}"


def shard_files(folder, fmt: Optional[str] = None) -> Dict[int, Path]:
    """{shard number: file} of the shards present in `folder` (of format `fmt`, or any)."""
    found = {}
    for path in Path(folder).iterdir():
        match = _SHARD.fullmatch(path.name)
        if match and (fmt is None or match[2] == fmt) and path.is_file():
            found[int(match[1])] = path
    return dict(sorted(found.items()))


# ---- writing ---------------------------------------------------------------------------------------------------
def write_shard(path, names: Sequence[str], embedding: np.ndarray, residue: Optional[Sequence[np.ndarray]],
                entries: Tuple[int, int], skipped: Sequence[Tuple[str, str]], options: str) -> None:
    """One shard (module docstring), written atomically (`writing.replacing`) as .npz or .h5 by `path`'s suffix.

    Args:
        names: P entries; embedding: [P, D] float32.
        residue: with --per-residue, P arrays [L_p, D]; else None.
        entries: the shard's range [start, end) of the input; skipped: [(name, reason)] of the range.
        options: `encoding.embedding_options` JSON.
    """
    path = Path(path)
    embedding = np.ascontiguousarray(embedding, np.float32)
    encoded = [name.encode("utf-8", "surrogateescape") for name in names]
    arrays = {"names": np.array(encoded, dtype=f"S{max([1] + [len(n) for n in encoded])}"),
              "embedding": embedding}
    if residue is not None:
        arrays["residue_embedding"] = (np.concatenate(residue).astype(np.float32, copy=False) if len(residue)
                                       else np.zeros((0, embedding.shape[1]), np.float32))
        arrays["residue_offsets"] = np.cumsum([0] + [len(r) for r in residue]).astype(np.int64)
    meta = {"entries": np.array(entries, np.int64),
            "skipped": json.dumps([[str(n), str(r)] for n, r in skipped]), "options": options}
    with writing.replacing(path) as temporary:
        if path.suffix == ".npz":
            with open(temporary, "wb") as handle:
                np.savez(handle, **arrays, **{key: np.asarray(value) for key, value in meta.items()})
        else:
            import h5py

            with h5py.File(temporary, "w") as handle:
                for key, value in arrays.items():
                    handle.create_dataset(key, data=value)  # contiguous, uncompressed: mappable in place
                for key, value in meta.items():
                    handle.attrs[key] = value


def write_if_changed(path, content: bytes) -> bool:
    """`content` as the whole of `path` (atomically) unless it already holds exactly that (a finished output
    resumed changes no file); True when written."""
    path = Path(path)
    if path.is_file() and path.read_bytes() == content:
        return False
    writing.write_atomic(path, content)
    return True


def write_index(folder, manifest: Dict, unusable: Sequence[Tuple[str, str]] = ()
                ) -> Tuple[Dict, List[Tuple[str, str]]]:
    """`index.json` of a folder whose shards are all written (rank 0, at the end), and `skipped.tsv`: the
    `unusable` inputs (those no shard could hold: a missing file) and every shard's skipped entries (removed when
    there are none); a file that would not change is not written again. Returns (the index, skipped).

    Raises:
        ValueError: a shard is missing or cannot be read (one sentence naming it).
    """
    folder = Path(folder)
    count = -(-manifest["entries"] // manifest["shard_size"])
    shards, skipped, rows = [], list(unusable), 0
    for shard in range(count):
        head = read_head(shard_path(folder, shard, manifest["format"]))
        shards.append({"file": head.path.name, "entries": list(head.entries), "rows": head.rows,
                       "skipped": len(head.skipped)})
        skipped += head.skipped
        rows += head.rows
    index = {**manifest, "rows": rows, "skipped": len(skipped) - len(unusable), "unusable": len(unusable),
             "shards": shards}
    write_if_changed(folder / INDEX, (json.dumps(index, indent=1) + "\n").encode("utf-8"))
    if skipped:
        write_if_changed(folder / SKIPPED, writing.skipped_rows(skipped))
    else:
        (folder / SKIPPED).unlink(missing_ok=True)
    return index, skipped


# ---- reading ---------------------------------------------------------------------------------------------------
class Head:
    """What a shard says about itself without its embeddings: `path`, `rows` P, `entries` (start, end),
    `skipped` [(name, reason)], `options` (JSON text)."""

    def __init__(self, path: Path, rows: int, entries: Tuple[int, int], skipped: List[Tuple[str, str]], options: str):
        self.path, self.rows, self.entries, self.skipped, self.options = path, rows, entries, skipped, options


def _unreadable(path, error: BaseException) -> ValueError:
    from ..checkpoint import first_line

    return ValueError(f"{path} cannot be read as a shard of embed ({first_line(error)}): it is damaged or was not "
                      "written by embed; remove it and run embed again with --resume to write it anew.")


def read_head(path) -> Head:
    """A shard's `Head` (its arrays are checked for shape, not read).

    Raises:
        ValueError: one sentence naming the file when it is missing, truncated or not a shard.
    """
    path = Path(path)
    try:
        arrays, meta = _open(path)
        rows = arrays["names"].shape[0]
        if arrays["embedding"].ndim != 2 or arrays["embedding"].shape[0] != rows:
            raise ValueError(f"{rows} names but embeddings of shape {arrays['embedding'].shape}")
        if "residue_offsets" in arrays:
            offsets = arrays["residue_offsets"]
            if offsets.shape != (rows + 1,) or int(offsets[-1]) != arrays["residue_embedding"].shape[0]:
                raise ValueError("its residue offsets do not match its residue embeddings")
        skipped = [(str(n), str(r)) for n, r in json.loads(meta["skipped"])]
        start, end = (int(x) for x in meta["entries"])
        return Head(path, rows, (start, end), skipped, str(meta["options"]))
    except Exception as error:  # noqa: BLE001 - one sentence for any unreadable shard
        raise _unreadable(path, error) from None


def _open(path: Path) -> Tuple[Dict[str, np.ndarray], Dict]:
    """({array name: memory-mapped array}, {"entries", "skipped", "options"}) of a shard."""
    if path.suffix == ".npz":
        return _open_npz(path)
    if path.suffix == ".h5":
        return _open_h5(path)
    raise ValueError(f"not a shard file (.npz or .h5): {path.name}")


_META = ("entries", "skipped", "options")


def _open_npz(path: Path):
    arrays, meta = {}, {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as handle:
        for info in archive.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if name in _META:
                with archive.open(info) as member:
                    meta[name] = np.lib.format.read_array(member, allow_pickle=False)
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"its array {name} is compressed, so it cannot be memory-mapped")
            handle.seek(info.header_offset)
            local = handle.read(30)  # the member's local header: its name and extra field come next
            if local[:4] != b"PK\x03\x04":
                raise ValueError(f"the zip header of {name} is damaged")
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            handle.seek(info.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(handle)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(handle)
            arrays[name] = _mapped(path, dtype, shape, handle.tell(), fortran)
    missing = [key for key in ("names", "embedding") + _META if key not in arrays and key not in meta]
    if missing:
        raise ValueError(f"it lacks {', '.join(missing)}")
    meta["skipped"], meta["options"] = str(meta["skipped"]), str(meta["options"])
    return arrays, meta


def _open_h5(path: Path):
    import h5py

    arrays = {}
    with h5py.File(path, "r") as handle:
        meta = {key: handle.attrs[key] for key in _META}
        for name, dataset in handle.items():
            offset = dataset.id.get_offset()
            if offset is None and dataset.size:
                raise ValueError(f"its dataset {name} is not contiguous, so it cannot be memory-mapped")
            arrays[name] = _mapped(path, dataset.dtype, dataset.shape, offset or 0, False)
    meta = {key: value.decode() if isinstance(value, bytes) else value for key, value in meta.items()}
    if "names" not in arrays or "embedding" not in arrays:
        raise ValueError("it lacks names or embedding")
    return arrays, meta


def _mapped(path: Path, dtype, shape, offset: int, fortran: bool) -> np.ndarray:
    """The array of `shape` at byte `offset` of `path`, memory-mapped read-only (an empty one in memory)."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise ValueError("it holds Python objects")
    if not int(np.prod(shape)):
        return np.zeros(shape, dtype)
    if offset + int(np.prod(shape)) * dtype.itemsize > path.stat().st_size:
        raise ValueError("it is shorter than its arrays (truncated)")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape), order="F" if fortran else "C")


class ShardedEmbeddings:
    """A sharded output of `embed` as one table (what `embed.load_embeddings(FOLDER)` returns), read lazily: the
    shards' arrays are memory-mapped when a row of theirs is asked for (at most `_OPEN_SHARDS` at once).

    Rows are the entries that were embedded, in input order (shard by shard). An output without `index.json` (a
    run still going, or killed) is read from the shards present: `complete` is then False.

    ==========================  ===================================================================================
    member                      what it gives
    ==========================  ===================================================================================
    `len(out)`                  P, the rows
    `out.names`                 a lazy sequence of the P entry names (str); `list(out.names)` reads them all
    `out.embeddings`            a lazy [P, D] float32 view: `[i]`, `[a:b]`, `[rows]` read those rows only
                                (numpy arrays); `np.asarray(out.embeddings)` reads everything
    `out[i]`, `out["name"]`     the [D] embedding of row i, or of the entry of that name
    `out.rows(names)`           [len(names)] int64 rows of these entries (one pass over the names)
    `out.residue_embedding(i)`  [L, D] per-residue embedding of row i or of a name (with --per-residue)
    `out.skipped`               [(name, reason)] of the entries that could not be read
    `out.manifest`, `options`   the manifest (dict), the `embedding_options` JSON it was made with
    `out.shards`                the shard files read, in order
    ==========================  ===================================================================================

    Raises:
        ValueError: one sentence naming the folder when it is not an output of embed, or a shard is damaged.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        try:
            self.manifest = json.loads((self.folder / MANIFEST).read_text())
            if self.manifest.get("layout") != LAYOUT:
                raise ValueError(f"its layout is {self.manifest.get('layout')!r}")
        except Exception as error:  # noqa: BLE001 - missing, not JSON, another layout
            from ..checkpoint import first_line

            raise ValueError(f"{self.folder} is not a sharded output of embed (its {MANIFEST} cannot be read: "
                             f"{first_line(error)}); give the folder that embed -o wrote.") from None
        self.options = self.manifest["options"]
        self.per_residue = bool(json.loads(self.options).get("per_residue")) if self.options else False
        index_file = self.folder / INDEX
        self.complete = index_file.is_file()
        if self.complete:
            index = json.loads(index_file.read_text())
            self.shards = [self.folder / shard["file"] for shard in index["shards"]]
            counts = [shard["rows"] for shard in index["shards"]]
            self._skipped: Optional[List[Tuple[str, str]]] = None
        else:  # partial: the shards present, each asked for its rows
            heads = [read_head(path) for path in shard_files(self.folder, self.manifest["format"]).values()]
            self.shards = [head.path for head in heads]
            counts = [head.rows for head in heads]
            self._skipped = [row for head in heads for row in head.skipped]
        self._starts = np.cumsum([0] + counts).astype(np.int64)
        self._arrays: "OrderedDict[int, Dict[str, np.ndarray]]" = OrderedDict()
        self.names = _Names(self)
        self.embeddings = _Rows(self, "embedding")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __repr__(self) -> str:
        state = "complete" if self.complete else "partial"
        return f"ShardedEmbeddings({self.folder}, rows={len(self)}, shards={len(self.shards)}, {state})"

    @property
    def dim(self) -> int:
        """D, the channels of an embedding (0 when there is no row)."""
        return int(self._shard_arrays(0)["embedding"].shape[1]) if self.shards else 0

    # ---- shards ------------------------------------------------------------------------------------------------
    def _shard_arrays(self, shard: int) -> Dict[str, np.ndarray]:
        """The memory-mapped arrays of shard number `shard` (in `shards`), the least recently used let go."""
        if shard in self._arrays:
            self._arrays.move_to_end(shard)
            return self._arrays[shard]
        try:
            arrays, _ = _open(self.shards[shard])
        except Exception as error:  # noqa: BLE001
            raise _unreadable(self.shards[shard], error) from None
        self._arrays[shard] = arrays
        while len(self._arrays) > _OPEN_SHARDS:
            self._arrays.popitem(last=False)
        return arrays

    def _locate(self, rows: np.ndarray) -> np.ndarray:
        """[n] shard number of each row."""
        return np.searchsorted(self._starts, rows, side="right") - 1

    def _row(self, key: Union[int, np.integer, str]) -> int:
        if isinstance(key, str):
            return int(self.rows([key])[0])
        row = int(key)
        if not -len(self) <= row < len(self):
            raise IndexError(f"row {row} is out of range: {self.folder} holds {len(self)} rows.")
        return row % len(self)

    # ---- access ------------------------------------------------------------------------------------------------
    def __getitem__(self, key: Union[int, str]) -> np.ndarray:
        """The [D] embedding of row `key` or of the entry named `key`."""
        return self.embeddings[self._row(key)]

    def rows(self, names: Sequence[str]) -> np.ndarray:
        """[len(names)] int64 rows of these entries, in one pass over the shards' names.

        Raises:
            KeyError: an entry the output does not hold (one sentence naming it).
        """
        wanted = [name.encode("utf-8", "surrogateescape") for name in names]
        found: Dict[bytes, int] = {}
        targets = np.array(wanted, dtype=f"S{max([1] + [len(n) for n in wanted])}")
        for shard in range(len(self.shards)):
            if len(found) == len(set(wanted)):
                break
            block = self._shard_arrays(shard)["names"]
            for at in np.nonzero(np.isin(block, targets))[0]:
                found.setdefault(bytes(block[at]), int(self._starts[shard] + at))
        missing = [name for name, key in zip(names, wanted) if key not in found]
        if missing:
            raise KeyError(f"{self.folder} holds no entry named {missing[0]!r} ({len(missing)} of the "
                           f"{len(names)} names asked for are not in it).")
        return np.array([found[key] for key in wanted], np.int64)

    def residue_embedding(self, key: Union[int, str]) -> np.ndarray:
        """The [L, D] per-residue embedding of row `key` or of the entry named `key` (L: its residues with a CA).

        Raises:
            ValueError: the output was written without --per-residue.
        """
        if not self.per_residue:
            raise ValueError(f"{self.folder} holds no per-residue embeddings (it was written without "
                             "--per-residue).")
        row = self._row(key)
        shard = int(self._locate(np.array([row]))[0])
        arrays = self._shard_arrays(shard)
        at = row - int(self._starts[shard])
        start, end = arrays["residue_offsets"][at:at + 2]
        return np.array(arrays["residue_embedding"][int(start):int(end)])

    @property
    def skipped(self) -> List[Tuple[str, str]]:
        """[(name, reason)] of the entries that could not be read, from the shards."""
        if self._skipped is None:
            self._skipped = [row for path in self.shards for row in read_head(path).skipped]
        return self._skipped

    def take(self, rows: np.ndarray, array: str) -> np.ndarray:
        """[len(rows), ...] of the shards' `array` ("embedding" or "names") at these rows (ints in [0, P))."""
        rows = np.asarray(rows, np.int64)
        shard_of = self._locate(rows)
        pieces, where = [], []
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            pieces.append(np.asarray(self._shard_arrays(int(shard))[array][rows[mask] - self._starts[shard]]))
            where.append(np.nonzero(mask)[0])
        if not pieces:
            tail = (self.dim,) if array == "embedding" else ()
            return np.zeros((0,) + tail, np.float32 if array == "embedding" else "S1")
        out = np.empty((len(rows),) + pieces[0].shape[1:], np.result_type(*pieces))
        for piece, at in zip(pieces, where):
            out[at] = piece
        return out


class _Rows:
    """A lazy [P, ...] view of one array of every shard (`ShardedEmbeddings.embeddings`)."""

    def __init__(self, table: ShardedEmbeddings, array: str):
        self.table, self.array = table, array

    def __len__(self) -> int:
        return len(self.table)

    @property
    def shape(self) -> Tuple[int, ...]:
        return (len(self.table), self.table.dim)

    dtype = np.dtype(np.float32)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.table.take(np.array([self.table._row(key)]), self.array)[0]
        if isinstance(key, slice):
            return self.table.take(np.arange(*key.indices(len(self.table))), self.array)
        rows = np.asarray(key)
        if rows.dtype == bool:
            rows = np.nonzero(rows)[0]
        return self.table.take(np.where(rows < 0, rows + len(self.table), rows), self.array)

    def __array__(self, dtype=None, copy=None):
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


class _Names(Sequence):
    """The P entry names of a `ShardedEmbeddings`, read from the shards when asked for."""

    def __init__(self, table: ShardedEmbeddings):
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [_text(n) for n in self.table.take(np.arange(*key.indices(len(self.table))), "names")]
        return _text(self.table.take(np.array([self.table._row(key)]), "names")[0])

    def __iter__(self):
        for shard in range(len(self.table.shards)):
            yield from (_text(n) for n in np.asarray(self.table._shard_arrays(shard)["names"]))


def _text(name: bytes) -> str:
    return bytes(name).decode("utf-8", "surrogateescape")


__all__ = ["Head", "INDEX", "LAYOUT", "MANIFEST", "SHARD_FORMATS", "SKIPPED", "ShardedEmbeddings", "read_head",
           "shard_files", "shard_path", "write_if_changed", "write_index", "write_shard"]
