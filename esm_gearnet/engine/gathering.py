"""Work shared out to the ranks and gathered back: evaluation slices, predictions, training means.

Evaluation: rank r of W scores the contiguous slice [n r / W, n (r + 1) / W) of a split of n proteins, and the
predictions are concatenated in rank order, so every rank ends with every protein once, in dataset order.
DEVIATION: the original evaluated through a padded DistributedSampler, which scored some proteins twice.

Every helper also works in one process (no process group), where the one rank's share is the whole.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Subset

from .. import distributed


def rank_slice(dataset, rank: int, world_size: int) -> Subset:
    """This rank's contiguous share of an evaluation split (sizes differ by at most one, no padding)."""
    n = len(dataset)
    lo, hi = n * rank // world_size, n * (rank + 1) // world_size
    return Subset(dataset, list(range(lo, hi)))


def gather_predictions(preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                       extras: Dict[str, list]) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, list]]:
    """The predictions of every rank's slice, in rank order (= dataset order), on every rank.

    Args:
        preds: this rank's batches of predictions, each [B, ...] (a rank with an empty slice passes []).
        targets: this rank's batches of targets, each [B, ...].
        extras: per-protein values the task's `evaluate` also reads (e.g. PSR target ids), each a list of B per
            batch, concatenated.
    Returns:
        pred [n, ...], target [n, ...], and the extras that hold one value per protein (lists of n).
    """
    local = (torch.cat(preds) if preds else None, torch.cat(targets) if targets else None, extras)
    parts = distributed.gather_objects(local)
    pred = torch.cat([p for p, _, _ in parts if p is not None])
    target = torch.cat([t for _, t, _ in parts if t is not None])
    extra = {k: sum((e[k] for _, _, e in parts), []) for k in extras}
    return pred, target, {k: v for k, v in extra.items() if len(v) == len(pred)}


def mean_over_ranks(means: Dict[str, float]) -> Dict[str, float]:
    """The mean over the ranks of each rank's epoch means (the ranks see equally many batches)."""
    values: Dict[str, List[float]] = {}
    for rank_means in distributed.gather_objects(means):
        for key, value in rank_means.items():
            values.setdefault(key, []).append(value)
    return {key: float(np.mean(v)) for key, v in values.items()}
