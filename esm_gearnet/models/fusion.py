"""FusionNetwork: an ESM sequence model and a structure encoder, fused in series, in parallel or by
cross-attention, with the original's module names (`sequence_model`, `structure_model`, `seq_linear`,
`struct_linear`, `attn.{query,key,value,attn}`), so its checkpoints load directly."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from ..data.protein import ProteinBatch
from ..layers import functional
from ..registry import register
from .encoder import ONE_HOT_DIM, Encoder, Features, StructureEncoder


class SelfAttentionBlock(nn.Module):
    """Query, key and value maps, then `nn.MultiheadAttention` with a key padding mask; no residual, no norm."""

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.query = nn.Linear(hidden_dim, hidden_dim)
        self.key = nn.Linear(hidden_dim, hidden_dim)
        self.value = nn.Linear(hidden_dim, hidden_dim)
        self.attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Self-attention over padded sequences (in cross fusion L = twice the longest protein).

        Args:
            x: [B, L, D] padded features.
            mask: [B, L] bool, True on real positions.
        Returns:
            [B, L, D]
        """
        return self.attn(self.query(x), self.key(x), self.value(x), key_padding_mask=~mask, need_weights=False)[0]


@register
class FusionNetwork(Encoder):
    """Sequence model + structure model, one encoder.

    Args:
        sequence_model: an `ESM`.
        structure_model: a `StructureEncoder` (GearNet, GVPGNN, CDConv).
        fusion: "series" (= "serial": ESM residue features are the structure input), "parallel" (the structure
            encoder reads the 21-dim one-hot residue types; both outputs concatenated) or "cross" (both
            projected to `cross_dim`, concatenated along each protein's sequence, one self-attention block).
        cross_dim: width of the cross-fusion projections.
        graph_construction_model: the residue graph of the structure model (see `Encoder`).
    `encode(graph, residue_mask)` returns residue_feature [N, output_dim], graph_feature [B, output_dim]; in
    series and parallel fusion also sequence_graph_feature and structure_graph_feature. `residue_mask` rows get
    ESM's `<mask>` token and, outside series fusion, a zero structure input.
    """

    small_config = {"cross_dim": 16}

    def __init__(self, sequence_model: Encoder, structure_model: StructureEncoder, fusion: str = "series",
                 cross_dim: Optional[int] = None, graph_construction_model: Optional[nn.Module] = None):
        super().__init__(graph_construction_model)
        fusion = self.fusion_mode(fusion)
        self.sequence_model = sequence_model
        self.structure_model = structure_model
        self.fusion = fusion
        expected = self.structure_input_dim(fusion, sequence_model.output_dim)
        if structure_model.input_dim != expected:
            why = (f"the sequence model's output width ({type(sequence_model).__name__} gives {expected})"
                   if fusion == "series" else "the 21-dim one-hot residue types")
            raise ValueError(f"FusionNetwork ({fusion} fusion): the structure model's input_dim is "
                             f"{structure_model.input_dim} but it reads {why}; set structure_model.input_dim: "
                             f"{expected} or leave it out.")
        if fusion == "cross":
            if not cross_dim:
                raise ValueError("FusionNetwork: cross fusion needs cross_dim (the original used 512).")
            self.seq_linear = nn.Linear(sequence_model.output_dim, cross_dim)
            self.struct_linear = nn.Linear(structure_model.output_dim, cross_dim)
            self.attn = SelfAttentionBlock(cross_dim, num_heads=8, dropout=0.1)
            self.output_dim = 2 * cross_dim
        else:
            self.output_dim = sequence_model.output_dim + structure_model.output_dim

    @property
    def reads_three_di(self) -> bool:
        return self.sequence_model.reads_three_di

    @staticmethod
    def fusion_mode(fusion: Optional[str]) -> str:
        """"series", "parallel" or "cross" (the config may say "serial" or nothing for series)."""
        fusion = "series" if fusion in (None, "serial") else fusion
        if fusion not in ("series", "parallel", "cross"):
            raise ValueError(f"FusionNetwork: unknown fusion {fusion!r}; choose series, parallel or cross.")
        return fusion

    @staticmethod
    def structure_input_dim(fusion: str, sequence_dim: int) -> int:
        """Width of the structure model's input: ESM's features in series fusion, else the one-hot types."""
        return sequence_dim if fusion == "series" else ONE_HOT_DIM

    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        sequence = self.sequence_model.parameter_groups()  # an ESM with LoRA adds its adapters as "lora"
        groups = {"sequence_model": sequence.pop(self.sequence_model.group), **sequence,
                  "structure_model": list(self.structure_model.parameters())}
        if self.fusion == "cross":
            groups["fusion"] = [p for m in (self.seq_linear, self.struct_linear, self.attn) for p in m.parameters()]
        return groups

    def freeze(self, group: str) -> None:
        parts = {"sequence_model": (self.sequence_model, self.sequence_model.group),
                 "lora": (self.sequence_model, "lora"),  # an ESM's LoRA adapters
                 "structure_model": (self.structure_model, self.structure_model.group)}
        if group in parts and group in self.parameter_groups():
            part, its_group = parts[group]
            part.freeze(its_group)  # the part knows what freezing means for it (ESM: no autograd, its cache)
            self.frozen.add(group)
        else:
            super().freeze(group)

    def shard_units(self):
        """The sequence model's units and the structure encoder, entered through `network` (what fusion calls);
        the cross-fusion projections stay with the task."""
        return [*self.sequence_model.shard_units(), (self.structure_model, ("network",))]

    def independent_parts(self) -> Dict[str, int]:
        if self.fusion != "parallel":  # series: the structure model reads ESM; cross: the parts are mixed
            return {}
        return {"sequence": self.sequence_model.output_dim, "structure": self.structure_model.output_dim}

    def encode(self, graph: ProteinBatch, residue_mask: Optional[torch.Tensor] = None) -> Features:
        """Both models' features of a constructed graph.

        Args:
            graph: constructed ProteinBatch [B proteins, N residues] (`construct`).
            residue_mask: [N] bool (optional), residues hidden from both models.
        Returns:
            series and parallel: residue_feature [N, D_seq + D_struct] and graph_feature [B, D_seq + D_struct]
            (the two concatenated), with sequence_graph_feature [B, D_seq] and structure_graph_feature
            [B, D_struct]; cross: residue_feature [N, 2 * cross_dim] and graph_feature [B, 2 * cross_dim].
        """
        sequence = self.sequence_model.encode(graph, residue_mask)
        if self.fusion == "series":
            structure = self.structure_model.network(graph, sequence["residue_feature"])
        else:
            structure = self.structure_model.encode(graph, residue_mask)
        if self.fusion != "cross":
            return {
                "residue_feature": torch.cat([sequence["residue_feature"], structure["residue_feature"]], -1),
                "graph_feature": torch.cat([sequence["graph_feature"], structure["graph_feature"]], -1),
                "sequence_graph_feature": sequence["graph_feature"],
                "structure_graph_feature": structure["graph_feature"],
            }
        # per protein b: [its L_b sequence rows, its L_b structure rows] -> one padded sequence of 2 L_b
        seq = self.seq_linear(sequence["residue_feature"])
        struct = self.struct_linear(structure["residue_feature"])
        position = functional.position_in_segment(graph.num_residues, graph.residue2graph)
        length = int(graph.num_residues.max()) if graph.batch_size else 0
        padded = seq.new_zeros(graph.batch_size, 2 * length, seq.shape[-1])
        padded[graph.residue2graph, position] = seq
        struct_column = position + graph.num_residues[graph.residue2graph]
        padded[graph.residue2graph, struct_column] = struct
        mask = torch.arange(2 * length, device=seq.device) < 2 * graph.num_residues.unsqueeze(-1)
        attended = self.attn(padded, mask)
        residue_feature = torch.cat([attended[graph.residue2graph, position],
                                     attended[graph.residue2graph, struct_column]], -1)
        graph_feature = functional.segment_sum(residue_feature, graph.residue2graph, graph.batch_size)
        return {"residue_feature": residue_feature, "graph_feature": graph_feature}
