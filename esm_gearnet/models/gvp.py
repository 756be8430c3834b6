"""GVP-GNN (geometric vector perceptrons) in plain torch, no torch-geometric.

Features are pairs (s, V): scalars [*, S] and 3-d vectors [*, V, 3] (S scalar and V vector channels; Se, Ve
those of the edges; N residues, E edges, B proteins). Scalars are invariant and vectors rotate with the protein.
Module and parameter names follow gvp-pytorch and the original's GVPGNN (`residue_embdding`, `W_v`, `W_e`,
`layers.{i}.conv.message_func`, `W_out`, ...), so its checkpoints would load. Edges carry 16 Gaussian RBFs
of the Cα distance over 0–20 Å and the displacement vector (target − source); node vector channels are zero
at input.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data.protein import ProteinBatch
from ..layers import functional
from ..registry import register
from .encoder import StructureEncoder

Features = Tuple[torch.Tensor, Optional[torch.Tensor]]


def _norm(x: torch.Tensor, dim: int = -1, keepdim: bool = False, eps: float = 1e-8, sqrt: bool = True):
    out = torch.clamp((x * x).sum(dim, keepdim=keepdim), min=eps)
    return out.sqrt() if sqrt else out


class GVP(nn.Module):
    """Geometric vector perceptron (s, V) -> (s', V'), with optional vector gating.

    Args:
        in_dims, out_dims: (scalar channels, vector channels).
        activations: (scalar activation, vector activation); None for none.
        vector_gate: gate output vectors by a sigmoid of the scalar output.
    """

    def __init__(self, in_dims, out_dims, h_dim=None, activations=(F.relu, torch.sigmoid), vector_gate=False):
        super().__init__()
        self.si, self.vi = in_dims
        self.so, self.vo = out_dims
        self.vector_gate = vector_gate
        if self.vi:
            self.h_dim = h_dim or max(self.vi, self.vo)
            self.wh = nn.Linear(self.vi, self.h_dim, bias=False)
            self.ws = nn.Linear(self.h_dim + self.si, self.so)
            if self.vo:
                self.wv = nn.Linear(self.h_dim, self.vo, bias=False)
                if vector_gate:
                    self.wsv = nn.Linear(self.so, self.vo)
        else:
            self.ws = nn.Linear(self.si, self.so)
        self.scalar_act, self.vector_act = activations

    def forward(self, x):
        """One perceptron, (si, vi) -> (so, vo) channels.

        Args:
            x: (s [*, si], v [*, vi, 3]); with no vector input (vi = 0), s [*, si] alone or the pair (s [*, si], None).
        Returns:
            (s [*, so], v [*, vo, 3]); s [*, so] alone when the GVP has no vector output (vo = 0). With vectors
            out but none in, s is [M, si] and v starts at zero, [M, vo, 3].
        """
        v = None
        if self.vi:
            s, v = x
            vh = self.wh(v.transpose(-1, -2))  # [*, 3, h]
            s = self.ws(torch.cat([s, _norm(vh, dim=-2)], -1))
            if self.vo:
                v = self.wv(vh).transpose(-1, -2)  # [*, vo, 3]
                if self.vector_gate:
                    gate = self.wsv(self.vector_act(s) if self.vector_act else s)
                    v = v * torch.sigmoid(gate).unsqueeze(-1)
                elif self.vector_act:
                    v = v * self.vector_act(_norm(v, keepdim=True))
        else:
            s = self.ws(x[0] if isinstance(x, tuple) else x)
            if self.vo:
                v = s.new_zeros(s.shape[0], self.vo, 3)
        if self.scalar_act:
            s = self.scalar_act(s)
        return (s, v) if self.vo else s


class GVPLayerNorm(nn.Module):
    """LayerNorm on scalars; vectors divided by their root-mean-square norm."""

    def __init__(self, dims):
        super().__init__()
        self.s, self.v = dims
        self.scalar_norm = nn.LayerNorm(self.s)

    def forward(self, x):
        """Layer norm of the scalars; vectors divided by the root-mean-square of their norms.

        Args:
            x: (s [*, S], v [*, V, 3]); with V = 0, s [*, S] alone or the pair (s [*, S], None).
        Returns:
            (s [*, S], v [*, V, 3]) normalised; s [*, S] alone when V = 0.
        """
        if not self.v:
            return self.scalar_norm(x[0] if isinstance(x, tuple) else x)
        s, v = x
        vn = torch.sqrt(torch.mean(_norm(v, keepdim=True, sqrt=False), dim=-2, keepdim=True))
        return self.scalar_norm(s), v / vn


class GVPDropout(nn.Module):
    """Dropout of scalar channels and of whole vector channels."""

    def __init__(self, drop_rate: float):
        super().__init__()
        self.drop_rate = drop_rate
        self.sdropout = nn.Dropout(drop_rate)

    def forward(self, x):
        """Dropout of scalar channels, and of whole vector channels (all 3 coordinates together).

        Args:
            x: (s [*, S], v [*, V, 3]).
        Returns:
            (s [*, S], v [*, V, 3]).
        """
        s, v = x
        if not self.training or not self.drop_rate:
            return self.sdropout(s), v
        keep = torch.bernoulli((1 - self.drop_rate) * torch.ones(v.shape[:-1], device=v.device)).unsqueeze(-1)
        return self.sdropout(s), keep * v / (1 - self.drop_rate)


def _cat(*features: Features) -> Features:
    return torch.cat([f[0] for f in features], -1), torch.cat([f[1] for f in features], -2)


def gvp_stack(in_dims, hidden_dims, out_dims, n_layers, activations, vector_gate) -> nn.Sequential:
    """n GVPs in -> hidden -> ... -> hidden -> out; the last one without activations."""
    if n_layers == 1:
        return nn.Sequential(GVP(in_dims, out_dims, activations=(None, None), vector_gate=vector_gate))
    dims = [in_dims] + [hidden_dims] * (n_layers - 1)
    layers = [GVP(dims[i], dims[i + 1], activations=activations, vector_gate=vector_gate) for i in range(n_layers - 1)]
    layers.append(GVP(hidden_dims, out_dims, activations=(None, None), vector_gate=vector_gate))
    return nn.Sequential(*layers)


class GVPConv(nn.Module):
    """Messages GVP([s_j, s_e, s_i], [V_j, V_e, V_i]) over edges j -> i, averaged at each target i."""

    def __init__(self, in_dims, out_dims, edge_dims, n_layers=3, activations=(F.relu, torch.sigmoid),
                 vector_gate=False):
        super().__init__()
        message_in = (2 * in_dims[0] + edge_dims[0], 2 * in_dims[1] + edge_dims[1])
        self.message_func = gvp_stack(message_in, out_dims, out_dims, n_layers, activations, vector_gate)

    def forward(self, x: Features, edge_list: torch.Tensor, edge_attr: Features) -> Features:
        """Messages along the edges, averaged at each target.

        Args:
            x: node features (s [N, S], v [N, V, 3]).
            edge_list: [E, 3] (source, target, relation).
            edge_attr: edge features (s [E, Se], v [E, Ve, 3]).
        Returns:
            (s [N, So], v [N, Vo, 3]) with (So, Vo) = `out_dims`.
        """
        source, target = edge_list[:, 0], edge_list[:, 1]
        s, v = x
        message_s, message_v = self.message_func(_cat((s[source], v[source]), edge_attr, (s[target], v[target])))
        num_node = len(s)
        count = torch.bincount(target, minlength=num_node).clamp(min=1).to(s.dtype)
        # summed in the features' dtype: under bf16 autocast the messages come out of linear layers in bf16
        out_s = s.new_zeros(num_node, message_s.shape[-1]).index_add_(0, target, message_s.to(s.dtype))
        out_v = v.new_zeros((num_node,) + message_v.shape[1:]).index_add_(0, target, message_v.to(v.dtype))
        return out_s / count[:, None], out_v / count[:, None, None]


class GVPConvLayer(nn.Module):
    """Message passing, residual + norm, a two-GVP feed-forward, residual + norm."""

    def __init__(self, node_dims, edge_dims, n_message=3, n_feedforward=2, drop_rate=0.1,
                 activations=(F.relu, torch.sigmoid), vector_gate=False):
        super().__init__()
        self.conv = GVPConv(node_dims, node_dims, edge_dims, n_message, activations, vector_gate)
        self.norm = nn.ModuleList(GVPLayerNorm(node_dims) for _ in range(2))
        self.dropout = nn.ModuleList(GVPDropout(drop_rate) for _ in range(2))
        hidden = (4 * node_dims[0], 2 * node_dims[1])
        self.ff_func = gvp_stack(node_dims, hidden, node_dims, n_feedforward, activations, vector_gate)

    def forward(self, x: Features, edge_list: torch.Tensor, edge_attr: Features) -> Features:
        """One GVP-GNN layer: message passing then feed-forward, each with dropout, residual and layer norm.

        Args:
            x: node features (s [N, S], v [N, V, 3]), (S, V) = `node_dims`.
            edge_list: [E, 3] (source, target, relation).
            edge_attr: edge features (s [E, Se], v [E, Ve, 3]).
        Returns:
            (s [N, S], v [N, V, 3]).
        """
        dh = self.dropout[0](self.conv(x, edge_list, edge_attr))
        x = self.norm[0]((x[0] + dh[0], x[1] + dh[1]))
        dh = self.dropout[1](self.ff_func(x))
        return self.norm[1]((x[0] + dh[0], x[1] + dh[1]))


def rbf(distance: torch.Tensor, num: int, d_min: float = 0.0, d_max: float = 20.0) -> torch.Tensor:
    """Gaussian radial basis of distances (or any values), `num` centres evenly over [d_min, d_max], width
    (d_max - d_min) / num.

    Args:
        distance: [*] distances (Å), or ESM-IF1's confidences in [0, 1].
    Returns:
        [*, num]
    """
    mu = torch.linspace(d_min, d_max, num, device=distance.device, dtype=distance.dtype)
    sigma = (d_max - d_min) / num
    return torch.exp(-((distance.unsqueeze(-1) - mu) / sigma) ** 2)


@register
class GVPGNN(StructureEncoder):
    """GVP-GNN over the residue graph, as the original configured it for ESM fusion.

    Args:
        node_in_dim: (scalar, vector) input channels; vectors must be 0 (node vectors start at zero).
        node_h_dim, edge_in_dim, edge_h_dim: (scalar, vector) widths; edge_in_dim[0] = number of RBFs.
        num_layers: GVPConvLayers; readout: "sum" or "mean"; drop_rate: dropout in every layer;
        vector_gate: vector gating in every GVP; graph_construction_model: the residue graph (see `Encoder`),
            e.g. SpatialEdge(radius 10, min_distance 0).

    `network(graph, input [N, node_in_dim[0]])` returns residue_feature [N, node_h_dim[0]], graph_feature
    [B, node_h_dim[0]] and vector_feature [N, node_h_dim[1], 3] (the last layer's vectors, which rotate with the
    protein).
    """

    input_dim_key = ("node_in_dim", 0)
    needs_graph = True
    small_config = {"node_h_dim": [16, 4], "edge_h_dim": [8, 1], "num_layers": 2}

    @staticmethod
    def input_dim_value(width: int) -> List[int]:
        return [width, 0]  # no input vectors

    def __init__(self, node_in_dim: Sequence[int], node_h_dim: Sequence[int], edge_in_dim: Sequence[int],
                 edge_h_dim: Sequence[int], readout: str = "sum", num_layers: int = 3, drop_rate: float = 0.1,
                 vector_gate: bool = True, graph_construction_model: Optional[nn.Module] = None):
        super().__init__(graph_construction_model)
        node_in_dim, node_h_dim = tuple(node_in_dim), tuple(node_h_dim)
        edge_in_dim, edge_h_dim = tuple(edge_in_dim), tuple(edge_h_dim)
        if node_in_dim[1] != 0 or edge_in_dim[1] != 1:
            raise ValueError("GVPGNN: node_in_dim must be [D, 0] (no input vectors) and edge_in_dim [num_rbf, 1] "
                             "(one displacement vector per edge).")
        if readout not in ("sum", "mean"):
            raise ValueError(f"GVPGNN: readout must be 'sum' or 'mean', got {readout!r}.")
        activations = (F.relu, None)
        self.input_dim = node_in_dim[0]
        self.output_dim = node_h_dim[0]
        self.rbf_dim = edge_in_dim[0]
        self.readout = readout
        self.residue_embdding = nn.Linear(node_in_dim[0], node_in_dim[0], bias=False)  # the original's spelling
        self.W_v = nn.Sequential(GVPLayerNorm(node_in_dim),
                                 GVP(node_in_dim, node_h_dim, activations=(None, None), vector_gate=vector_gate))
        self.W_e = nn.Sequential(GVPLayerNorm(edge_in_dim),
                                 GVP(edge_in_dim, edge_h_dim, activations=(None, None), vector_gate=vector_gate))
        self.layers = nn.ModuleList(GVPConvLayer(node_h_dim, edge_h_dim, drop_rate=drop_rate, activations=activations,
                                                 vector_gate=vector_gate) for _ in range(num_layers))
        self.W_out = nn.Sequential(GVPLayerNorm(node_h_dim),
                                   GVP(node_h_dim, (node_h_dim[0], 0), activations=activations,
                                       vector_gate=vector_gate))

    def network(self, batch: ProteinBatch, input: torch.Tensor) -> Dict[str, torch.Tensor]:
        """GVP message passing over the residue graph (edges: RBFs of the CA distance and the displacement).

        Args:
            batch: constructed ProteinBatch [B proteins, N residues] with `edge_list` [E, 3] and CA positions
                (`pos` [N, 3]).
            input: [N, node_in_dim[0]] per-residue input features.
        Returns:
            {"residue_feature": [N, node_h_dim[0]], "graph_feature": [B, node_h_dim[0]],
            "vector_feature": [N, node_h_dim[1], 3]} (the last layer's vectors, which rotate with the protein).
        """
        if batch.edge_list is None:
            raise ValueError("GVPGNN needs a residue graph: give the config a task.graph_construction_model "
                             "(as config/EC/esm_gvp.yaml has).")
        edge_list = batch.edge_list
        displacement = batch.pos[edge_list[:, 1]] - batch.pos[edge_list[:, 0]]
        h_edge = self.W_e((rbf(displacement.norm(dim=-1), self.rbf_dim), displacement.unsqueeze(-2)))
        h_node = self.W_v(self.residue_embdding(input))
        for layer in self.layers:
            h_node = layer(h_node, edge_list, h_edge)
        residue_feature = self.W_out(h_node)
        return {"residue_feature": residue_feature,
                "graph_feature": functional.readout(residue_feature, batch.residue2graph, batch.batch_size,
                                                    self.readout),
                "vector_feature": h_node[1]}
