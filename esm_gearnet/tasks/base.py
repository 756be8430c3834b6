"""What every task shares: an encoder (`models.Encoder`) and a head, the (loss, logged values) contract.

Shapes: B proteins (of a batch; in `evaluate`, of a whole split), N residues, D channels, T targets per protein
(a task's terms or properties), C classes per target (classification with cross entropy).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..models import Encoder
from ..registry import names_of


class Task(nn.Module):
    """An encoder and a head. The encoder's weights are what `--ckpt` and `embed` read; the state_dict keys of
    the task are `encoder.*` and the head's own.

    Fine-tuning subclasses define `predict(batch) -> [B, T]`, `target(batch) -> [B, T]`, `loss(pred, target)` and
    `evaluate(pred, target, extra) -> {name: value}`; `forward(batch)` returns (loss, {"loss": value}).
    Pre-training objectives override `forward`. Tasks that predict one row per protein (`predicts_proteins`) also
    say what their outputs mean to a user: `scores` and `prediction_columns` (the `predict` command's CSV).
    """

    #: batch keys (besides tensors) that evaluation gathers and hands to `evaluate`
    extra_keys: Sequence[str] = ()
    #: whether `predict(batch)` gives one row per protein that `scores` and `prediction_columns` turn into what
    #: the `predict` command writes
    predicts_proteins: bool = False

    def __init__(self, encoder: Encoder):
        super().__init__()
        if not isinstance(encoder, Encoder):
            raise TypeError(f"{type(self).__name__} needs an Encoder ({', '.join(names_of(Encoder))}), "
                            f"got {type(encoder).__name__}.")
        self.encoder = encoder

    @staticmethod
    def in_fp32(head: nn.Module, feature: torch.Tensor) -> torch.Tensor:
        """`head(feature)` in fp32, also under bf16/fp16 autocast: the scores that metrics rank keep fp32
        precision. bf16 logits carry about three significant digits, and the ties they make lower tie-aware
        `f1_max` and `auprc@micro`. The head is a small MLP, so this costs next to nothing.

        Args:
            head: the module to run.
            feature: [B, D] protein features (any dtype).
        Returns:
            [B, T] (or whatever `head` makes of [B, D]) in fp32.
        """
        with torch.autocast(feature.device.type, enabled=False):
            return head(feature.float())

    def metric_names(self) -> Optional[List[str]]:
        """The names `evaluate` reports, in order (the first is the default selection metric); None if unknown."""
        return None

    def preprocess(self, train_set) -> None:
        """Statistics taken from the training split (e.g. target normalisation); nothing by default."""

    def predict(self, batch: Dict[str, Any]) -> torch.Tensor:
        """The head's raw outputs for a batch of B proteins.

        Args:
            batch: {"graph": ProteinBatch [B proteins, N residues], "targets": [B, T], ...} as the dataset's
                items collate.
        Returns:
            [B, T] (or [B, T, C] for classes).
        """
        raise NotImplementedError

    def target(self, batch: Dict[str, Any]) -> torch.Tensor:
        """The targets of a batch.

        Args:
            batch: {"targets": [B, T], ...}.
        Returns:
            [B, T] float, NaN where a label is missing.
        """
        raise NotImplementedError

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss.

        Args:
            pred: [B, T] (or [B, T, C]) from `predict`.
            target: [B, T] from `target`.
        Returns:
            [] the loss.
        """
        raise NotImplementedError

    def evaluate(self, pred: torch.Tensor, target: torch.Tensor, extra: Optional[Dict[str, Any]] = None
                 ) -> Dict[str, float]:
        """The metrics over a whole split.

        Args:
            pred: [B, T] (or [B, T, C]) over every protein of the split.
            target: [B, T].
            extra: the gathered `extra_keys`, {key: one entry per protein}.
        Returns:
            {metric name: value}.
        """
        raise NotImplementedError

    def scores(self, pred: torch.Tensor) -> torch.Tensor:
        """What `predict`'s output means to a user: probabilities or values.

        Args:
            pred: [B, T] (or [B, T, C]) from `predict`.
        Returns:
            [B, T] (or [B, T, C]), the shape of `pred`.
        """
        return pred

    def prediction_columns(self, scores: torch.Tensor, names: Sequence[str], threshold: float,
                           top: int) -> Tuple[List[str], List[List[str]]]:
        """The columns of the `predict` command's CSV after its id, file, chains and length columns.

        Args:
            scores: [B, T] (or [B, T, C]) from `scores`.
            names: the T target names of the dataset.
            threshold, top: the command's options (terms above a probability, the best terms).
        Returns:
            (column names, [the cells of each protein]).
        """
        raise NotImplementedError(f"{type(self).__name__} does not predict one row per protein.")

    def forward(self, batch: Dict[str, Any]):
        """`loss` of `predict` against `target`.

        Args:
            batch: {"graph": ProteinBatch [B proteins, N residues], "targets": [B, T], ...}.
        Returns:
            (loss [], {"loss": [] detached}).
        """
        loss = self.loss(self.predict(batch), self.target(batch))
        return loss, {"loss": loss.detach()}


def dataset_targets(dataset) -> torch.Tensor:
    """The targets of a dataset (or a `torch.utils.data.Subset` of one), without loading structures when the
    dataset offers `targets` (a tensor), else by reading every item.

    Args:
        dataset: a dataset whose items hold "targets" [T].
    Returns:
        [B, T] with B the proteins of the dataset.
    """
    if isinstance(dataset, torch.utils.data.Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if isinstance(targets, torch.Tensor):
        return targets
    return torch.stack([torch.as_tensor(dataset[i]["targets"]) for i in range(len(dataset))])
