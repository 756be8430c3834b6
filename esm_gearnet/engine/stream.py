"""Streamed training data: each epoch's order computed, not stored, the same for any number of ranks and workers,
and resumable at any sample.

A streamed dataset (one that declares `streamed = True`, e.g. `FoldCompDB`) has `len`, `lengths(indices)` (residues,
without decoding) and `item(i, seed)`. Its epoch is the sequence of samples

    s_0, s_1, ..., s_{n-1}

drawn as follows, with no array of n entries anywhere (214 M int64 indices would be 1.7 GB a process):

1. a seeded bijection of [0, n) (`Permutation`, seeded by (seed, epoch)) gives the shuffled order;
2. the order is cut into fixed windows of `window` positions; each window is sorted by length (ascending or
   descending, drawn per window), so proteins of similar length meet in a batch (less padding for ESM).

Neither step depends on the world size W or the batch size: the sequence is one for every run. Global batches are
consecutive pieces of it of `batch_size` x W samples, from where the run stands; rank r takes the
[floor(r m / W), floor((r + 1) m / W)) part of a global batch of m samples (exactly `batch_size` each but in
the last batch). A rank whose part is empty (the last batch with fewer samples than ranks), or whose every entry
failed to decode, trains on a filler (`batch["stream"]["weight"]` 0): another entry of the batch (or next to it),
whose loss is multiplied by 0 and which is left out of the logged means and the sample count. It still takes part
in what a forward pass shares: batch-norm statistics (across ranks under SyncBatchNorm), and, for the
sequence-structure contrast, the negatives gathered from every rank (a duplicate of another rank's entry there);
this happens at most once an epoch, at its end, or where a rank's entries all fail. A sample's random draws in the dataset's transform (crops) are seeded by (seed, epoch,
position), so they do not depend on which worker or rank makes it either.

The position of a run is the number of samples of the epoch it has passed (`Engine.samples` counts them over all
epochs); resumed with another world size it continues at that sample, so every entry of the epoch is seen
exactly once.

==================  ===========================================================================================
field of a batch    meaning (`batch["stream"]`, the same on every rank for one global batch)
==================  ===========================================================================================
start, end          positions of the global batch in the epoch's sequence, [start, end)
weight              1.0, or 0.0 for a filler (a rank with no sample of its own)
count               samples of this rank that count (decoded, not fillers)
skipped             [(entry name, reason)] of this rank's entries that could not be read
==================  ===========================================================================================
"""
from __future__ import annotations

import logging
import re
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..data.permutation import Permutation, derived_seed
from ..data.protein import collate

logger = logging.getLogger("esm_gearnet")

WINDOW = 4096  # positions of the epoch's order sorted by length together
# what torch's DataLoader raises when a worker process ended without an exception of its own
_WORKER_DIED = re.compile(r"DataLoader worker \(pid.*\) (exited unexpectedly|is killed by signal)")
class Order:
    """The sequence of samples of one epoch of a streamed dataset (module docstring).

    Args:
        dataset: a streamed dataset; seed, epoch: the order's; window: positions sorted by length together.
    """

    def __init__(self, dataset, seed: int, epoch: int, window: int = WINDOW):
        self.dataset, self.n = dataset, len(dataset)
        self.seed, self.epoch, self.window = seed, epoch, window
        self.permutation = Permutation(self.n, derived_seed(seed, epoch))
        self._cached: Tuple[int, Optional[np.ndarray]] = (-1, None)

    def _window(self, w: int) -> np.ndarray:
        """The dataset indices of window `w`, sorted by length."""
        if self._cached[0] != w:
            indices = self.permutation(np.arange(w * self.window, min((w + 1) * self.window, self.n)))
            lengths = self.dataset.lengths(indices)
            order = np.argsort(lengths, kind="stable")
            if derived_seed(self.seed, self.epoch, w, 1) % 2:
                order = order[::-1]
            self._cached = (w, indices[order])
        return self._cached[1]

    def __getitem__(self, span: slice) -> np.ndarray:
        """The dataset indices at positions [start, stop) of the sequence."""
        start, stop = max(span.start or 0, 0), min(span.stop if span.stop is not None else self.n, self.n)
        parts = []
        while start < stop:
            w = start // self.window
            cut = min(stop, (w + 1) * self.window)
            parts.append(self._window(w)[start - w * self.window:cut - w * self.window])
            start = cut
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def item_seed(self, position: int) -> int:
        return derived_seed(self.seed, self.epoch, position, 2)


class Request(list):
    """What the batch sampler hands a DataLoader worker for one batch: [(index, seed)] of this rank's samples,
    plus filler candidates and the global batch's place (module docstring)."""

    def __init__(self, items, fillers, start: int, end: int):
        super().__init__(items)
        self.fillers, self.start, self.end = fillers, start, end


class Batches(torch.utils.data.Sampler):
    """This rank's batches of one epoch of a streamed dataset, from position `start` (a batch sampler).

    Args:
        dataset: the streamed dataset; batch_size: per rank; rank, world_size: this process among the ranks.
        seed, epoch: the order's; start: the position (samples of the epoch already passed); stop: where the
            batches end (default: the end of the epoch).
    """

    FILLER_CANDIDATES = 4

    def __init__(self, dataset, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                 start: int = 0, stop: Optional[int] = None, window: int = WINDOW):
        self.order = Order(dataset, seed, epoch, window)
        self.batch_size, self.rank, self.world_size, self.start = batch_size, rank, world_size, start
        self.stop = self.order.n if stop is None else min(stop, self.order.n)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        return -(-max(self.stop - self.start, 0) // self.global_batch)

    def __iter__(self) -> Iterator[Request]:
        for first in range(self.start, self.stop, self.global_batch):
            last = min(first + self.global_batch, self.stop)
            indices = self.order[first:last]
            m = last - first
            low, high = self.rank * m // self.world_size, (self.rank + 1) * m // self.world_size
            mine = [(int(indices[j]), self.order.item_seed(first + j)) for j in range(low, high)]
            yield Request(mine, self._fillers(first, last, low, high, indices), first, last)

    def _fillers(self, first: int, last: int, low: int, high: int, indices: np.ndarray):
        """Filler candidates for a rank whose own entries cannot be read: the global batch's entries of other ranks,
        then the epoch's entries just before and after the batch (a filler's loss counts zero, so any will do)."""
        spare = [(int(indices[j]), self.order.item_seed(first + j)) for j in range(last - first)
                 if not low <= j < high][:self.FILLER_CANDIDATES]
        around = [p for k in range(self.FILLER_CANDIDATES) for p in (first - 1 - k, last + k) if 0 <= p < self.order.n]
        return spare + [(int(self.order[p:p + 1][0]), self.order.item_seed(p)) for p in around]


class Items(torch.utils.data.Dataset):
    """A streamed dataset as the DataLoader's workers see it: one `Request` in, the batch's items out (bad entries
    left out and named; a filler decoded when no sample of the rank's own is readable)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset.item(index)

    def _read(self, index: int, seed: int, skipped: List) -> Optional[Dict]:
        from ..data.io.errors import StructureError

        try:
            return self.dataset.item(index, seed)
        except StructureError as error:  # EntryError: named, skipped, counted
            skipped.append((self.dataset.name(index), str(error)))
            return None

    def read(self, pairs) -> Tuple[List[Dict], List[Tuple[str, str]]]:
        """(the items of [(index, seed)] that could be read, [(name, reason)] of the others), in this process."""
        skipped: List[Tuple[str, str]] = []
        items = [self._read(index, seed, skipped) for index, seed in pairs]
        return [item for item in items if item is not None], skipped

    def __getitems__(self, request: Request) -> Dict[str, Any]:
        return _gather(request, self.read)


def _gather(request: Request, read) -> Dict[str, Any]:
    """A `Request`'s items through `read` ([(index, seed)] -> (items, skipped)): the readable ones of the rank's
    own, or, when none is, the first filler candidate that reads (weight 0)."""
    items, skipped = read(list(request))
    weight = 1.0
    if not items:
        weight = 0.0
        for filler in request.fillers:
            items = read([filler])[0]
            if items:
                break
    return {"items": items, "weight": weight, "skipped": skipped, "start": request.start, "end": request.end}


def collate_stream(data: Dict[str, Any]) -> Dict[str, Any]:
    """The batch of a `Request`: the items collated as usual, with `batch["stream"]` (module docstring)."""
    if not data["items"]:
        from ..errors import InputError

        raise InputError(f"no entry of the global batch at positions {data['start']}..{data['end']} of the epoch "
                         "could be read, nor any entry next to it (the log names them): the dataset is damaged "
                         "there; check or rebuild it.")
    batch = collate(data["items"])
    count = len(data["items"]) if data["weight"] else 0
    batch["stream"] = {"start": data["start"], "end": data["end"], "weight": data["weight"], "count": count,
                       "skipped": data["skipped"]}
    return batch


def loader(dataset, batch_size: int, rank: int, world_size: int, seed: int, epoch: int, start: int = 0,
           stop: Optional[int] = None, num_workers: int = 0, pin_memory: bool = False) -> "Stream":
    """This rank's batches of epoch `epoch` of the streamed `dataset`, from position `start` to `stop` (`Stream`)."""
    return Stream(dataset, batch_size, rank, world_size, seed, epoch, start, stop, num_workers, pin_memory)


class Stream:
    """This rank's batches of one epoch of a streamed dataset: a DataLoader over `Batches`, which survives its
    worker processes.

    When a worker dies (the OOM killer, a crash in C code while decoding), the DataLoader is made again from the
    position after the last batch it delivered: nothing lost, nothing twice. When it dies again before delivering
    that next batch, the batch's entries are read one by one, each in a fresh process (`parallel.ordered_map`):
    an entry whose process dies too is skipped and named with the others that could not be read. Decoding in
    the training process itself (`num_workers` 0) has no process to lose but itself.
    """

    def __init__(self, dataset, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                 start: int = 0, stop: Optional[int] = None, num_workers: int = 0, pin_memory: bool = False):
        self.dataset, self.options = dataset, (batch_size, rank, world_size, seed, epoch)
        self.start, self.stop, self.num_workers, self.pin_memory = start, stop, num_workers, pin_memory

    def _batches(self, start: int) -> Batches:
        return Batches(self.dataset, *self.options, start=start, stop=self.stop)

    def __len__(self) -> int:
        return len(self._batches(self.start))

    def _loader(self, start: int) -> torch.utils.data.DataLoader:
        seed, epoch, rank = self.options[3], self.options[4], self.options[1]
        # a generator of its own: the loader's draw of its workers' seeds leaves the process's streams alone, so
        # a run resumed inside an epoch (a new loader there) draws from them what the uninterrupted run drew
        generator = torch.Generator().manual_seed(derived_seed(seed, epoch, start, rank))
        return torch.utils.data.DataLoader(Items(self.dataset), batch_sampler=self._batches(start),
                                           collate_fn=collate_stream, num_workers=self.num_workers,
                                           pin_memory=self.pin_memory, generator=generator)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        position, died_at = self.start, None
        while True:
            batches = iter(self._loader(position))
            try:
                for batch in batches:
                    position, died_at = batch["stream"]["end"], None
                    yield batch
                return
            except (RuntimeError, ConnectionError) as error:
                # a worker died: torch says so, or the batch it had sent cannot be received (its tensors are
                # passed by a file descriptor that only the living worker could hand over); an error raised
                # inside a worker is the caller's
                if isinstance(error, RuntimeError) and not _WORKER_DIED.search(str(error)):
                    raise
                if died_at != position:
                    logger.warning("a DataLoader worker died (%s); reading again from sample %d of the epoch",
                                   str(error).splitlines()[0], position)
                    died_at = position
                    continue
            finally:
                # the dead loader's workers stopped and unregistered now, not when it is collected: until then
                # torch's SIGCHLD handler raises again for the dead worker whenever any child process ends
                getattr(batches, "_shutdown_workers", lambda: None)()
            request = next(iter(self._batches(position)), None)  # died twice before this batch: entry by entry
            if request is None:
                return
            yield collate_stream(_isolated(self.dataset, request))
            position, died_at = request.end, None


_READING = None  # the dataset `_isolated` reads: its processes are forked and inherit it (never pickled: the
#                  index of 214 M entries is gigabytes)


def _read_alone(job):
    """One entry read in a process of its own: (the item pickled, or None; [(name, reason)]). Pickled here, by
    value: tensors sent through the pool's pipe would be shared by a file descriptor of a process that has ended."""
    import pickle

    items, skipped = Items(_READING).read([job])
    return (pickle.dumps(items[0]) if items else None), skipped


def _isolated(dataset, request: Request) -> Dict[str, Any]:
    """`Items.__getitems__` of `request`, each entry read in a process of its own (`parallel.ordered_map`,
    isolated: a job whose process dies is run again alone, and dying again it is skipped with its reason)."""
    import pickle

    from ..data.parallel import ordered_map

    def died(job, how):
        name = dataset.name(job[0])
        return None, [(name, f"{getattr(dataset, 'path', 'the dataset')}: reading entry {name} killed the process "
                             f"reading it ({how}), twice")]

    def read(pairs):
        items, skipped = [], []
        for item, reasons in ordered_map(_read_alone, pairs, workers=2, progress=False, on_death=died,
                                         isolated=True):
            skipped.extend(reasons)
            if item is not None:
                items.append(pickle.loads(item))
        return items, skipped

    global _READING
    _READING = dataset
    try:
        return _gather(request, read)
    finally:
        _READING = None


__all__ = ["Batches", "Items", "Order", "Permutation", "Request", "Stream", "WINDOW", "collate_stream",
           "derived_seed", "loader"]
