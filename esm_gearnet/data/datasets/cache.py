"""The preprocessing cache: structures parsed once (worker processes, progress bar) into one packed file.

The file holds every per-residue field concatenated over the proteins plus their lengths, names and chain
ids; it is written atomically (temporary file + rename) and loaded memory-mapped, so a cache of 20,000
proteins opens in well under a second. Its key hashes the preprocessing options and the files (path, size,
modification time): change any and the cache is rebuilt. A file that cannot be read (truncated, or from
another version) is rebuilt with a warning, never used. Files that fail to parse are skipped and listed,
with the reason, in `<cache>.skipped.tsv`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..io import load_structures
from ..protein import RESIDUE_FIELDS, Protein
from ...checkpoint import save_atomic

logger = logging.getLogger("esm_gearnet")
VERSION = 1


def cache_key(files: Sequence[Path], options: Dict) -> str:
    digest = hashlib.sha1(json.dumps({"version": VERSION, "options": options}, sort_keys=True).encode())
    for path in files:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class PackedProteins:
    """Proteins stored as concatenated tensors; `[i]` builds the i-th `Protein` (views, no copy)."""

    def __init__(self, state: Dict):
        self.fields = state["fields"]
        self.lengths = state["lengths"]
        self.starts = torch.cumsum(self.lengths, 0) - self.lengths
        self.names: List[str] = state["names"]
        self.chain_ids: List[List[str]] = state["chain_ids"]
        self.num_dropped = state["num_dropped"]
        self.files: List[str] = state["files"]

    @classmethod
    def pack(cls, proteins: Sequence[Protein], files: Sequence[str]) -> "PackedProteins":
        empty = Protein.from_sequence("")
        return cls({
            "fields": {k: torch.cat([getattr(p, k) for p in proteins] or [getattr(empty, k)]) for k in RESIDUE_FIELDS},
            "lengths": torch.tensor([p.num_residue for p in proteins], dtype=torch.long),
            "names": [p.name for p in proteins], "chain_ids": [list(p.chain_ids) for p in proteins],
            "num_dropped": torch.tensor([p.num_dropped for p in proteins], dtype=torch.long),
            "files": list(files)})

    def state(self) -> Dict:
        return {"fields": self.fields, "lengths": self.lengths, "names": self.names, "chain_ids": self.chain_ids,
                "num_dropped": self.num_dropped, "files": self.files}

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> Protein:
        start, length = int(self.starts[index]), int(self.lengths[index])
        return Protein(**{k: v[start:start + length] for k, v in self.fields.items()},
                       chain_ids=tuple(self.chain_ids[index]), name=self.names[index],
                       num_dropped=int(self.num_dropped[index]))


def cached(cache_file: Path, key: str, build: Callable[[], Dict]) -> Dict:
    """The state saved in `cache_file` under `key`, or `build()` saved there atomically and returned.

    A file made from other inputs (another key), written half (no completion mark) or unreadable is rebuilt.
    """
    cache_file = Path(cache_file)
    if cache_file.is_file():
        try:
            state = torch.load(cache_file, map_location="cpu", weights_only=True, mmap=True)
            if state.get("key") == key and state.get("complete"):
                return state
            logger.info("cache %s was made from other inputs or options: rebuilding it", cache_file)
        except Exception as error:  # noqa: BLE001 - any unreadable cache is rebuilt
            logger.warning("cache %s cannot be read (%s): rebuilding it", cache_file, type(error).__name__)
    state = dict(build(), key=key, complete=True)
    save_atomic(state, cache_file)
    return state


def write_skipped(cache_file: Path, skipped: Sequence[Tuple[str, str]], total: int, what: str = "structure files"):
    """Lists the skipped inputs with their reasons in `<cache>.skipped.tsv` (empty when none was skipped)."""
    report = Path(cache_file).with_name(Path(cache_file).name + ".skipped.tsv")
    report.write_text("".join(f"{name}\t{reason}\n" for name, reason in skipped))
    if skipped:
        logger.warning("%d of %d %s could not be read and were skipped; see %s", len(skipped), total, what, report)


def load_or_build(files: Sequence[Path], cache_file: Path, options: Optional[Dict] = None, chain: str = None,
                  workers: int = 2, progress: bool = True) -> Tuple[PackedProteins, List[Tuple[str, str]]]:
    """The packed proteins of `files` (minus those that fail to parse), from `cache_file` when it is valid.

    Returns:
        (proteins, skipped [(file, reason)]); `proteins.files[i]` is the file protein i came from.
    """
    files = [Path(f) for f in files]

    def build():
        proteins, skipped = load_structures(files, chain=chain, workers=workers, progress=progress,
                                            description=f"parsing {len(files)} structures")
        bad = {path for path, _ in skipped}
        packed = PackedProteins.pack(proteins, [str(f) for f in files if str(f) not in bad])
        write_skipped(cache_file, skipped, len(files))
        return {**packed.state(), "skipped": [list(s) for s in skipped]}

    state = cached(cache_file, cache_key(files, dict(options or {}, chain=chain)), build)
    return PackedProteins(state), [tuple(s) for s in state["skipped"]]
