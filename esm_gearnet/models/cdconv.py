"""CDConv: continuous-discrete convolution over residues (Fan et al., ICLR 2023), as the original configured it.

Stage k builds a radius graph (cutoff r_k, self-pairs included) over the current residues, runs two
`CDBlock`s over it, then pools consecutive pairs of residues (features, CA positions and frames averaged,
residue numbers halved) before the next stage. A convolution sums over the edges j -> i

    h_i = W^T vec( sum_j  s_ij * w_{q(i,j)}(g_ij) ⊗ x_j )

where g_ij = (direction j - i in i's local frame, dot products of the axes of both frames, distance),
w_q is a small net chosen by the clamped sequence offset q = n_j - n_i (`seq_cutoff` nets) and
s_ij = 1/2 - tanh(16 d_ij/r · |q|/(seq_cutoff // 2) - 14)/2 damps pairs far apart in both space and sequence.

Shapes: B proteins, N residues (after pooling, the nodes of the current stage), E edges of a stage's graph,
D channels, K the width of a kernel (`kernel_dims[-1]`), W the largest in-degree of a stage's graph.

Module names are the original's (`embedding`, `layers.{k}.{identity,input,conv,output}.module.*`,
`layers.{k}.conv.WeightNet.{Ws,bs}.*`, `layers.{k}.conv.W`), so its state_dicts load.

DEVIATION: the original returned the protein feature as every residue's feature. Here `residue_feature`
is, by default, the last stage's feature of the pooled node that contains the residue (nearest-neighbour
upsampling through the pooling maps: with four stages, the 8 consecutive residues merged into one node share
it). `residue_feature: graph` restores the original broadcast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..data.graph import radius_edges
from ..data.protein import ProteinBatch
from ..layers import functional
from ..registry import register
from .encoder import Features, StructureEncoder


def local_frames(pos: torch.Tensor, num_residues: torch.Tensor) -> torch.Tensor:
    """The orientation frame of every residue, rows (b, n, o), from the CA positions.

    Args:
        pos: [N, 3] CA positions (Å), packed.
        num_residues: [B] residues per protein.
    Returns:
        [N, 3, 3] the frames.

    With u_i the unit vector CA_i -> CA_{i+1}: b = normalise(u_{i-1} - u_i), n = normalise(u_{i-1} × u_i),
    o = normalise(b × n). The first and last residue of a protein take their neighbour's frame.
    DEVIATION: the original called `torch.cross` without `dim`, which crosses along the first axis of size 3
    (wrong for proteins of exactly 5 residues), and failed on proteins shorter than 3 residues; those get the
    identity frame here.
    """
    count = len(pos)
    frames = torch.eye(3, dtype=pos.dtype, device=pos.device).repeat(count, 1, 1)
    if count < 3:
        return frames
    u = F.normalize(pos[1:] - pos[:-1], dim=-1)
    before, after = u[:-1], u[1:]  # around packed rows 1 .. N-2
    b = F.normalize(before - after, dim=-1)
    n = F.normalize(torch.cross(before, after, dim=-1), dim=-1)
    o = F.normalize(torch.cross(b, n, dim=-1), dim=-1)
    interior = torch.stack([b, n, o], 1)
    residue2graph = functional.segment_ids(num_residues)
    position = functional.position_in_segment(num_residues, residue2graph)
    length = num_residues[residue2graph]
    valid = length >= 3
    centre = torch.arange(count, device=pos.device) - position + torch.minimum(position.clamp(min=1), length - 2)
    frames[valid] = interior[centre[valid] - 1]
    return frames


def pool_pairs(num_residues: torch.Tensor):
    """Pooling map of consecutive residue pairs (0, 1), (2, 3), ... of every protein.

    Args:
        num_residues: [B] residues (nodes) per protein.
    Returns:
        old2new [N] pooled node of each residue, new_num_residues [B] = ceil(num_residues / 2),
        first [N] bool, True on the first residue of each pair.
    """
    new_num_residues = torch.div(num_residues + 1, 2, rounding_mode="floor")
    residue2graph = functional.segment_ids(num_residues)
    position = functional.position_in_segment(num_residues, residue2graph)
    old2new = functional.offsets(new_num_residues)[residue2graph] + torch.div(position, 2, rounding_mode="floor")
    return old2new, new_num_residues, position % 2 == 0


@dataclass
class StageGraph:
    """The radius graph of one stage and its edge geometry, shared by the stage's two blocks.

    Edges are sorted by target; `slot` is each edge's place among its target's edges, `width` the largest
    in-degree, so kernels scatter into a [N, width, K] tensor and aggregate with one batched matmul against
    the source features laid out the same way (`padded_source` [N, width], 0 on empty slots, whose kernels
    stay 0).

    Attributes:
        target: [E] long, target node of each edge (sorted).
        geometry: [E, 7] direction in the target's frame (3), frame alignment (3), distance (1, Å).
        offset_index: [E] long, the clamped sequence offset + seq_cutoff // 2: which kernel net.
        smooth: [E, 1] the damping s_ij.
        slot: [E] long, each edge's place among its target's edges.
        padded_source: [N, W] long, source node of each slot (0 on empty slots).
    """
    target: torch.Tensor
    geometry: torch.Tensor  # [E, 7]: direction in the target frame (3), frame alignment (3), distance (1)
    offset_index: torch.Tensor  # [E] clamped sequence offset + seq_cutoff // 2
    smooth: torch.Tensor  # [E, 1]
    slot: torch.Tensor
    padded_source: torch.Tensor

    @classmethod
    def build(cls, pos, frames, residue_number, num_residues, cutoff: float, seq_cutoff: int) -> "StageGraph":
        """The stage's graph: edges between residues of one protein within `cutoff` Å.

        Args:
            pos: [N, 3] CA positions (Å).
            frames: [N, 3, 3] local frames (`local_frames`).
            residue_number: [N] residue numbers (the sequence offset of an edge).
            num_residues: [B] nodes per protein.
            cutoff: the radius (Å); seq_cutoff: number of sequence-offset kernels.
        """
        source, target = radius_edges(pos, num_residues, cutoff).unbind(-1)
        target_frame = frames[target]
        displacement = pos[source] - pos[target]
        distance = displacement.norm(dim=-1, keepdim=True)
        direction = (target_frame @ (displacement / (distance + 1e-9)).unsqueeze(-1)).squeeze(-1)
        alignment = (target_frame * frames[source]).sum(-1)
        half = seq_cutoff // 2
        offset = (residue_number[source] - residue_number[target]).clamp(-half, half)
        closeness = (distance / cutoff) * (offset.abs().unsqueeze(-1).to(distance.dtype) / half)
        smooth = 0.5 - 0.5 * torch.tanh(16.0 * closeness - 14.0)
        degree = torch.bincount(target, minlength=len(pos))
        slot = torch.arange(len(target), device=pos.device) - functional.offsets(degree)[target]
        padded_source = source.new_zeros(len(pos), int(degree.max()) if len(target) else 0)
        padded_source[target, slot] = source
        return cls(target, torch.cat([direction, alignment, distance], -1), offset + half, smooth, slot,
                   padded_source)

    def aggregate(self, kernel: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Row i = vec(sum over edges j -> i of kernel_e ⊗ x_j), flattened kernel-major.

        Args:
            kernel: [E, K] one kernel per edge.
            x: [N, D] node features.
        Returns:
            [N, K * D]
        """
        padded_kernel = kernel.new_zeros(self.padded_source.shape + kernel.shape[-1:])
        padded_kernel[self.target, self.slot] = kernel
        return torch.bmm(padded_kernel.transpose(1, 2), x[self.padded_source]).flatten(1)


def _kaiming_uniform_(tensor: torch.Tensor, fan: int) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan)  # kaiming_uniform with a = sqrt(5), as the original initialised
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


class WeightNet(nn.Module):
    """Per sequence offset, an MLP (LeakyReLU 0.2) from the 7 geometric features to `kernel_dims[-1]` weights."""

    def __init__(self, num_offset: int, kernel_dims: Sequence[int]):
        super().__init__()
        dims = [7] + list(kernel_dims)
        self.Ws = nn.ParameterList(nn.Parameter(torch.empty(num_offset, a, b)) for a, b in zip(dims, dims[1:]))
        self.bs = nn.ParameterList(nn.Parameter(torch.zeros(num_offset, b)) for b in dims[1:])
        for W in self.Ws:
            _kaiming_uniform_(W, W.shape[1] * W.shape[2])

    def forward(self, geometry: torch.Tensor, offset_index: torch.Tensor) -> torch.Tensor:
        """The kernel of each edge from the net of its sequence offset.

        Args:
            geometry: [E, 7] (`StageGraph.geometry`).
            offset_index: [E] long, which net (`StageGraph.offset_index`).
        Returns:
            [E, K] with K = `kernel_dims[-1]`.
        """
        h = geometry
        for W, b in zip(self.Ws, self.bs):
            h = F.leaky_relu(torch.bmm(h.unsqueeze(1), W[offset_index]).squeeze(1) + b[offset_index], 0.2)
        return h


class ContinuousDiscreteConv(nn.Module):
    """One continuous-discrete convolution: kernels from `WeightNet`, summed outer products, then `W`."""

    def __init__(self, input_dim: int, output_dim: int, kernel_dims: Sequence[int], seq_cutoff: int,
                 spatial_cutoff: float):
        super().__init__()
        self.input_dim, self.output_dim = input_dim, output_dim
        self.WeightNet = WeightNet(seq_cutoff, kernel_dims)
        self.W = nn.Parameter(torch.empty(kernel_dims[-1] * input_dim, output_dim))
        # the original's fan is output_dim (it passed a list where a number was meant); kept for fidelity
        _kaiming_uniform_(self.W, output_dim)

    def forward(self, graph: StageGraph, x: torch.Tensor) -> torch.Tensor:
        """The convolution over the stage's graph.

        Args:
            graph: the stage's `StageGraph` [N nodes, E edges].
            x: [N, input_dim] node features.
        Returns:
            [N, output_dim]
        """
        kernel = self.WeightNet(graph.geometry, graph.offset_index) * graph.smooth
        return graph.aggregate(kernel, x) @ self.W


def _norm_act_linear(input_dim, output_dim, batch_norm, dropout, bias, slope):
    layers = [nn.BatchNorm1d(input_dim, momentum=0.2)] if batch_norm else []
    return layers + [nn.LeakyReLU(slope), nn.Dropout(dropout), nn.Linear(input_dim, output_dim, bias=bias)]


class _Sequential(nn.Module):
    """Holds an `nn.Sequential` as `.module`, the original's layout of parameter names."""

    def __init__(self, layers):
        super().__init__()
        self.module = nn.Sequential(*layers)

    def forward(self, x):
        return self.module(x)


class CDBlock(nn.Module):
    """Bottleneck residual block: [BN, LeakyReLU, Dropout, Linear to width = output_dim·base_width/64, BN,
    LeakyReLU, Dropout] -> convolution -> [BN, LeakyReLU, Dropout, Linear to output_dim], plus the identity
    (a linear map of the same kind when the widths differ)."""

    def __init__(self, seq_cutoff: int, spatial_cutoff: float, kernel_dims, input_dim: int, output_dim: int,
                 base_width: float = 16.0, batch_norm: bool = True, dropout: float = 0.0, bias: bool = False,
                 slope: float = 0.1):
        super().__init__()
        width = int(output_dim * (base_width / 64.0))
        if input_dim != output_dim:
            self.identity = _Sequential(_norm_act_linear(input_dim, output_dim, batch_norm, dropout, bias, slope))
        else:
            self.identity = nn.Sequential()
        tail = ([nn.BatchNorm1d(width, momentum=0.2)] if batch_norm else []) + [nn.LeakyReLU(slope),
                                                                                 nn.Dropout(dropout)]
        self.input = _Sequential(_norm_act_linear(input_dim, width, batch_norm, dropout, bias, slope) + tail)
        self.conv = ContinuousDiscreteConv(width, width, kernel_dims, seq_cutoff, spatial_cutoff)
        self.output = _Sequential(_norm_act_linear(width, output_dim, batch_norm, dropout, bias, slope))

    def forward(self, graph: StageGraph, x: torch.Tensor) -> torch.Tensor:
        """The block over the stage's graph.

        Args:
            graph: the stage's `StageGraph` [N nodes, E edges].
            x: [N, input_dim] node features.
        Returns:
            [N, output_dim]
        """
        return self.output(self.conv(graph, self.input(x))) + self.identity(x)


@register
class CDConv(StructureEncoder):
    """Continuous-discrete convolutional network over the residues (CA positions) of a `ProteinBatch`.

    Args:
        input_dim: per-residue input width (1280 after ESM-2-650M in series fusion, 21 in parallel).
        embedding_dim: width of the first (bias-free) linear embedding.
        hidden_dims: output width of each stage (two blocks per stage).
        cutoffs: radius (Å) of each stage's graph.
        seq_cutoff: number of sequence-offset kernels (offsets clamped to ±seq_cutoff // 2).
        kernel_dims: widths of the weight nets; base_width: bottleneck width per 64 output channels;
        batch_norm, dropout, bias: of the blocks' linear layers.
        residue_feature: "upsample" (default, see the module note) or "graph" (the original broadcast).
        graph_construction_model: optional; CDConv builds its own radius graphs, stage by stage.
    `network(graph, input [N, input_dim])`: every residue needs a CA atom (the `ResidueGraph` transform or
    `AlphaCarbonNode` removes the others). Returns residue_feature [N, output_dim] and graph_feature
    [B, output_dim] (mean over the last stage).
    """

    small_config = {"hidden_dims": [16, 32], "embedding_dim": 8}

    def __init__(self, input_dim: int, embedding_dim: int, hidden_dims: Sequence[int], cutoffs: Sequence[float],
                 seq_cutoff: int, kernel_dims: Sequence[int], base_width: float = 16.0, batch_norm: bool = True,
                 dropout: float = 0.2, bias: bool = False, residue_feature: str = "upsample",
                 graph_construction_model: Optional[nn.Module] = None):
        super().__init__(graph_construction_model)
        hidden_dims = [hidden_dims] if isinstance(hidden_dims, int) else list(hidden_dims)
        if len(cutoffs) < len(hidden_dims):
            raise ValueError(f"CDConv: cutoffs has {len(cutoffs)} radii for {len(hidden_dims)} stages "
                             "(hidden_dims); give one radius per stage.")
        if residue_feature not in ("upsample", "graph"):
            raise ValueError(f"CDConv: residue_feature must be 'upsample' or 'graph', got {residue_feature!r}.")
        self.input_dim = input_dim
        self.output_dim = hidden_dims[-1]
        self.cutoffs = list(cutoffs)
        self.seq_cutoff = seq_cutoff
        self.residue_feature = residue_feature
        dims = [embedding_dim] + hidden_dims
        self.embedding = nn.Linear(input_dim, embedding_dim, bias=False)
        self.layers = nn.ModuleList()
        for i in range(len(hidden_dims)):
            for block_input in (dims[i], dims[i + 1]):
                self.layers.append(CDBlock(seq_cutoff, cutoffs[i], kernel_dims, block_input, dims[i + 1],
                                           base_width=base_width, batch_norm=batch_norm, dropout=dropout, bias=bias))

    def network(self, batch: ProteinBatch, input: torch.Tensor) -> Features:
        """The stages over the residues' CA positions; CDConv builds its own graphs.

        Args:
            batch: ProteinBatch [B proteins, N residues], a CA atom in every residue.
            input: [N, input_dim] per-residue input features.
        Returns:
            {"residue_feature": [N, output_dim], "graph_feature": [B, output_dim]}: the graph feature is the mean
            over the last stage's nodes; the residue feature, that of the residue's node in the last stage (or,
            `residue_feature: graph`, the graph feature).
        """
        if not bool(batch.atom_mask[:, 1].all()):
            raise ValueError("CDConv needs a CA atom in every residue; add the ResidueGraph transform to the "
                             "dataset (or AlphaCarbonNode to the graph construction) to remove the others.")
        x = self.embedding(input)
        pos, num_residues, residue_number = batch.pos, batch.num_residues, batch.residue_number
        frames = local_frames(pos, num_residues)
        to_node = torch.arange(batch.num_residue, device=x.device)  # residue -> node of the current stage
        num_stage = len(self.layers) // 2
        for stage in range(num_stage):
            graph = StageGraph.build(pos, frames, residue_number, num_residues, self.cutoffs[stage],
                                     self.seq_cutoff)
            x = self.layers[2 * stage + 1](graph, self.layers[2 * stage](graph, x))
            if stage < num_stage - 1:
                old2new, num_residues, first = pool_pairs(num_residues)
                count = int(num_residues.sum())
                x = functional.segment_mean(x, old2new, count)
                pos = functional.segment_mean(pos, old2new, count)
                frames = F.normalize(functional.segment_mean(frames, old2new, count), dim=-1)
                residue_number = torch.div(residue_number[first], 2, rounding_mode="floor")
                to_node = old2new[to_node]
        graph_feature = functional.segment_mean(x, functional.segment_ids(num_residues), batch.batch_size)
        residue_feature = x[to_node] if self.residue_feature == "upsample" else graph_feature[batch.residue2graph]
        return {"residue_feature": residue_feature, "graph_feature": graph_feature}
