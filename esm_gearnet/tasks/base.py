"""What every fine-tuning task shares: graph construction on the device, the encoder call, evaluation."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from ..data.protein import ProteinBatch
from ..models.fusion import residue_one_hot


class Task(nn.Module):
    """A model, an optional graph construction applied inside the task (on the batch's device), and a head.

    Subclasses define `predict(batch) -> [B, T]`, `target(batch) -> [B, T]`, `loss(pred, target)` and
    `evaluate(pred, target, extra) -> {name: value}`. `forward(batch)` returns (loss, {"loss": value}).
    """

    #: batch keys (besides tensors) that evaluation gathers and hands to `evaluate`
    extra_keys: Sequence[str] = ()

    def __init__(self, model: nn.Module, graph_construction_model: Optional[nn.Module] = None):
        super().__init__()
        self.model = model
        self.graph_construction_model = graph_construction_model

    @property
    def encoder(self) -> nn.Module:
        """The model whose weights are saved for fine-tuning (pre-training objectives may wrap it)."""
        return self.model

    def encode(self, graph: ProteinBatch) -> Dict[str, torch.Tensor]:
        """Graph construction, then the model on the one-hot residue types (FusionNetwork feeds ESM itself)."""
        if self.graph_construction_model is not None:
            graph = self.graph_construction_model(graph)
        return self.model(graph, residue_one_hot(graph))

    def preprocess(self, train_set) -> None:
        """Statistics taken from the training split (e.g. target normalisation); nothing by default."""

    def forward(self, batch: Dict[str, Any]):
        loss = self.loss(self.predict(batch), self.target(batch))
        return loss, {"loss": loss.detach()}


def dataset_targets(dataset) -> torch.Tensor:
    """[n, T] targets of a dataset (or a `torch.utils.data.Subset` of one) without loading structures when
    the dataset offers `targets` (a tensor), else by reading every item."""
    if isinstance(dataset, torch.utils.data.Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if isinstance(targets, torch.Tensor):
        return targets
    return torch.stack([torch.as_tensor(dataset[i]["targets"]) for i in range(len(dataset))])
