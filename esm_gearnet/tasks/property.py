"""Protein-level prediction: `MultipleBinaryClassification` (EC, GO) and `PropertyPrediction` (PSR, ...).

Shapes: B proteins (of a batch; in `evaluate`, of a whole split), N residues, T targets per protein (the terms of
EC/GO, the properties), C classes per target (`criterion: ce`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch.nn import functional as F

from .. import metrics
from ..layers import MLP
from ..models import Encoder
from ..registry import register
from .base import Task, dataset_targets


@register
class MultipleBinaryClassification(Task):
    """One logit per term from the protein feature; binary cross entropy averaged over proteins and terms.

    Args:
        encoder: the `Encoder` (config: task.model); task: the term indices (filled in from the dataset at run
        time); criterion: "bce"; num_mlp_layer: MLP depth (hidden widths = encoder.output_dim);
        metric: names among auprc@micro, f1_max, auroc@micro; verbose: the original's, ignored.
    """

    def __init__(self, encoder: Encoder, task: Sequence = (), criterion: str = "bce", num_mlp_layer: int = 1,
                 metric: Sequence[str] = ("auprc@micro", "f1_max"), mlp_batch_norm: bool = False,
                 mlp_dropout: float = 0.0, verbose: int = 0):
        super().__init__(encoder)
        if criterion != "bce":
            raise ValueError(f"MultipleBinaryClassification: criterion must be 'bce', got {criterion!r}.")
        if not len(task):
            raise ValueError("MultipleBinaryClassification needs its task list (the dataset's terms); the "
                             "training script fills it in from dataset.tasks.")
        self.task = list(task)
        self.metric = [metric] if isinstance(metric, str) else list(metric)
        for name in self.metric:
            metrics.get_metric(name.replace("auroc@micro", "auroc"))
        hidden = [encoder.output_dim] * (num_mlp_layer - 1)
        self.mlp = MLP(encoder.output_dim, hidden + [len(self.task)], batch_norm=mlp_batch_norm, dropout=mlp_dropout)

    predicts_proteins = True

    def metric_names(self) -> List[str]:
        return list(self.metric)

    def scores(self, pred: torch.Tensor) -> torch.Tensor:
        """The probability of each term.

        Args:
            pred: [B, T] logits from `predict`.
        Returns:
            [B, T] probabilities.
        """
        return torch.sigmoid(pred)

    def prediction_columns(self, scores, names, threshold, top):
        """`top_terms` (the `top` best, `term:probability`) and the terms of probability at least `threshold`.

        Args:
            scores: [B, T] probabilities from `scores`.
            names: the T term names.
            threshold, top: the probability a listed term reaches; how many best terms to list.
        Returns:
            (["top_terms", "terms_above_<threshold>"], [[the two cells] of each protein]).
        """
        rows = []
        for row in scores:
            order = torch.argsort(row, descending=True).tolist()
            rows.append([";".join(f"{names[j]}:{row[j]:.4f}" for j in order[:top]),
                         ";".join(names[j] for j in order if row[j] >= threshold)])
        return ["top_terms", f"terms_above_{threshold:g}"], rows

    def predict(self, batch) -> torch.Tensor:
        """One logit per term from the protein feature.

        Args:
            batch: {"graph": ProteinBatch [B proteins, N residues], ...}.
        Returns:
            [B, T] logits.
        """
        return self.in_fp32(self.mlp, self.encoder(batch["graph"])["graph_feature"])

    def target(self, batch) -> torch.Tensor:
        """The term labels.

        Args:
            batch: {"targets": [B, T] 0/1, ...}.
        Returns:
            [B, T] float.
        """
        return batch["targets"].float()

    def loss(self, pred, target) -> torch.Tensor:
        """Binary cross entropy averaged over proteins and terms.

        Args:
            pred: [B, T] logits.
            target: [B, T] 0/1.
        Returns:
            [] the loss.
        """
        return F.binary_cross_entropy_with_logits(pred, target)

    def evaluate(self, pred, target, extra=None) -> Dict[str, float]:
        """The `metric`s over a split.

        Args:
            pred: [B, T] logits of every protein of the split.
            target: [B, T] 0/1.
            extra: not read.
        Returns:
            {metric name: value}.
        """
        out = {}
        for name in self.metric:
            if name == "auroc@micro":
                out[name] = float(metrics.auroc(pred.flatten(), target.flatten()))
            else:
                out[name] = float(metrics.get_metric(name)(pred, target))
        return out


@register
class PropertyPrediction(Task):
    """Per-protein regression (or binary / multi-class classification) from the protein feature.

    Args:
        task: target names (from the dataset at run time); criterion: "mse", "bce" or "ce";
        metric: mae, rmse, spearmanr, pearsonr, auroc, auprc, accuracy — reported as "name [task]";
        normalization: regress on targets standardised with the training split's mean and std (set by
            `preprocess`); predictions are reported in the original scale.
        num_class: classes per task for "ce" (1 for regression and "bce").
    With `target_id` in the batch (PSR: the target protein of each decoy), spearmanr also reports
    "per_target_spearmanr [task]": the mean over targets of the correlation among their decoys.
    DEVIATION: the original reported only the global Spearman.
    """

    extra_keys = ("target_id",)

    def __init__(self, encoder: Encoder, task: Sequence = (), criterion: str = "mse",
                 metric: Sequence[str] = ("mae", "rmse"), num_mlp_layer: int = 1, normalization: bool = True,
                 num_class: Optional[int] = None, mlp_batch_norm: bool = False, mlp_dropout: float = 0.0,
                 verbose: int = 0):
        super().__init__(encoder)
        if criterion not in ("mse", "bce", "ce"):
            raise ValueError(f"PropertyPrediction: criterion must be mse, bce or ce, got {criterion!r}.")
        if not len(task):
            raise ValueError("PropertyPrediction needs its task names (the dataset's targets); the training "
                             "script fills them in from dataset.tasks.")
        self.task = list(task)
        self.criterion = criterion
        self.metric = [metric] if isinstance(metric, str) else list(metric)
        for name in self.metric:
            metrics.get_metric(name)
        self.num_class = int(num_class or 1) if criterion == "ce" else 1
        self.normalization = normalization and criterion == "mse"
        self.register_buffer("mean", torch.zeros(len(self.task)))
        self.register_buffer("std", torch.ones(len(self.task)))
        hidden = [encoder.output_dim] * (num_mlp_layer - 1)
        self.mlp = MLP(encoder.output_dim, hidden + [len(self.task) * self.num_class], batch_norm=mlp_batch_norm,
                       dropout=mlp_dropout)

    def preprocess(self, train_set) -> None:
        """With `normalization`, the mean and std [T] of each target over the labelled proteins of `train_set`."""
        if not self.normalization:
            return
        values = dataset_targets(train_set).double().reshape(-1, len(self.task))
        labeled = ~torch.isnan(values)
        count = labeled.sum(0).clamp(min=1)
        mean = torch.where(labeled, values, 0).sum(0) / count
        var = torch.where(labeled, (values - mean) ** 2, 0).sum(0) / (count - 1).clamp(min=1)
        self.mean.copy_(mean.float())
        self.std.copy_(var.sqrt().clamp(min=1e-6).float())

    predicts_proteins = True

    def scores(self, pred: torch.Tensor) -> torch.Tensor:
        """Values or probabilities.

        Args:
            pred: [B, T] (or [B, T, C] for "ce") from `predict`.
        Returns:
            [B, T] values (regression, in the targets' scale) or probabilities ("bce"); [B, T, C] class
            probabilities ("ce").
        """
        if self.criterion == "bce":
            return torch.sigmoid(pred)
        if self.criterion == "ce":
            return torch.softmax(pred, dim=-1)
        return pred

    def prediction_columns(self, scores, names, threshold, top):
        """One column per target: its value or probability, or ("ce") the most probable class.

        Args:
            scores: [B, T] (or [B, T, C] for "ce") from `scores`.
            names: the T target names.
            threshold, top: not read.
        Returns:
            (the target names, [the T cells of each protein]).
        """
        if self.criterion == "ce":
            return list(names), [[str(c) for c in row.argmax(-1).tolist()] for row in scores]
        return list(names), [[f"{v:.6g}" for v in row.tolist()] for row in scores]

    def metric_names(self) -> List[str]:
        names = []
        for name in self.task:
            names += [f"{metric} [{name}]" for metric in self.metric]
            names += [f"per_target_spearmanr [{name}]"] if "spearmanr" in self.metric else []
        return names

    def predict(self, batch) -> torch.Tensor:
        """The head's outputs from the protein feature.

        Args:
            batch: {"graph": ProteinBatch [B proteins, N residues], ...}.
        Returns:
            [B, T] values in the targets' scale ("mse", de-normalised) or logits ("bce"); [B, T, C] logits
            ("ce").
        """
        pred = self.in_fp32(self.mlp, self.encoder(batch["graph"])["graph_feature"])
        if self.criterion == "ce":
            return pred.view(len(pred), len(self.task), self.num_class)
        return pred * self.std + self.mean if self.normalization else pred

    def target(self, batch) -> torch.Tensor:
        """The targets.

        Args:
            batch: {"targets": [B, T] (or [B] with one target), ...}.
        Returns:
            [B, T] float (class indices for "ce"), NaN where a label is missing.
        """
        return batch["targets"].float().reshape(len(batch["targets"]), len(self.task))

    def loss(self, pred, target) -> torch.Tensor:
        """The `criterion` on the labelled entries, averaged per target, then over targets ("mse" on standardised
        values).

        Args:
            pred: [B, T] (or [B, T, C] for "ce") from `predict`.
            target: [B, T], NaN where a label is missing.
        Returns:
            [] the loss.
        """
        labeled = ~torch.isnan(target)
        if self.criterion == "mse":
            error = F.mse_loss((pred - self.mean) / self.std, (target - self.mean) / self.std, reduction="none")
        elif self.criterion == "bce":
            error = F.binary_cross_entropy_with_logits(pred, target.nan_to_num(0), reduction="none")
        else:
            error = F.cross_entropy(pred.flatten(0, 1), target.nan_to_num(0).long().flatten(),
                                    reduction="none").view_as(target)
        error = torch.where(labeled, error, torch.zeros_like(error))
        return (error.sum(0) / labeled.sum(0).clamp(min=1)).mean()

    def evaluate(self, pred, target, extra=None) -> Dict[str, float]:
        """The `metric`s of each target over its labelled proteins ("metric [target]").

        Args:
            pred: [B, T] (or [B, T, C] for "ce") of every protein of the split.
            target: [B, T], NaN where a label is missing.
            extra: {"target_id": the target protein of each of the B proteins} for per-target Spearman (PSR).
        Returns:
            {metric name: value}.
        """
        out = {}
        groups = (extra or {}).get("target_id")
        for t, name in enumerate(self.task):
            labeled = ~torch.isnan(target[:, t])
            p, y = pred[:, t][labeled], target[:, t][labeled]
            for metric in self.metric:
                out[f"{metric} [{name}]"] = float(metrics.get_metric(metric)(p, y))
            if groups is not None and "spearmanr" in self.metric:
                kept = [g for g, keep in zip(groups, labeled.tolist()) if keep]
                out[f"per_target_spearmanr [{name}]"] = float(metrics.per_target_spearmanr(p, y, kept))
        return out
