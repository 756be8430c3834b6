"""FusionNetwork: an ESM sequence model and a structure encoder, fused in series, in parallel or by
cross-attention, with the original's module names (`sequence_model`, `structure_model`, `seq_linear`,
`struct_linear`, `attn.{query,key,value,attn}`), so its checkpoints load directly."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ..data import constants
from ..data.protein import ProteinBatch
from ..layers import functional
from ..registry import register


def residue_one_hot(batch: ProteinBatch) -> torch.Tensor:
    """[N, 21] one-hot residue type (index 20 = unknown): the structure input of parallel and cross fusion."""
    return nn.functional.one_hot(batch.residue_type, constants.NUM_RESIDUE_TYPES + 1).float()


class SelfAttentionBlock(nn.Module):
    """Query, key and value maps, then `nn.MultiheadAttention` with a key padding mask; no residual, no norm."""

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.query = nn.Linear(hidden_dim, hidden_dim)
        self.key = nn.Linear(hidden_dim, hidden_dim)
        self.value = nn.Linear(hidden_dim, hidden_dim)
        self.attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: [B, L, D], mask: [B, L] True on real positions -> [B, L, D]."""
        return self.attn(self.query(x), self.key(x), self.value(x), key_padding_mask=~mask, need_weights=False)[0]


@register
class FusionNetwork(nn.Module):
    """Sequence model + structure model.

    Args:
        sequence_model: an `ESM` (or any model returning residue_feature / graph_feature).
        structure_model: GearNet, GVPGNN, CDConv, ...
        fusion: "series" (= "serial": ESM residue features are the structure input), "parallel" (the structure
            encoder reads the 21-dim one-hot residue types; both outputs concatenated) or "cross" (both
            projected to `cross_dim`, concatenated along each protein's sequence, one self-attention block).
        cross_dim: width of the cross-fusion projections.
    Forward:
        batch: ProteinBatch after graph construction; input: [N, 21] one-hot (computed when omitted);
        residue_mask: [N] bool, residues hidden from ESM (its `<mask>` token).
        Returns residue_feature [N, output_dim], graph_feature [B, output_dim].
    """

    def __init__(self, sequence_model: nn.Module, structure_model: nn.Module, fusion: str = "series",
                 cross_dim: Optional[int] = None):
        super().__init__()
        fusion = "series" if fusion in (None, "serial") else fusion
        if fusion not in ("series", "parallel", "cross"):
            raise ValueError(f"FusionNetwork: unknown fusion {fusion!r}; choose series, parallel or cross.")
        self.sequence_model = sequence_model
        self.structure_model = structure_model
        self.fusion = fusion
        structure_input = getattr(structure_model, "input_dim", None)
        expected = sequence_model.output_dim if fusion == "series" else constants.NUM_RESIDUE_TYPES + 1
        if structure_input is not None and structure_input != expected:
            why = (f"the sequence model's output width ({type(sequence_model).__name__} gives {expected})"
                   if fusion == "series" else "the 21-dim one-hot residue types")
            raise ValueError(f"FusionNetwork ({fusion} fusion): the structure model's input_dim is "
                             f"{structure_input} but it reads {why}; set structure_model.input_dim: {expected}.")
        if fusion == "cross":
            if not cross_dim:
                raise ValueError("FusionNetwork: cross fusion needs cross_dim (the original used 512).")
            self.seq_linear = nn.Linear(sequence_model.output_dim, cross_dim)
            self.struct_linear = nn.Linear(structure_model.output_dim, cross_dim)
            self.attn = SelfAttentionBlock(cross_dim, num_heads=8, dropout=0.1)
            self.output_dim = 2 * cross_dim
        else:
            self.output_dim = sequence_model.output_dim + structure_model.output_dim

    def forward(self, batch: ProteinBatch, input: Optional[torch.Tensor] = None,
                residue_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        if input is None:
            input = residue_one_hot(batch)
        sequence = self.sequence_model(batch, input, residue_mask=residue_mask)
        structure_input = sequence["residue_feature"] if self.fusion == "series" else input
        structure = self.structure_model(batch, structure_input)
        if self.fusion != "cross":
            return {
                "residue_feature": torch.cat([sequence["residue_feature"], structure["residue_feature"]], -1),
                "graph_feature": torch.cat([sequence["graph_feature"], structure["graph_feature"]], -1),
            }
        # per protein b: [its L_b sequence rows, its L_b structure rows] -> one padded sequence of 2 L_b
        seq = self.seq_linear(sequence["residue_feature"])
        struct = self.struct_linear(structure["residue_feature"])
        position = functional.position_in_segment(batch.num_residues, batch.residue2graph)
        length = int(batch.num_residues.max()) if batch.batch_size else 0
        padded = seq.new_zeros(batch.batch_size, 2 * length, seq.shape[-1])
        padded[batch.residue2graph, position] = seq
        struct_column = position + batch.num_residues[batch.residue2graph]
        padded[batch.residue2graph, struct_column] = struct
        mask = torch.arange(2 * length, device=seq.device) < 2 * batch.num_residues.unsqueeze(-1)
        attended = self.attn(padded, mask)
        residue_feature = torch.cat([attended[batch.residue2graph, position],
                                     attended[batch.residue2graph, struct_column]], -1)
        graph_feature = functional.segment_sum(residue_feature, batch.residue2graph, batch.batch_size)
        return {"residue_feature": residue_feature, "graph_feature": graph_feature}
