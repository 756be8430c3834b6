"""The preprocessing cache: structures parsed once (worker processes, progress bar) into one packed file.

The file holds every per-residue field concatenated over the proteins plus their lengths, names and chain
ids; it is written atomically (temporary file + rename) with the digest of its content
(`checkpoint.save_atomic`), and loaded memory-mapped, so a cache of 20,000 proteins opens in under a second,
its digest checked. Its key hashes the preprocessing options and the files (path, size, modification time):
change any and the cache is rebuilt. A cache that cannot be used is rebuilt with a warning naming it and the
reason, never used: unreadable (truncated, from another version), not matching its digest (flipped bits), or
with a structure that does not fit (a field missing, dtypes or shapes that disagree, lengths that do not sum
to the fields' rows, counts of names or files that differ). Files that fail to parse are skipped and listed,
with the reason, in `<cache>.skipped.tsv`.

Datasets asked for Foldseek 3Di tokens (`three_di=True`) compute each protein's states once, while parsing,
and keep them as one more packed field, `three_di_state`; the option is part of the key, so a cache built
without them is rebuilt when they are asked for (and a cache built with them when they are not). Caches of
datasets that do not ask for them keep their key and content.
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
from ..protein import OPTIONAL_RESIDUE_FIELDS, RESIDUE_FIELDS, Protein
from ... import writing
from ...checkpoint import CheckpointError, load, save_atomic
from ...writing import remove_leftovers

logger = logging.getLogger("esm_gearnet")
FORMAT = "esm_gearnet.cache/2"  # /2: a digest in every file, no "complete" mark


def cache_key(files: Sequence[Path], options: Dict) -> str:
    digest = hashlib.sha1(json.dumps({"version": FORMAT, "options": options}, sort_keys=True).encode())
    for path in files:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def three_di_option(three_di: bool) -> Dict:
    """The cache-key entry of the 3Di option: nothing when it is off, so that older caches keep their key."""
    return {"three_di": True} if three_di else {}


def with_three_di(proteins: Sequence[Protein]) -> List[Protein]:
    """The proteins with their 3Di states (`Protein.three_di_state`), computed where they are missing."""
    from ..foldseek import three_di_states

    return [p if p.three_di_state is not None else p.replace(three_di_state=three_di_states(p)) for p in proteins]


class PackedProteins:
    """Proteins stored as concatenated tensors; `[i]` builds the i-th `Protein` (views, no copy).

    The optional per-residue field `three_di_state` is stored when every protein has it.
    """

    def __init__(self, state: Dict):
        self.fields = state["fields"]
        self.lengths = state["lengths"]
        self.starts = torch.cumsum(self.lengths, 0) - self.lengths
        self.names: List[str] = state["names"]
        self.chain_ids: List[List[str]] = state["chain_ids"]
        self.num_dropped = state["num_dropped"]
        self.files: List[str] = state["files"]

    @classmethod
    def pack(cls, proteins: Sequence[Protein], files: Sequence[str], three_di: bool = False) -> "PackedProteins":
        """Args: three_di: store the 3Di states, computing those the proteins lack (also for no protein)."""
        empty = Protein.from_sequence("")
        if three_di:
            proteins = with_three_di(proteins)
        fields = {k: torch.cat([getattr(p, k) for p in proteins] or [getattr(empty, k)]) for k in RESIDUE_FIELDS}
        if (proteins or three_di) and all(p.three_di_state is not None for p in proteins):
            fields["three_di_state"] = torch.cat([p.three_di_state for p in proteins] or [empty.residue_type])
        return cls({
            "fields": fields,
            "lengths": torch.tensor([p.num_residue for p in proteins], dtype=torch.long),
            "names": [p.name for p in proteins], "chain_ids": [list(p.chain_ids) for p in proteins],
            "num_dropped": torch.tensor([p.num_dropped for p in proteins], dtype=torch.long),
            "files": list(files)})

    @staticmethod
    def check(state: Dict, three_di: bool = False) -> None:
        """Raises ValueError naming the first thing in `state` (what `state()` returns) that does not fit.

        Args:
            three_di: the state must hold the 3Di states (`fields.three_di_state`).
        """
        missing = [k for k in ("fields", "lengths", "names", "chain_ids", "num_dropped", "files") if k not in state]
        fields = state.get("fields") if isinstance(state.get("fields"), dict) else {}
        missing += [f"fields.{k}" for k in RESIDUE_FIELDS + ("three_di_state",) * three_di if k not in fields]
        if missing:
            raise ValueError(f"lacks {', '.join(missing)}")
        unknown = sorted(set(fields) - set(RESIDUE_FIELDS) - set(OPTIONAL_RESIDUE_FIELDS))
        if unknown:
            raise ValueError(f"holds unknown fields {', '.join(unknown)}")
        lengths = state["lengths"]
        if not (isinstance(lengths, torch.Tensor) and lengths.dtype == torch.long and lengths.dim() == 1
                and bool((lengths >= 0).all())):
            raise ValueError("lengths is not a 1-d tensor of non-negative int64")
        total, empty = int(lengths.sum()), Protein.from_sequence("")
        for name in fields:
            field = fields[name]
            model = getattr(empty, name) if name in RESIDUE_FIELDS else empty.residue_type  # three_di_state: [N] long
            if not isinstance(field, torch.Tensor) or field.dtype != model.dtype or field.shape[1:] != model.shape[1:]:
                shape = ", ".join(["N", *map(str, model.shape[1:])])
                raise ValueError(f"fields.{name} is not a {model.dtype} tensor of shape [{shape}]")
            if len(field) != total:
                raise ValueError(f"fields.{name} has {len(field)} rows but the lengths sum to {total}")
        for name in ("names", "chain_ids", "num_dropped", "files"):
            if len(state[name]) != len(lengths):
                raise ValueError(f"holds {len(state[name])} {name} for {len(lengths)} proteins")

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


def cached(cache_file: Path, key: str, build: Callable[[], Dict], check: Callable[[Dict], None]) -> Dict:
    """The state saved in `cache_file` under `key`, or `build()` saved there atomically and returned.

    A valid cache is read without a lock (a read-only dataset folder serves). To build one, this process takes the
    cache's lock (`.NAME.lock`); another process building the same cache makes it wait, saying so, and then it
    reads what that one wrote.

    Args:
        key: what the cache was made from (`cache_key`): a file of another key is rebuilt.
        check: raises ValueError naming what does not fit in a loaded state of the right key, which is then
            rebuilt (its digest matched, but it was written by a faulty or tampering writer).

    Raises:
        CheckpointError: `cache_file` is a directory (never removed here).
    """
    cache_file = Path(cache_file)
    if cache_file.is_dir():
        raise CheckpointError(f"the cache path {cache_file} is a directory; move it away (or delete it) so the "
                              "preprocessed cache can be written there.")
    state = _usable(cache_file, key, check, quiet=True)  # read without the lock: a read-only folder serves
    if state is not None:
        return state
    # two builds of one cache (two runs, the ranks of one run): the second waits for the first, then reads its file
    with writing.output_lock(cache_file, wait=True, what="dataset cache"):
        remove_leftovers(cache_file)
        state = _usable(cache_file, key, check)
        if state is None:
            state = dict(build(), format=FORMAT, key=key)
            save_atomic(state, cache_file)
        return state


def _usable(cache_file: Path, key: str, check: Callable[[Dict], None], quiet: bool = False) -> Optional[Dict]:
    """The state in `cache_file` when it is a cache of `key` that passes `check`, else None (saying why, unless
    `quiet`)."""
    say = (lambda *args: None) if quiet else logger.warning
    if not cache_file.exists():
        return None
    try:
        state = load(cache_file, mmap=True, what="cache", advice="rebuilding it")
    except CheckpointError as error:
        say("%s", error)
        return None
    if state.get("format") != FORMAT or state.get("key") != key:
        if not quiet:
            logger.info("cache %s was made from other inputs, options or version: rebuilding it", cache_file)
        return None
    try:
        check(state)
    except (ValueError, TypeError, KeyError) as error:
        say("cache %s is inconsistent (%s); rebuilding it.", cache_file, error)
        return None
    return state


def write_skipped(cache_file: Path, skipped: Sequence[Tuple[str, str]], total: int, what: str = "structure files"):
    """Lists the skipped inputs with their reasons in `<cache>.skipped.tsv` (`writing.write_skipped`)."""
    report = writing.write_skipped(cache_file, skipped)
    if skipped:
        logger.warning("%d of %d %s could not be read and were skipped; see %s", len(skipped), total, what, report)


def load_or_build(files: Sequence[Path], cache_file: Path, options: Optional[Dict] = None, chain: str = None,
                  workers: int = 2, progress: bool = True, three_di: bool = False
                  ) -> Tuple[PackedProteins, List[Tuple[str, str]]]:
    """The packed proteins of `files` (minus those that fail to parse), from `cache_file` when it is valid.

    Args:
        three_di: also compute every protein's Foldseek 3Di states (in the parsing workers) and keep them in
            the cache; the proteins then carry them in `Protein.three_di_state`.
    Returns:
        (proteins, skipped [(file, reason)]); `proteins.files[i]` is the file protein i came from.
    """
    files = [Path(f) for f in files]

    def build():
        proteins, skipped = load_structures(files, chain=chain, workers=workers, progress=progress,
                                            description=f"parsing {len(files)} structures", three_di=three_di)
        bad = {path for path, _ in skipped}
        packed = PackedProteins.pack(proteins, [str(f) for f in files if str(f) not in bad], three_di=three_di)
        write_skipped(cache_file, skipped, len(files))
        return {**packed.state(), "skipped": [list(s) for s in skipped]}

    def check(state):
        PackedProteins.check(state, three_di=three_di)
        if not isinstance(state.get("skipped"), list):
            raise ValueError("lacks the list of skipped files")

    key = cache_key(files, dict(options or {}, chain=chain, **three_di_option(three_di)))
    state = cached(cache_file, key, build, check)
    return PackedProteins(state), [tuple(s) for s in state["skipped"]]
