"""`embed` at scale: a FoldComp database, or any input under `torchrun`, embedded into a folder of shards (its
layout: `commands.shards`), every rank writing its own shards, resumable shard by shard.

```
torchrun --nproc_per_node=8 script/embed.py -c CONFIG [--ckpt PATH] DB -o OUT [--shard-size K] [--format npz|h5]
         [--per-residue] [--resume] [--workers W] [--max-residues M]
```

How a run goes:

1. Every rank loads the config and weights (`inputs.load_run`, as the single-file embed) and joins the process
   group (`distributed.init`: gloo on CPU, NCCL on CUDA, each rank on its own GPU).
2. Rank 0 alone reads the folder (`_plan`): it takes the folder's lock, refuses a non-empty folder without
   --resume, and with --resume one made from other weights, config, options or input; it removes what a killed
   writer left, finds the shards already whole and writes `manifest.json`. It hands every rank the plan, or its
   one sentence, which every rank then raises (all end with exit code 2 alike).
3. The shards still to write are dealt out in turn: rank r of W takes the r-th, (r+W)-th, ... of them (a fresh
   run: shards r, r+W, r+2W, ...). A database's entries are read in DataLoader workers, batched by residues
   within a shard (their lengths read from the records' headers, nothing decoded), encoded on the rank's device;
   a shard is written whole when its last batch is done. An entry that cannot be read is named with its reason
   in its shard and the others go on.
4. When every rank is done (`distributed.wait_for_all`: no time limit, ranks finish unevenly), rank 0 writes
   `index.json` and `skipped.tsv` (`shards.write_index`).

A kill loses at most the shards being written (one per rank); `--resume` writes the missing ones, with any number
of ranks, and on a finished output changes no file.

Memory: a rank holds the shard it is embedding until it is written, P × D floats, and with --per-residue every
residue's row (10000 proteins of 400 residues × 1280 floats: 20 GB): give per-residue runs a smaller --shard-size.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import distributed, writing
from ..data import ProteinBatch, StructureError, load_structures
from ..data.inputs import collect_inputs
from ..data.io.foldcomp import is_database
from ..engine import evaluation
from ..errors import user_errors
from . import shards
from .encoding import embed_proteins, embedding_options, encode, load_encoder
from .inputs import length_batches, load_run, per_protein

logger = logging.getLogger("esm_gearnet")
DEFAULT_SHARD_SIZE = 10000
Shard = Tuple[int, int, int]  # (shard number, first entry, end entry)


def is_sharded(inputs: Sequence) -> bool:
    """Whether `embed` writes a folder of shards: one of the inputs is a FoldComp database, or the command runs
    under a launcher with more than one rank."""
    return distributed.world_size() > 1 or any(is_database(str(path)) for path in inputs)


# ---- what is embedded -----------------------------------------------------------------------------------------
class DatabaseSource:
    """The entries of a FoldComp database (`FoldCompDB`): names from its lookup file, lengths from its records'
    headers, proteins decoded in the DataLoader's worker processes."""

    def __init__(self, path):
        from ..data.datasets import FoldCompDB

        self.dataset = FoldCompDB(path)
        self.unusable: List[Tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self) -> Dict:
        """What the input is, for the manifest (a resume must find the same)."""
        return {"kind": "FoldComp database", "path": str(Path(self.dataset.path).resolve()),
                "data_bytes": os.path.getsize(self.dataset.path)}

    def mean_residues(self) -> float:
        """The mean residues of up to 1000 entries spread over the database (for the output's size)."""
        if not len(self):
            return 0.0
        return float(self.dataset.lengths(np.linspace(0, len(self) - 1, min(len(self), 1000)).astype(np.int64)).mean())

    def embedded(self, ranges: Sequence[Shard], encoder, per_residue: bool, device: torch.device, workers: int,
                 max_residues: int, bar, precision: str = "fp32") -> Iterator[Dict]:
        """Each shard of `ranges` embedded, in turn: {"shard", "entries", "names", "embedding" [P, D],
        "residue" (P [L_p, D] or None), "skipped" [(name, reason)]}."""
        loader = torch.utils.data.DataLoader(
            _Reader(self.dataset), batch_sampler=_ShardBatches(self.dataset, ranges, max_residues),
            collate_fn=_collate, num_workers=workers, pin_memory=device.type == "cuda")

        def run(data: Dict) -> Dict:
            encoded = encode(encoder, data["batch"], per_residue) if data["batch"] is not None else {}
            return {**encoded, "meta": {key: value for key, value in data.items() if key != "batch"}}

        ends = {shard: (start, end) for shard, start, end in ranges}
        rows: List[Tuple[int, str, Dict]] = []
        skipped: List[Tuple[int, str, str]] = []
        for output in evaluation.outputs(run, loader, device, evaluation.autocast(device, precision)):
            meta = output.pop("meta")
            skipped += meta["skipped"]
            if output:
                rows += zip(meta["positions"], meta["names"], per_protein(output))
            bar.update(len(meta["positions"]) + len(meta["skipped"]))
            if meta["last"]:
                rows.sort(key=lambda row: row[0])
                skipped.sort(key=lambda row: row[0])
                yield _shard_record(meta["shard"], ends[meta["shard"]], [name for _, name, _ in rows],
                                    [value for _, _, value in rows], per_residue, encoder.output_dim,
                                    [(name, reason) for _, name, reason in skipped])
                rows, skipped = [], []


class FileSource:
    """Structure files (and folders, lists of them: `collect_inputs`), in the order given; an entry is a file,
    named by its path. A shard's files are parsed together (`load_structures`, in `workers` processes) and
    embedded as the single-file embed does (`embed_proteins`)."""

    def __init__(self, inputs: Sequence):
        files, self.unusable = collect_inputs(inputs)
        self.files = [str(path) for path in files]

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> Dict:
        digest = hashlib.sha256("\n".join(self.files).encode("utf-8", "surrogateescape")).hexdigest()
        return {"kind": "structure files", "files_sha256": digest}

    def mean_residues(self) -> float:
        return 0.0  # not known before parsing: the space check counts the per-protein rows only

    def embedded(self, ranges: Sequence[Shard], encoder, per_residue: bool, device: torch.device, workers: int,
                 max_residues: int, bar, precision: str = "fp32") -> Iterator[Dict]:
        for shard, start, end in ranges:
            files = self.files[start:end]
            proteins, bad = load_structures(files, workers=workers, progress=False)
            failed = {name for name, _ in bad}
            embedding, residue = embed_proteins(encoder, proteins, per_residue, device, max_residues,
                                                precision=precision)
            values = [{"graph_feature": row, **({"residue_feature": residue[k]} if per_residue else {})}
                      for k, row in enumerate(embedding)]
            bar.update(len(files))
            yield _shard_record(shard, (start, end), [f for f in files if f not in failed], values, per_residue,
                                encoder.output_dim, bad)


def _shard_record(shard: int, entries: Tuple[int, int], names: List[str], values: List[Dict], per_residue: bool,
                  dim: int, skipped: List[Tuple[str, str]]) -> Dict:
    """The arguments of `shards.write_shard` (less the path and options) from one value per embedded protein."""
    embedding = (torch.stack([v["graph_feature"] for v in values]).numpy() if values
                 else np.zeros((0, dim), np.float32))
    residue = [v["residue_feature"].numpy() for v in values] if per_residue else None
    return {"shard": shard, "entries": entries, "names": names, "embedding": embedding, "residue": residue,
            "skipped": skipped}


class _ShardBatch(list):
    """What the batch sampler hands a DataLoader worker: database positions, with the shard they belong to and
    whether they are its last batch."""

    def __init__(self, positions: List[int], shard: int, last: bool):
        super().__init__(positions)
        self.shard, self.last = shard, last


class _ShardBatches(torch.utils.data.Sampler):
    """The batches of the shards `ranges` in turn: within a shard, entries grouped by length into batches of at
    most `max_residues` padded residues (`length_batches`; lengths from the records' headers)."""

    def __init__(self, dataset, ranges: Sequence[Shard], max_residues: int):
        self.dataset, self.ranges, self.max_residues = dataset, list(ranges), max_residues

    def __iter__(self) -> Iterator[_ShardBatch]:
        for shard, start, end in self.ranges:
            positions = np.arange(start, end, dtype=np.int64)
            batches = list(length_batches(self.dataset.lengths(positions).tolist(), self.max_residues))
            for k, batch in enumerate(batches):
                yield _ShardBatch([int(positions[i]) for i in batch], shard, k == len(batches) - 1)


class _Reader(torch.utils.data.Dataset):
    """A `FoldCompDB` as the DataLoader's workers read it: one `_ShardBatch` in, its proteins out, an entry that
    cannot be read named with its reason instead."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset.protein(i)

    def __getitems__(self, batch: _ShardBatch) -> Dict:
        positions, names, proteins, skipped = [], [], [], []
        for i in batch:
            name = self.dataset.name(i)
            try:
                proteins.append(self.dataset.protein(i))
            except StructureError as error:  # EntryError: a damaged entry, named in the shard's skipped list
                skipped.append((i, name, str(error)))
                continue
            positions.append(i)
            names.append(name)
        return {"shard": batch.shard, "last": batch.last, "positions": positions, "names": names,
                "proteins": proteins, "skipped": skipped}


def _collate(data: Dict) -> Dict:
    """A `_Reader` batch with its proteins packed ("batch": ProteinBatch, or None when none could be read)."""
    proteins = data.pop("proteins")
    return {**data, "batch": ProteinBatch.pack(proteins) if proteins else None}


# ---- the folder -----------------------------------------------------------------------------------------------
def output_folder(output) -> Path:
    """`-o OUT` as the folder of a sharded output, refused in one sentence when it names a file."""
    folder = Path(os.path.expanduser(str(output)))
    if folder.exists() and not folder.is_dir() or not folder.exists() and folder.suffix in (".npz", ".pt", ".h5"):
        raise ValueError(f"-o {folder} names a file, but with a FoldComp database as input (or under torchrun) "
                         "embed writes a folder of shards; name a folder, e.g. -o embeddings/.")
    return folder


def refuse_unless_resumed(folder: Path, resume: bool) -> List[str]:
    """The names of the files in `folder` (its lock left out); without --resume, a folder holding any is refused.

    Raises:
        ValueError: one sentence naming the folder and what it holds.
    """
    present = sorted(p.name for p in folder.iterdir() if p.name != ".lock") if folder.is_dir() else []
    if present and not resume:
        shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
        raise ValueError(f"-o {folder} already holds files ({shown}); add --resume to finish that output, or "
                         "write to a new or empty folder.")
    return present


def _plan(folder: Path, source, options: str, fmt: Optional[str], shard_size: Optional[int], resume: bool,
          dim: int) -> Dict:
    """Rank 0: the folder checked and prepared (module docstring, step 2). Returns {"manifest", "todo": shards
    still to write}.

    Raises:
        ValueError: one sentence naming the folder (not empty without --resume, another run's output).
    """
    present = refuse_unless_resumed(folder, resume)
    manifest_file = folder / shards.MANIFEST
    if present and not manifest_file.is_file():
        raise ValueError(f"-o {folder} holds files but no {shards.MANIFEST}, so it is not an output of embed; "
                         "write to a new or empty folder.")
    manifest = {"layout": shards.LAYOUT, "format": fmt or "npz", "shard_size": shard_size or DEFAULT_SHARD_SIZE,
                "entries": len(source), "source": source.describe(), "options": options}
    if manifest_file.is_file():
        try:
            old = json.loads(manifest_file.read_text())
            [old[key] for key in manifest]  # every field a resume reads
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{manifest_file} cannot be read as embed's manifest ({type(error).__name__}: {error}); "
                             "write to a new or empty folder.") from None
        manifest = _resumed(folder, old, manifest, fmt, shard_size)
    count = -(-manifest["entries"] // manifest["shard_size"])
    done = set()
    for shard, path in shards.shard_files(folder, manifest["format"]).items():
        try:
            head = shards.read_head(path)
        except ValueError as error:
            logger.warning("%s; it is written anew", error)
            continue
        start = shard * manifest["shard_size"]
        if head.entries == (start, min(start + manifest["shard_size"], manifest["entries"])) \
                and head.options == options:
            done.add(shard)
    todo = [shard for shard in range(count) if shard not in done]
    size = manifest["shard_size"]
    rows = sum(min((s + 1) * size, manifest["entries"]) - s * size for s in todo)
    per_row = 1 + (source.mean_residues() if json.loads(options)["per_residue"] else 0)  # floats of D each
    writing.writable(manifest_file, need_bytes=int(4 * dim * rows * per_row))
    folder.mkdir(parents=True, exist_ok=True)
    writing.remove_leftovers(folder)  # what a killed writer left: .shard-00003.npz.PID@HOST.xxxxxxxx
    shards.write_if_changed(manifest_file, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    if done:
        logger.info("%s: %d of its %d shards are already written; %d to go", folder, len(done), count, len(todo))
    return {"manifest": manifest, "todo": todo}


def _resumed(folder: Path, old: Dict, new: Dict, fmt: Optional[str], shard_size: Optional[int]) -> Dict:
    """The manifest of the folder --resume continues, checked against this command's (`new`)."""
    if old.get("layout") != shards.LAYOUT:
        raise ValueError(f"{folder / shards.MANIFEST} is not a manifest of embed (layout {old.get('layout')!r}); "
                         "write to a new or empty folder.")
    if old["options"] != new["options"]:
        theirs, ours = json.loads(old["options"]), json.loads(new["options"])
        names = {"encoder_sha256": "encoder weights", "config_sha256": "model config",
                 "per_residue": "--per-residue setting"}
        differ = [names.get(key, key) for key in ours if theirs.get(key) != ours[key]]
        raise ValueError(f"{folder} was written with other {' and '.join(differ) or 'options'} than this command's "
                         "(--resume continues only an output of the same encoder weights, config and "
                         "--per-residue); write to a new folder, or give the options it was made with.")
    def same(source: Dict) -> Dict:  # a database may have moved: its size and entries say whether it is the same
        return {key: value for key, value in source.items() if key != "path"}

    if same(old["source"]) != same(new["source"]) or old["entries"] != new["entries"]:
        raise ValueError(f"{folder} was made from another input ({old['source']}, {old['entries']} entries) than "
                         f"this command's ({new['source']}, {new['entries']} entries); --resume continues an output "
                         "from the same input: give that, or write to a new folder.")
    for key, given in (("shard_size", shard_size), ("format", fmt)):
        if given is not None and given != old[key]:
            option = "--" + key.replace("_", "-")
            raise ValueError(f"{folder} was written with {option} {old[key]}, not {given}; leave out {option} (a "
                             "resumed output keeps its own) or write to a new folder.")
    return old


# ---- the run --------------------------------------------------------------------------------------------------
def run_sharded(inputs: Sequence, output, config: Optional[str] = None, ckpt: Optional[str] = None,
                per_residue: bool = False, resume: bool = False, workers: int = 2, device: Optional[str] = None,
                max_residues: int = 4096, progress: bool = True, variables: Optional[Dict] = None,
                overrides: Sequence = (), shard_size: Optional[int] = None, fmt: Optional[str] = None,
                precision: str = "fp32") -> Dict:
    """Embed `inputs` (one FoldComp database, or structure files) into the folder `output`, this process being one
    rank of the launcher's (module docstring).

    Returns:
        {"embedded": proteins embedded now by every rank, "rows": rows of the output, "shards": its shards,
        "skipped": [(entry, reason)] of the whole output} (rows and skipped are those of rank 0, which writes
        the index; the other ranks get None and []).
    """
    if shard_size is not None and shard_size < 1:
        raise ValueError(f"--shard-size {shard_size}: give a positive number of entries per shard.")
    if fmt == "h5":
        try:
            import h5py  # noqa: F401
        except ImportError:
            raise ImportError("--format h5 needs h5py (pip install h5py); or leave out --format (npz).") from None
    folder = output_folder(output)
    databases = [path for path in inputs if is_database(str(path))]
    if databases and len(inputs) > 1:
        raise ValueError(f"{databases[0]} is a FoldComp database: give it alone as INPUT (one database per run; "
                         "structure files go in another run).")
    refuse_unless_resumed(folder, resume)  # at once, before the model is loaded (rank 0 asks again, locked)
    source = DatabaseSource(databases[0]) if databases else FileSource(inputs)
    cfg, state = load_run(config, ckpt, variables, overrides)  # a config or checkpoint fault: nothing is made
    encoder = load_encoder(cfg, state, str(ckpt))
    options = embedding_options(cfg, encoder, per_residue, precision)
    rank_device = distributed.init()
    device = torch.device(device) if device else rank_device
    lock = ExitStack()
    try:
        plan = None
        if distributed.rank() == 0:
            try:
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                except OSError as error:
                    raise writing.refusal(folder, error) from None
                lock.enter_context(writing.output_lock(folder, what="embedding folder"))
                plan = _plan(folder, source, options, fmt, shard_size, resume, encoder.output_dim)
            except user_errors() as error:  # every rank ends with this sentence
                plan = error
            except Exception as error:  # a fault of rank 0's own: the others end too instead of waiting for it
                distributed.broadcast_object(RuntimeError(f"rank 0 failed to prepare -o {folder} ({error!r})"))
                raise
        plan = distributed.broadcast_object(plan)
        if isinstance(plan, BaseException):
            raise plan
        result = _embed_shards(plan, folder, source, encoder, options, per_residue, device, workers, max_residues,
                               progress, precision)
    except BaseException as error:
        lock.close()
        # leave the group at once (the other ranks may never come to the end); after Ctrl-C or with a peer gone,
        # not even that: tearing the group down could wait for a peer, and the command ends this process
        if not isinstance(error, (KeyboardInterrupt, distributed.StalledError)):
            distributed.shutdown(wait=False)
        raise
    lock.close()
    distributed.shutdown()
    return result


def _embed_shards(plan: Dict, folder: Path, source, encoder, options: str, per_residue: bool, device: torch.device,
                  workers: int, max_residues: int, progress: bool, precision: str = "fp32") -> Dict:
    """This rank's share of the shards still to write (module docstring, steps 3 and 4)."""
    from tqdm.auto import tqdm

    manifest, rank, world = plan["manifest"], distributed.rank(), distributed.world_size()
    size, entries = manifest["shard_size"], manifest["entries"]
    mine = [(s, s * size, min((s + 1) * size, entries)) for s in plan["todo"][rank::world]]
    encoder.to(device)
    embedded = 0
    with tqdm(total=sum(end - start for _, start, end in mine), desc=f"embedding (rank {rank})", unit="entry",
              disable=not progress or rank != 0) as bar:
        for record in source.embedded(mine, encoder, per_residue, device, workers, max_residues, bar, precision):
            path = shards.shard_path(folder, record["shard"], manifest["format"])
            shards.write_shard(path, record["names"], record["embedding"], record["residue"], record["entries"],
                               record["skipped"], options)
            embedded += len(record["names"])
            if record["skipped"]:
                logger.warning("shard %d: %d entr%s could not be read (listed in the shard, and in %s at the end); "
                               "the first: %s", record["shard"], len(record["skipped"]),
                               "y" if len(record["skipped"]) == 1 else "ies", shards.SKIPPED, record["skipped"][0][1])
    distributed.wait_for_all("embed shards written")
    embedded = sum(distributed.gather_objects(embedded))
    if rank != 0:
        return {"embedded": embedded, "rows": None, "shards": len(plan["todo"]), "skipped": []}
    index, skipped = shards.write_index(folder, manifest, source.unusable)
    if skipped:
        logger.warning("%d entr%s skipped, reasons in %s", len(skipped), "y" if len(skipped) == 1 else "ies",
                       folder / shards.SKIPPED)
    return {"embedded": embedded, "rows": index["rows"], "shards": len(index["shards"]), "skipped": skipped}


__all__ = ["DEFAULT_SHARD_SIZE", "DatabaseSource", "FileSource", "is_sharded", "output_folder", "refuse_unless_resumed",
           "run_sharded"]
