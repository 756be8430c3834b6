"""`MSP`: mutation stability from a wild-type / mutant pair of structures."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch.nn import functional as F

from .. import metrics
from ..layers import MLP, functional
from ..models import Encoder
from ..registry import register
from .base import Task


@register
class MSP(Task):
    """One shared encoder on the wild type (`graph1`) and the mutant (`graph2`); each side's residue features
    are averaged over the mutated positions (where the residue types differ), concatenated, passed through an
    MLP; binary cross entropy. Metrics "auroc [label]" and "auprc [label]".

    Args:
        encoder: the `Encoder`, run on both structures; task: target names (["label"], from the dataset);
        num_mlp_layer: MLP depth.
    """

    def __init__(self, encoder: Encoder, task=("label",), num_mlp_layer: int = 1, verbose: int = 0):
        super().__init__(encoder)
        self.task = list(task) if not isinstance(task, str) else [task]
        hidden = [encoder.output_dim] * (num_mlp_layer - 1)
        self.mlp = MLP(2 * encoder.output_dim, hidden + [1])

    def metric_names(self) -> List[str]:
        return [f"auroc [{self.task[0]}]", f"auprc [{self.task[0]}]"]

    def _mutated_mean(self, graph, mutated) -> torch.Tensor:
        feature = self.encoder(graph)["residue_feature"]
        mask = mutated.unsqueeze(-1).to(feature.dtype)
        total = functional.segment_sum(feature * mask, graph.residue2graph, graph.batch_size)
        count = functional.segment_sum(mask, graph.residue2graph, graph.batch_size)
        return total / (count + 1e-10)

    def predict(self, batch) -> torch.Tensor:
        """The logit that the mutation stabilises, from both structures.

        Args:
            batch: {"graph1": ProteinBatch [B proteins, N residues] (wild types), "graph2": ProteinBatch [B, N]
                (mutants, the same residue counts), ...}.
        Returns:
            [B, 1] logits.
        """
        wild, mutant = batch["graph1"], batch["graph2"]
        if wild.num_residue != mutant.num_residue or not torch.equal(wild.num_residues, mutant.num_residues):
            raise ValueError("MSP: the wild-type and mutant structures of a pair must have the same residues "
                             "(same lengths); check the dataset's pairing or TruncateProteinPair.")
        mutated = wild.residue_type != mutant.residue_type
        pair = torch.cat([self._mutated_mean(wild, mutated), self._mutated_mean(mutant, mutated)], -1)
        return self.in_fp32(self.mlp, pair)

    def target(self, batch) -> torch.Tensor:
        """The labels.

        Args:
            batch: {"targets": [B, 1] (or [B]) 0/1, ...}.
        Returns:
            [B, 1] float.
        """
        return batch["targets"].float().reshape(-1, 1)

    def loss(self, pred, target) -> torch.Tensor:
        """Binary cross entropy.

        Args:
            pred: [B, 1] logits.
            target: [B, 1] 0/1.
        Returns:
            [] the loss.
        """
        return F.binary_cross_entropy_with_logits(pred, target)

    def evaluate(self, pred, target, extra=None) -> Dict[str, float]:
        """AUROC and AUPRC over a split.

        Args:
            pred: [B, 1] logits of every pair of the split.
            target: [B, 1] 0/1.
            extra: not read.
        Returns:
            {"auroc [label]": value, "auprc [label]": value}.
        """
        name = self.task[0]
        return {f"auroc [{name}]": float(metrics.auroc(pred, target)),
                f"auprc [{name}]": float(metrics.auprc(pred, target))}
