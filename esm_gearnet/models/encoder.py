"""The encoder contract: what every model (ESM, GearNet, GVP-GNN, CDConv, FusionNetwork) offers to the tasks,
pre-training objectives, `embed` and `predict`.

An encoder owns its graph construction, its input featurisation and its network:

====================================  ==========================================================================
member                                meaning
====================================  ==========================================================================
output_dim                            D of its features
construct(batch) -> batch             the residue graph (the config's `graph_construction_model`); the batch
                                      unchanged when the encoder needs none (ESM, CDConv)
encode(graph, residue_mask=None)      features of a constructed graph: {"residue_feature": [N, D],
                                      "graph_feature": [B, D]}; `residue_mask` [N] bool hides residues
                                      (ESM's `<mask>` token, a zero one-hot structure input)
forward(batch, residue_mask=None)     encode(construct(batch), residue_mask)
parameter_groups() -> {name: params}  named parts a config may train at their own rate or freeze
                                      ("sequence_model", "structure_model", "fusion"); each parameter once
freeze(group)                         no gradient, no optimizer state for that group (a frozen ESM also runs
                                      without autograd and may cache its features)
independent_parts() -> {name: D}      parts of the output computed from disjoint inputs, returned as
                                      "<name>_graph_feature" too (parallel fusion: sequence and structure)
reads_three_di                        whether `encode` reads the residues' Foldseek 3Di states (a SaProt-format
                                      ESM, alone or fused); it takes them from the batch (`three_di_state`)
                                      or computes them from the batch's atoms
====================================  ==========================================================================

Pre-training objectives that edit the graph (remove edges, add noise after construction) call `construct`, edit
the result and call `encode`; everyone else calls the encoder itself. Objectives that mask residues
(`tasks.pretrain.mask_residues`) give an encoder that `reads_three_di` the states of the structure before
masking, as SaProt keeps a masked residue's structure token.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from ..data import constants
from ..data.protein import ProteinBatch

Features = Dict[str, torch.Tensor]
ONE_HOT_DIM = constants.NUM_RESIDUE_TYPES + 1  # 20 amino acids and unknown


class Encoder(nn.Module):
    """Base class of every encoder (see the module docstring).

    Args:
        graph_construction_model: builds the residue graph from a packed batch (None: none needed).
    """

    output_dim: int
    #: the parameter group holding all of this encoder's parameters (composite encoders override
    #: `parameter_groups`)
    group: str = "structure_model"
    #: see the module docstring (an ESM of SaProt's vocabulary sets it)
    reads_three_di: bool = False
    #: config arguments that make a small model of this kind (random weights, narrow layers): the config-matrix
    #: test builds every config under config/ with them, so a new encoder is tested once it has a config
    small_config: Dict[str, Any] = {}

    def __init__(self, graph_construction_model: Optional[nn.Module] = None):
        super().__init__()
        self.graph_construction_model = graph_construction_model
        self.frozen: Set[str] = set()

    def construct(self, batch: ProteinBatch) -> ProteinBatch:
        """The batch with its residue graph; a new object, the input is not changed.

        Args:
            batch: ProteinBatch [B proteins, N residues].
        Returns:
            ProteinBatch [B, N] with `edge_list` [E, 3] (source, target, relation), `num_relation` R and
            `edge_feature` [E, De] where the graph construction makes edge features; `batch` itself when the
            encoder has no graph construction model (ESM; CDConv builds its own graphs).
        """
        return batch if self.graph_construction_model is None else self.graph_construction_model(batch)

    def encode(self, graph: ProteinBatch, residue_mask: Optional[torch.Tensor] = None) -> Features:
        """Features of a constructed graph (`construct`).

        Args:
            graph: a constructed batch [B proteins, N residues] (`construct`).
            residue_mask: [N] bool (optional), residues hidden from the encoder.
        Returns:
            {"residue_feature": [N, D], "graph_feature": [B, D]} (and "<part>_graph_feature" [B, D_part] for each
            of `independent_parts`).
        """
        raise NotImplementedError

    def forward(self, batch: ProteinBatch, residue_mask: Optional[torch.Tensor] = None) -> Features:
        """`encode(construct(batch), residue_mask)`.

        Args:
            batch: ProteinBatch [B proteins, N residues], before graph construction.
            residue_mask: [N] bool (optional), residues hidden from the encoder.
        Returns:
            {"residue_feature": [N, D], "graph_feature": [B, D], ...} as `encode`.
        """
        return self.encode(self.construct(batch), residue_mask)

    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        return {self.group: list(self.parameters())}

    def freeze(self, group: str) -> None:
        groups = self.parameter_groups()
        if group not in groups:
            raise ValueError(f"{type(self).__name__} has no {group} to freeze or scale; its parameter groups are "
                             f"{', '.join(groups)}.")
        for parameter in groups[group]:
            parameter.requires_grad_(False)
        self.frozen.add(group)

    def independent_parts(self) -> Dict[str, int]:
        return {}

    def shard_units(self) -> List[Tuple[nn.Module, Tuple[str, ...]]]:
        """[(module, the methods other than `forward` it is entered through)]: what `engine.strategy: fsdp` shards
        as units (`sharding.shard`; the task holds the rest). By default the encoder is one unit."""
        return [(self, ())]


def residue_one_hot(graph: ProteinBatch, residue_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The input of a structure encoder that does not read ESM's features.

    Args:
        graph: ProteinBatch [B proteins, N residues].
        residue_mask: [N] bool (optional), the rows to set to zero.
    Returns:
        [N, 21] float one-hot residue type (index 20 = unknown), zero on the rows of `residue_mask`.
    """
    one_hot = nn.functional.one_hot(graph.residue_type, ONE_HOT_DIM).float()
    if residue_mask is not None:
        one_hot = one_hot.masked_fill(residue_mask.unsqueeze(-1), 0.0)
    return one_hot


class StructureEncoder(Encoder):
    """A network over the residues of a (constructed) graph, from per-residue input features.

    Alone, or beside ESM (parallel and cross fusion), it reads the 21-dim one-hot residue types; in series
    fusion, ESM's residue features (`FusionNetwork` calls `network` with them).
    """

    #: where the config holds the width of the input features (derived by `assembly`, not written by hand)
    input_dim_key: tuple = ("input_dim",)
    #: the config key of the number of edge relations, for encoders that read them (derived from the graph)
    relation_key: Optional[str] = None
    #: whether `network` reads the residue graph's edges (then the config needs a graph construction)
    needs_graph: bool = False
    input_dim: int

    @staticmethod
    def input_dim_value(width: int) -> Any:
        """The config value at `input_dim_key[0]` that gives an input of `width` features: what `assembly` writes
        when the config leaves the key out."""
        return width

    def network(self, graph: ProteinBatch, input: torch.Tensor) -> Features:
        """Features of the graph from per-residue input features.

        Args:
            graph: constructed ProteinBatch [B proteins, N residues] (`edge_list` [E, 3] where `needs_graph`).
            input: [N, input_dim] the one-hot residue types [N, 21], or ESM's residue features [N, D_esm] in
                series fusion.
        Returns:
            {"residue_feature": [N, D], "graph_feature": [B, D]} (D = `output_dim`), and whatever else the
            encoder adds (GVPGNN: "vector_feature").
        """
        raise NotImplementedError

    def encode(self, graph: ProteinBatch, residue_mask: Optional[torch.Tensor] = None) -> Features:
        """`network` on the one-hot residue types (`residue_one_hot`).

        Args:
            graph: constructed ProteinBatch [B proteins, N residues].
            residue_mask: [N] bool (optional), residues whose one-hot row is zero.
        Returns:
            {"residue_feature": [N, D], "graph_feature": [B, D], ...} as `network`.
        """
        return self.network(graph, residue_one_hot(graph, residue_mask))
