"""Evaluation metrics, tie-aware, on 1-D or [B, T] tensors; every function returns a 0-dim float tensor.

Conventions follow the original (TorchDrug) and scikit-learn: `auprc` is average precision
(sum over distinct thresholds of recall increase × precision), `auroc` counts tied positive/negative pairs as
half, `f1_max` is CAFA's protein-centric Fmax. Where TorchDrug broke ties by sort order, thresholds here
move over distinct score values only, so equal scores are never split.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch


def _distinct_ends(sorted_values: torch.Tensor) -> torch.Tensor:
    """[n] bool, True on the last element of each run of equal values in a sorted vector."""
    ends = torch.ones_like(sorted_values, dtype=torch.bool)
    ends[:-1] = sorted_values[1:] != sorted_values[:-1]
    return ends


def auprc(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Average precision of scores `pred [n]` for binary `target [n]` (= sklearn's average_precision_score)."""
    pred, target = pred.flatten().double(), target.flatten().double()
    order = torch.argsort(pred, descending=True, stable=True)
    pred, target = pred[order], target[order]
    ends = _distinct_ends(pred)
    true_positive = target.cumsum(0)[ends]
    predicted = torch.arange(1, len(pred) + 1, dtype=torch.float64, device=pred.device)[ends]
    precision = true_positive / predicted
    recall_step = torch.diff(true_positive, prepend=true_positive.new_zeros(1)) / target.sum().clamp(min=1e-10)
    return (precision * recall_step).sum()


def auroc(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve (ties count one half; = sklearn's roc_auc_score)."""
    pred, target = pred.flatten().double(), target.flatten().bool()
    ranks = _average_ranks(pred)
    num_pos = target.sum().double()
    num_neg = (~target).sum().double()
    if num_pos == 0 or num_neg == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return (ranks[target].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)


def auprc_micro(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Average precision over all (protein, term) pairs pooled together."""
    return auprc(pred.flatten(), target.flatten())


def f1_max(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Protein-centric maximum F1 over thresholds (CAFA Fmax, as in the original).

    At threshold t: precision is averaged over the proteins with at least one score >= t, recall over all
    proteins; F1 = 2PR / (P + R); the maximum over every distinct score t.

    Args:
        pred: [B, T] scores; target: [B, T] binary.
    """
    pred, target = pred.double(), target.double()
    num_protein, num_term = pred.shape
    flat = pred.flatten()
    order = torch.argsort(flat, descending=True, stable=True)  # one global order ...
    row = torch.div(order, num_term, rounding_mode="floor")
    hit = target.flatten()[order]
    by_row = torch.argsort(row, stable=True)  # ... and each protein's entries in that same order
    counts = torch.bincount(row, minlength=num_protein)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(flat), device=flat.device) - start[row[by_row]] + 1  # 1-based rank in its protein
    cumulative_hits = hit[by_row].cumsum(0)
    hits_before = torch.cat([cumulative_hits.new_zeros(1), cumulative_hits])[start[row[by_row]]]
    true_positive = cumulative_hits - hits_before
    precision_row = torch.empty_like(hit)
    precision_row[by_row] = true_positive / rank
    recall_row = torch.empty_like(hit)
    recall_row[by_row] = true_positive / (target.sum(1)[row[by_row]] + 1e-10)
    first = torch.empty_like(hit, dtype=torch.bool)
    first[by_row] = rank == 1
    # each entry changes its protein's precision / recall from the previous entry's value to its own
    previous = torch.empty_like(order)
    previous[by_row[1:]] = by_row[:-1]
    previous[by_row[0]] = 0
    precision_step = precision_row - torch.where(first, torch.zeros_like(hit), precision_row[previous])
    recall_step = recall_row - torch.where(first, torch.zeros_like(hit), recall_row[previous])
    covered = first.double().cumsum(0)
    precision = precision_step.cumsum(0) / covered
    recall = recall_step.cumsum(0) / num_protein
    ends = _distinct_ends(flat[order])
    f1 = 2 * precision * recall / (precision + recall + 1e-10)
    return f1[ends].max()


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks, tied values sharing the mean of their ranks."""
    x = x.flatten()
    sorted_x, order = torch.sort(x, stable=True)
    ends = _distinct_ends(sorted_x)
    group = torch.cumsum(torch.cat([ends.new_zeros(1), ends[:-1]]).long(), 0)
    position = torch.arange(1, len(x) + 1, dtype=torch.float64, device=x.device)
    group_sum = torch.zeros(int(group[-1]) + 1 if len(x) else 0, dtype=torch.float64, device=x.device)
    group_sum.index_add_(0, group, position)
    mean_rank = group_sum / torch.bincount(group).double()
    ranks = torch.empty_like(position)
    ranks[order] = mean_rank[group]
    return ranks


def pearsonr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred, target = pred.flatten().double(), target.flatten().double()
    pred, target = pred - pred.mean(), target - target.mean()
    return (pred * target).sum() / (pred.norm() * target.norm()).clamp(min=1e-300)


def spearmanr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of the average ranks (= scipy.stats.spearmanr)."""
    return pearsonr(_average_ranks(pred), _average_ranks(target))


def per_target_spearmanr(pred: torch.Tensor, target: torch.Tensor, group: Sequence) -> torch.Tensor:
    """Mean over groups (PSR: decoys of one target protein) of the Spearman correlation inside each group.

    Groups with fewer than two decoys or a constant score have no correlation and are left out.
    """
    pred, target = pred.flatten(), target.flatten()
    index: Dict = {}
    for i, g in enumerate(group):
        index.setdefault(g, []).append(i)
    values = []
    for members in index.values():
        if len(members) < 2:
            continue
        members = torch.tensor(members)
        value = spearmanr(pred[members], target[members])
        if torch.isfinite(value) and target[members].unique().numel() > 1 and pred[members].unique().numel() > 1:
            values.append(value)
    return torch.stack(values).mean() if values else torch.tensor(float("nan"), dtype=torch.float64)


def mae(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.double() - target.double()).abs().mean()


def rmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.double() - target.double()).pow(2).mean().sqrt()


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class accuracy: pred [n, C] scores (argmax) or [n] binary logits (> 0) against target [n]."""
    label = pred.argmax(-1) if pred.dim() > 1 and pred.shape[-1] > 1 else (pred.flatten() > 0).long()
    return (label == target.flatten().long()).double().mean()


METRICS: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "auprc": auprc, "auroc": auroc, "auprc@micro": auprc_micro, "f1_max": f1_max, "mae": mae, "rmse": rmse,
    "spearmanr": spearmanr, "pearsonr": pearsonr, "accuracy": accuracy, "acc": accuracy,
}


def get_metric(name: str) -> Callable:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose from {', '.join(sorted(METRICS))}.")
    return METRICS[name]
