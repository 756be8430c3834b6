"""The DataLoaders of one rank: shuffled training batches and its slice of an evaluation split.

Training: a `DistributedSampler` (shuffled by (seed, epoch), padded so every rank sees equally many batches),
or with `bucket` a `sampler.LengthBucketSampler` (proteins of similar length share a batch: less padding for
ESM). `batch_size` is per process, so the global batch is batch_size x world size.

Streamed data (a dataset that declares `streamed = True`, e.g. `FoldCompDB`): `stream.loader`, this rank's slice of
every global batch of the epoch's computed order, from any position.

Evaluation: the rank's contiguous slice (`gathering.rank_slice`), in dataset order, every protein once.
"""
from __future__ import annotations

from typing import Optional

from torch.utils.data import DataLoader, DistributedSampler

from ..data.protein import collate
from .gathering import rank_slice
from . import stream
from .sampler import LengthBucketSampler, dataset_lengths


class Loaders:
    """Builds this rank's DataLoaders.

    Args:
        batch_size: proteins per batch and process; num_worker: DataLoader worker processes.
        rank, world_size: this process among the ranks.
        seed: the training order's seed (one order per (seed, epoch), the same on every rank).
        bucket: length-bucketed training batches.
        pin_memory: page-locked host batches (for CUDA).
    """

    def __init__(self, batch_size: int, num_worker: int, rank: int, world_size: int, seed: int = 0,
                 bucket: bool = False, pin_memory: bool = False):
        self.batch_size, self.num_worker = batch_size, num_worker
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.bucket, self.pin_memory = bucket, pin_memory

    def train(self, dataset, epoch: int, skip: int = 0, start_sample: int = 0,
              stop_sample: Optional[int] = None) -> DataLoader:
        """This rank's batches of `dataset` for `epoch`: a new shuffled order every epoch; with `skip`, the batches
        after the first `skip` of that order (a run resumed inside an epoch), none of them loaded. A streamed
        dataset's batches run from sample `start_sample` of the epoch's sequence to `stop_sample` (`skip` is not
        used: the sample position is what a run of any world size continues from)."""
        if getattr(dataset, "streamed", False):
            return stream.loader(dataset, self.batch_size, self.rank, self.world_size, self.seed, epoch,
                                 start=start_sample, stop=stop_sample, num_workers=self.num_worker,
                                 pin_memory=self.pin_memory)
        if self.bucket:
            sampler = LengthBucketSampler(dataset_lengths(dataset), self.batch_size, self.world_size, self.rank,
                                          seed=self.seed)
            sampler.set_epoch(epoch)
            batches = list(sampler)[skip:] if skip else sampler
            return DataLoader(dataset, batch_sampler=batches, **self._options())
        sampler = DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                     seed=self.seed)
        sampler.set_epoch(epoch)
        order = list(sampler)[skip * self.batch_size:] if skip else sampler
        return DataLoader(dataset, batch_size=self.batch_size, sampler=order, shuffle=False, **self._options())

    def evaluation(self, dataset) -> DataLoader:
        """This rank's contiguous slice of `dataset`, in order."""
        return DataLoader(rank_slice(dataset, self.rank, self.world_size), batch_size=self.batch_size,
                          sampler=None, shuffle=False, **self._options())

    def _options(self):
        return dict(num_workers=self.num_worker, collate_fn=collate, pin_memory=self.pin_memory)
