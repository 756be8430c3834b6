"""Length-bucketed batches: proteins of similar length share a batch, so ESM pads little.

Deterministic per (seed, epoch) and DDP-aware: every rank draws the same global order and takes its own slice
of every global batch, so ranks stay in step and each protein is used once per epoch (the last incomplete
global batch is filled from the start, as DistributedSampler pads).
"""
from __future__ import annotations

from typing import Iterator, List, Sequence

import torch


def dataset_lengths(dataset) -> List[int]:
    """Residues of every item, read from the packed cache when the dataset has one (no structure is built)."""
    if isinstance(dataset, torch.utils.data.Subset):
        lengths = dataset_lengths(dataset.dataset)
        return [lengths[i] for i in dataset.indices]
    proteins = getattr(dataset, "proteins", None)
    if proteins is not None and hasattr(proteins, "lengths"):
        return proteins.lengths.tolist()
    if proteins is not None:
        return [p.num_residue for p in proteins]
    return [dataset[i]["graph"].num_residue for i in range(len(dataset))]


class LengthBucketSampler(torch.utils.data.Sampler):
    """Batch sampler (yields lists of indices) for one rank.

    The epoch's shuffled order is cut into pools of `pool_batches` global batches; each pool is sorted by
    length and cut into global batches of `batch_size × num_replicas`, whose order is shuffled again. Rank r
    takes its `batch_size` slice of each global batch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, pool_batches: int = 50):
        self.lengths = torch.as_tensor(list(lengths))
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank
        self.seed, self.pool_batches, self.epoch = seed, pool_batches, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        per_global = self.batch_size * self.num_replicas
        return -(-len(self.lengths) // per_global)

    def __iter__(self) -> Iterator[List[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator)
        per_global = self.batch_size * self.num_replicas
        total = len(self) * per_global
        order = torch.cat([order, order[:total - len(order)]]) if total > len(order) else order
        pool = per_global * self.pool_batches
        batches = []
        for start in range(0, total, pool):
            chunk = order[start:start + pool]
            chunk = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            batches.extend(chunk[i:i + per_global] for i in range(0, len(chunk), per_global))
        for k in torch.randperm(len(batches), generator=generator).tolist():
            mine = batches[k][self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            if len(mine):
                yield mine.tolist()
