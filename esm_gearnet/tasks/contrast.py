"""Sequence–structure contrastive pre-training (the JESPR objective, CLIP-style).

Each protein's pooled ESM embedding (mean over its residues, special tokens excluded) and pooled structure
embedding go through their own projection head (Linear → Tanh → Linear to `embedding_dim`, LayerNorm) and are
L2-normalised. logits = exp(logit_scale) · S Tᵀ, with logit_scale initialised at log(1/temperature), learnable
or fixed, and exp(logit_scale) clamped at 100. The loss is the mean of the cross entropies in both directions
with the matching protein as the target. Under DDP the embeddings of every rank are gathered with their
gradients, so the negatives span the global batch.

Shapes: B proteins (of this rank's batch), N residues, D the width of the joint space (`embedding_dim`).
"""
from __future__ import annotations

import math
import torch
from torch import nn
from torch.nn import functional as F

from .. import distributed
from ..models import Encoder
from ..registry import register
from .base import Task


def projection_head(input_dim: int, embedding_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(input_dim, input_dim), nn.Tanh(), nn.Linear(input_dim, embedding_dim),
                         nn.LayerNorm(embedding_dim))


def clip_loss(sequence: torch.Tensor, structure: torch.Tensor, scale: torch.Tensor):
    """The symmetric InfoNCE of this rank's embeddings against those of all ranks.

    Args:
        sequence: [B, D] this rank's normalised sequence embeddings.
        structure: [B, D] the structure embeddings of the same proteins.
        scale: [] the logit scale (exp(logit_scale), clamped).
    Returns:
        (loss [], sequence→structure top-1 accuracy [], structure→sequence top-1 accuracy []).
    """
    all_sequence, start = distributed.all_gather_with_grad(sequence)
    all_structure, _ = distributed.all_gather_with_grad(structure)
    labels = torch.arange(start, start + len(sequence), device=sequence.device)
    seq_to_struct = scale * sequence @ all_structure.t()
    struct_to_seq = scale * structure @ all_sequence.t()
    loss = (F.cross_entropy(seq_to_struct, labels) + F.cross_entropy(struct_to_seq, labels)) / 2
    return loss, (seq_to_struct.argmax(-1) == labels).float().mean(), (struct_to_seq.argmax(-1) == labels).float().mean()


@register
class SequenceStructureContrast(Task):
    """Align the ESM and structure-encoder embeddings of the same protein.

    Args:
        encoder: an `Encoder` whose sequence and structure parts are computed independently
            (`independent_parts`: a FusionNetwork with fusion: parallel); if the structure part read ESM's
            features, the task would be trivial.
        embedding_dim: width of the joint space; temperature: initial temperature;
        learnable_temperature: learn logit_scale.
    """

    max_scale = 100.0

    def __init__(self, encoder: Encoder, embedding_dim: int = 256, temperature: float = 0.07,
                 learnable_temperature: bool = True, verbose: int = 0):
        super().__init__(encoder)
        parts = encoder.independent_parts()
        if not {"sequence", "structure"} <= set(parts):
            raise ValueError("SequenceStructureContrast needs task.model to be a FusionNetwork with fusion: "
                             "parallel, so that the structure encoder does not read ESM's features.")
        self.sequence_head = projection_head(parts["sequence"], embedding_dim)
        self.structure_head = projection_head(parts["structure"], embedding_dim)
        init = torch.tensor(math.log(1 / temperature))
        if learnable_temperature:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)

    def embed(self, graph):
        """The normalised embeddings of a raw batch.

        Args:
            graph: ProteinBatch [B proteins, N residues], before graph construction.
        Returns:
            (sequence [B, D], structure [B, D]), each row of unit norm.
        """
        output = self.encoder(graph)
        return (F.normalize(self.sequence_head(output["sequence_graph_feature"]), dim=-1),
                F.normalize(self.structure_head(output["structure_graph_feature"]), dim=-1))

    def forward(self, batch):
        """Symmetric InfoNCE of the proteins' sequence and structure embeddings [B, D].

        Args:
            batch: {"graph": ProteinBatch [B proteins, N residues], ...}.
        Returns:
            (loss [], {"loss", "sequence_to_structure_accuracy", "structure_to_sequence_accuracy",
            "logit_scale"}: each [] without gradient).
        """
        sequence, structure = self.embed(batch["graph"])
        scale = self.logit_scale.exp().clamp(max=self.max_scale)
        loss, seq_acc, struct_acc = clip_loss(sequence, structure, scale)
        return loss, {"loss": loss.detach(), "sequence_to_structure_accuracy": seq_acc,
                      "structure_to_sequence_accuracy": struct_acc, "logit_scale": scale.detach()}


__all__ = ["SequenceStructureContrast", "clip_loss", "projection_head"]
