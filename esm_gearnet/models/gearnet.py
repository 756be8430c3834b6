"""GearNet and GearNet-Edge: geometric relational graph convolutions over the residue graph.

Parameter names are TorchDrug's (`layers.{i}.linear`, `layers.{i}.self_loop`, `layers.{i}.batch_norm`,
`batch_norms.{i}`, `edge_layers.{i}.*`), so the original's checkpoints load directly.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from ..data.graph import SpatialLineGraph
from ..data.protein import ProteinBatch
from ..layers import functional
from ..registry import register
from .encoder import Features, StructureEncoder

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


AGGREGATIONS = ("sparse", "scatter")


def relational_adjacency(edge_list: torch.Tensor, num_node: int, num_relation: int,
                         num_source: Optional[int] = None, aggregation: str = "sparse"):
    """The graph as a sparse [N * R, N_source] CSR matrix: entry (i * R + r, j) counts the edges j -> i of
    relation r. Built once per batch and shared by every layer. With `aggregation` "scatter" (the reference path,
    GearNet's aggregation before the sparse product), the edge list itself: (edge_list, num_node).

    Args:
        edge_list: [E, 3] (source, target, relation).
        num_node: N, the number of target rows.
        num_relation: R.
        num_source: N_source, the number of source rows (default `num_node`).
        aggregation: "sparse" or "scatter".
    Returns:
        "sparse": a sparse CSR float tensor [N * R, N_source]; "scatter": the tuple (edge_list [E, 3], N).
    """
    if aggregation == "scatter":
        return edge_list, num_node
    num_source = num_node if num_source is None else num_source
    source, target, relation = edge_list.unbind(-1)
    key, count = torch.unique((target * num_relation + relation) * num_source + source, return_counts=True)
    row, column = key // num_source, key % num_source
    crow = torch.zeros(num_node * num_relation + 1, dtype=torch.long, device=edge_list.device)
    crow[1:] = torch.cumsum(torch.bincount(row, minlength=num_node * num_relation), 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, column, count.float(), (num_node * num_relation, num_source),
                                       check_invariants=False)  # sorted, unique and in range by construction


def relational_sum(x: torch.Tensor, adjacency, num_relation: int) -> torch.Tensor:
    """Per relation, the sum of source features over incoming edges, relations side by side.

    Args:
        x: [N_source, D] node features.
        adjacency: from `relational_adjacency`: sparse [N * R, N_source], or (edge_list [E, 3], N) on the
            "scatter" path.
        num_relation: R.
    Returns:
        [N, R * D]: block r of row i = sum of x[j] over the edges j -> i of relation r.

    One sparse-dense product (and its transpose in the backward pass) instead of gathering [E, D] source rows
    and scattering them with `index_add_` (the "scatter" reference path): GearNet 6x512 trains 1.34x faster on
    CPU, GearNet-Edge 1.96x (benchmarks/encoders.py). Computed in at least fp32, outside autocast.
    """
    if isinstance(adjacency, tuple):  # the reference path: gather the source rows, one index_add_
        (source, target, relation), num_node = adjacency[0].unbind(-1), adjacency[1]
        out = x.new_zeros(num_node * num_relation, x.shape[-1])
        out.index_add_(0, target * num_relation + relation, x[source])
        return out.view(num_node, num_relation * x.shape[-1])
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        out = torch.sparse.mm(adjacency.to(dtype), x.to(dtype))
    return out.view(-1, num_relation * x.shape[-1])


class GeometricRelationalGraphConv(nn.Module):
    """h' = activation(BN(linear([sum over edges of relation r]_r) + self_loop(h)))."""

    def __init__(self, input_dim: int, output_dim: int, num_relation: int, batch_norm: bool = False,
                 activation: Optional[str] = "relu"):
        super().__init__()
        self.input_dim, self.output_dim, self.num_relation = input_dim, output_dim, num_relation
        self.self_loop = nn.Linear(input_dim, output_dim)
        self.linear = nn.Linear(num_relation * input_dim, output_dim)
        self.batch_norm = nn.BatchNorm1d(output_dim) if batch_norm else None
        self.activation = ACTIVATIONS[activation]() if activation else None

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        """One layer over the graph (N rows are residues; in GearNet-Edge's edge layers, the edges of the line
        graph, and R its angle bins).

        Args:
            x: [N, D_in] node features.
            adjacency: [N * R, N] sparse, or the "scatter" tuple (edge_list [E, 3], N), from
                `relational_adjacency`.
        Returns:
            [N, D_out] (D_out = `output_dim`).
        """
        update = relational_sum(x, adjacency, self.num_relation)
        output = self.linear(update) + self.self_loop(x)
        if self.batch_norm is not None:
            output = self.batch_norm(output)
        if self.activation is not None:
            output = self.activation(output)
        return output


@register
class GearNet(StructureEncoder):
    """Geometry-aware relational graph network (GearNet; GearNet-Edge with `num_angle_bin`).

    Args:
        input_dim: D_in of the residue input features.
        hidden_dims: output width of each layer.
        num_relation: R of the residue graph (7 for the EC graph).
        edge_input_dim: width of the graph's edge features (GearNet-Edge: 59 for "gearnet" features).
        num_angle_bin: turns on edge message passing over the spatial line graph (GearNet-Edge).
        short_cut: add the layer input when shapes match.
        batch_norm: batch norm in each conv and after each layer.
        activation: name of the activation.
        concat_hidden: the residue feature concatenates every layer's output (else the last one).
        readout: "sum" or "mean" over residues.
        aggregation: "sparse" (one sparse-dense product per layer) or "scatter" (gather and `index_add_`, the
            reference path the benchmarks compare with); equal results.
        graph_construction_model: the residue graph (see `Encoder`).
    `network(graph, input [N, D_in])` returns residue_feature [N, output_dim], graph_feature [B, output_dim].
    """

    relation_key = "num_relation"
    needs_graph = True
    small_config = {"hidden_dims": [16, 16]}

    def __init__(self, input_dim: int, hidden_dims: Sequence[int], num_relation: int,
                 edge_input_dim: Optional[int] = None, num_angle_bin: Optional[int] = None,
                 short_cut: bool = False, batch_norm: bool = False, activation: str = "relu",
                 concat_hidden: bool = False, readout: str = "sum", aggregation: str = "sparse",
                 graph_construction_model: Optional[nn.Module] = None):
        super().__init__(graph_construction_model)
        if readout not in ("sum", "mean"):
            raise ValueError(f"GearNet: readout must be 'sum' or 'mean', got {readout!r}.")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"GearNet: aggregation must be 'sparse' or 'scatter', got {aggregation!r}.")
        self.aggregation = aggregation
        if num_angle_bin and not edge_input_dim:
            raise ValueError("GearNet: num_angle_bin (GearNet-Edge) needs edge_input_dim, the width of the edge "
                             "features (59 with graph_construction_model.edge_feature: gearnet).")
        self.input_dim = input_dim
        self.dims = [input_dim] + list(hidden_dims)
        self.output_dim = sum(hidden_dims) if concat_hidden else hidden_dims[-1]
        self.num_relation = num_relation
        self.num_angle_bin = num_angle_bin
        self.short_cut, self.concat_hidden, self.readout = short_cut, concat_hidden, readout
        self.layers = nn.ModuleList(
            GeometricRelationalGraphConv(self.dims[i], self.dims[i + 1], num_relation, batch_norm, activation)
            for i in range(len(hidden_dims)))
        if num_angle_bin:
            self.spatial_line_graph = SpatialLineGraph(num_angle_bin)
            edge_dims = [edge_input_dim] + self.dims[:-1]
            self.edge_layers = nn.ModuleList(
                GeometricRelationalGraphConv(edge_dims[i], edge_dims[i + 1], num_angle_bin, batch_norm, activation)
                for i in range(len(hidden_dims)))
        self.batch_norms = nn.ModuleList(nn.BatchNorm1d(d) for d in hidden_dims) if batch_norm else None

    def network(self, batch: ProteinBatch, input: torch.Tensor) -> Features:
        """The relational convolutions (and, for GearNet-Edge, the edge message passing) over the residue graph.

        Args:
            batch: constructed ProteinBatch [B proteins, N residues] with `edge_list` [E, 3] of R =
                `num_relation` relations (GearNet-Edge: and `edge_feature` [E, edge_input_dim]).
            input: [N, input_dim] per-residue input features.
        Returns:
            {"residue_feature": [N, output_dim], "graph_feature": [B, output_dim]}; output_dim is the sum of
            `hidden_dims` with `concat_hidden`, else the last one.
        """
        if batch.edge_list is None:
            raise ValueError("GearNet needs a residue graph: give the config a task.graph_construction_model "
                             "(as config/EC/esm_gearnet.yaml has).")
        if batch.num_relation != self.num_relation:
            raise ValueError(f"GearNet was built for num_relation {self.num_relation} but the graph has "
                             f"{batch.num_relation} relations; set num_relation: {batch.num_relation}.")
        if input.shape[-1] != self.input_dim:
            raise ValueError(f"GearNet: input features have {input.shape[-1]} channels but input_dim is "
                             f"{self.input_dim}; set input_dim: {input.shape[-1]}.")
        edge_list = batch.edge_list
        adjacency = relational_adjacency(edge_list, batch.num_residue, self.num_relation, aggregation=self.aggregation)
        if self.num_angle_bin:
            line_graph = self.spatial_line_graph(batch)
            line_adjacency = relational_adjacency(line_graph.edge_list, len(edge_list), self.num_angle_bin,
                                                  aggregation=self.aggregation)
            edge_input = batch.edge_feature.float()
            # each edge's message goes to its target residue, under its relation
            edge_to_node = torch.stack([torch.arange(len(edge_list), device=edge_list.device),
                                        edge_list[:, 1], edge_list[:, 2]], -1)
            edge_to_node = relational_adjacency(edge_to_node, batch.num_residue, self.num_relation, len(edge_list),
                                                self.aggregation)
        hiddens = []
        layer_input = input
        for i, layer in enumerate(self.layers):
            hidden = layer(layer_input, adjacency)
            if self.short_cut and hidden.shape == layer_input.shape:
                hidden = hidden + layer_input
            if self.num_angle_bin:
                edge_hidden = self.edge_layers[i](edge_input, line_adjacency)
                # edge messages scattered to their target residue, per relation, through the conv's linear map
                update = relational_sum(edge_hidden, edge_to_node, self.num_relation)
                hidden = hidden + layer.activation(layer.linear(update))
                edge_input = edge_hidden
            if self.batch_norms is not None:
                hidden = self.batch_norms[i](hidden)
            hiddens.append(hidden)
            layer_input = hidden
        residue_feature = torch.cat(hiddens, -1) if self.concat_hidden else hiddens[-1]
        return {"residue_feature": residue_feature,
                "graph_feature": functional.readout(residue_feature, batch.residue2graph, batch.batch_size,
                                                    self.readout)}
