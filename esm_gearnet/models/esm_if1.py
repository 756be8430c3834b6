"""ESM-IF1's structure encoder (Hsu et al., "Learning inverse folding from millions of predicted structures",
ICML 2022) in plain torch: fair-esm's `GVPTransformerEncoder` without torch-geometric or torch-scatter.

ESM-IF1 is an inverse-folding model: a GVP-GNN over the k nearest neighbours of each residue (Cα distance), then
a Transformer encoder, then (not used here) an autoregressive sequence decoder. The encoder reads the backbone
only, N, CA and C of every residue (atom14 slots 0-2 of `atom_pos`), and a per-residue confidence in [0, 1]:

==========================  ============================================================================
input                       meaning
==========================  ============================================================================
backbone [N, 3, 3]          N, CA, C (Å); an atom absent from `atom_mask` is NaN, as fair-esm's files give
confidence [N]              1.0 everywhere (`confidence: one`, fair-esm's `get_encoder_output`) or the
                            AlphaFold pLDDT `bfactor / 100` (`confidence: plddt`)
input [N, D_in] (series)    the language model's residue features, added to the embedding through a learned
                            projection initialised at zero (the released encoder is unchanged at the start)
==========================  ============================================================================

Every protein is laid out as fair-esm's `CoordBatchConverter` does, which the model was trained with: a BOS and
an EOS position with infinite coordinates around the residues (missing coordinates, confidence 0), padding to the
longest protein (NaN coordinates, `padding_mask`), and `confidence * coord_mask - padding_mask`. fair-esm's rules
for missing atoms follow from that layout and hold here unchanged: a residue without all three atoms has no
coordinates (`coord_mask` false: no kNN edges, its coordinates set to 0 where features read them); a residue
without N is moreover padding (its N is NaN: fair-esm's `padding_mask = isnan(coords[..., 0, 0])`), hidden as
a key from attention, without a position embedding, with confidence -1. Its feature is still returned, as
fair-esm's `get_encoder_output` returns it.

Alone and beside ESM (parallel, cross fusion) the encoder reads no residue types: the one-hot input of
`StructureEncoder.encode` is not read and `residue_mask` changes nothing (the structure stays visible, as
SaProt keeps a masked residue's structure token). With `input_dim` other than 21 (series fusion) it reads
`network`'s input through `input_projection`.

Shapes: B proteins, N residues (packed), L = longest protein + 2 (BOS, EOS), K = neighbours (`top_k_neighbors`,
at most L), E kept edges, D = `embed_dim`, (S, V) the GVP's scalar and vector channels.

Parameter names are fair-esm's (`gvp_encoder.embed_graph.embed_node`, `layers.{i}.self_attn.q_proj`,
`embed_dihedrals.norm_nodes.gain`, ...) but for `mask_embedding`, the one row of fair-esm's `embed_tokens` the
encoder reads (`<mask>`: the encoder sees no residue types; the padding row is zeroed before the first layer).
Weights come from the release file `esm_if1_gvp4_t16_142M_UR50.pt` (`args` Namespace and the state dict under
the internal names fair-esm's loader renames: `W_v`, `W_e`, `embed_scores.0`, ...); the decoder's are ignored.
The ESM-IF1 code and weights are released by Meta under the MIT licence, as fair-esm.

Fidelity notes (not deviations: the released model was trained so): the BOS and EOS positions sit at the origin
where features read their coordinates, so the first residue's φ, the last residue's ψ and ω and its forward
orientation vector depend on where the protein lies; the features are not exactly invariant to translation.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_state_dict_checked, skipping_init
from ..data.protein import ProteinBatch
from ..layers import functional
from ..registry import register
from .encoder import ONE_HOT_DIM, Features, StructureEncoder
from .gvp import GVPDropout, rbf  # gvp-pytorch's dropout and radial basis, which fair-esm's are

RELEASE = "esm_if1_gvp4_t16_142M_UR50"
URL = f"https://dl.fbaipublicfiles.com/fair-esm/models/{RELEASE}.pt"
#: the release's architecture (its `args`): what `pretrained: false` builds unless told otherwise
RELEASE_ARCHITECTURE = {
    "encoder_embed_dim": 512, "encoder_layers": 8, "encoder_attention_heads": 8, "encoder_ffn_embed_dim": 2048,
    "gvp_num_encoder_layers": 4, "gvp_node_hidden_dim_scalar": 1024, "gvp_node_hidden_dim_vector": 256,
    "gvp_edge_hidden_dim_scalar": 32, "gvp_edge_hidden_dim_vector": 1, "gvp_top_k_neighbors": 30,
    "dropout": 0.1, "attention_dropout": 0.1, "gvp_dropout": 0.1,
}
#: fair-esm's renaming of the release's internal module names (`pretrained._load_model_and_alphabet_core_v1`)
RELEASE_NAMES = (
    ("W_v", "embed_graph.embed_node"), ("W_e", "embed_graph.embed_edge"), ("embed_scores.0", "embed_confidence"),
    ("embed_score.", "embed_graph.embed_confidence."), ("seq_logits_projection.", ""),
    ("embed_ingraham_features", "embed_dihedrals"), ("embed_gvp_in_local_frame.0", "embed_gvp_output"),
    ("embed_features_in_local_frame.0", "embed_gvp_input_features"),
)
GVPFeatures = Tuple[torch.Tensor, torch.Tensor]


# ---- fair-esm's numerics (`inverse_folding.util`), kept exactly -------------------------------------------
def _nan_to_num(x: torch.Tensor) -> torch.Tensor:
    """x with every non-finite value (NaN, ±inf) set to 0."""
    return torch.where(torch.isfinite(x), x, x.new_zeros(()))


def _norm(x: torch.Tensor, dim: int = -1, keepdim: bool = False, eps: float = 1e-8) -> torch.Tensor:
    return torch.sqrt(torch.sum(torch.square(x), dim=dim, keepdim=keepdim) + eps)


def _normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x / (|x| + ε), non-finite results set to 0."""
    return _nan_to_num(x / _norm(x, dim=dim, keepdim=True))


def _rotate(v: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """[B, L, C, 3] vectors v [B, L, C, 3] multiplied by the transpose of R [B, L, 3, 3] (fair-esm's `rotate`)."""
    return torch.sum(v.unsqueeze(-1) * R.unsqueeze(-3), dim=-2)


def rotation_frames(coords: torch.Tensor) -> torch.Tensor:
    """Each residue's local frame: rows e1 (CA->C), e2 (CA->N made orthogonal to e1), e3 = e1 x e2.

    Args:
        coords: [B, L, 3, 3] N, CA, C.
    Returns:
        [B, L, 3, 3]
    """
    v1, v2 = coords[:, :, 2] - coords[:, :, 1], coords[:, :, 0] - coords[:, :, 1]
    e1 = _normalize(v1)
    e2 = _normalize(v2 - e1 * torch.sum(e1 * v2, dim=-1, keepdim=True))
    return torch.stack([e1, e2, torch.linalg.cross(e1, e2, dim=-1)], dim=-2)


def backbone_dihedrals(coords: torch.Tensor, safe: bool) -> torch.Tensor:
    """[B, L, 6] cos and sin of (φ, ψ, ω) of each residue (φ of the first, ψ and ω of the last are 0).

    Args:
        coords: [B, L, 3, 3] N, CA, C.
        safe: fair-esm's GVP featuriser normalises with its NaN-safe `normalize` (True); its `DihedralFeatures`,
            with `F.normalize` (False). Both are kept, each where fair-esm uses it.
    Returns:
        [B, L, 6]
    """
    normalize = _normalize if safe else F.normalize
    X = coords[:, :, :3].reshape(coords.shape[0], -1, 3)  # [B, 3L, 3] N, CA, C, N, ...
    U = normalize(X[:, 1:] - X[:, :-1], dim=-1)
    u_2, u_1, u_0 = U[:, :-2], U[:, 1:-1], U[:, 2:]
    n_2 = normalize(torch.linalg.cross(u_2, u_1, dim=-1), dim=-1)
    n_1 = normalize(torch.linalg.cross(u_1, u_0, dim=-1), dim=-1)
    cos = torch.clamp(torch.sum(n_2 * n_1, -1), -1 + 1e-7, 1 - 1e-7)
    D = torch.sign(torch.sum(u_2 * n_1, -1)) * torch.acos(cos)
    D = F.pad(D, [1, 2]).reshape(coords.shape[0], -1, 3)
    return torch.cat([torch.cos(D), torch.sin(D)], -1)


def node_vectors(coords: torch.Tensor) -> torch.Tensor:
    """Unit vectors of each residue: to the next CA, to the previous CA (0 at the ends) and the virtual Cβ
    direction from N, CA, C.

    Args:
        coords: [B, L, 3, 3] N, CA, C.
    Returns:
        [B, L, 3, 3]
    """
    X = coords[:, :, 1]
    forward = F.pad(_normalize(X[:, 1:] - X[:, :-1]), [0, 0, 0, 1])
    backward = F.pad(_normalize(X[:, :-1] - X[:, 1:]), [0, 0, 1, 0])
    n, origin, c = coords[:, :, 0], coords[:, :, 1], coords[:, :, 2]
    c, n = _normalize(c - origin), _normalize(n - origin)
    bisector = _normalize(c + n)
    perp = _normalize(torch.linalg.cross(c, n, dim=-1))
    side = -bisector * math.sqrt(1 / 3) - perp * math.sqrt(2 / 3)
    return torch.stack([forward, backward, side], dim=-2)


# ---- GVP layers as fair-esm's `gvp_modules` (they differ from `models.gvp`: gating, norms, ε) -----------------
class GVP(nn.Module):
    """fair-esm's geometric vector perceptron (s [*, si], v [*, vi, 3]) -> (s [*, so], v [*, vo, 3]): scalars
    from [s, |W_h v|], vectors W_v W_h v gated by σ(W_g s') (`vector_gate`, after the scalar activation) or by
    σ(|v|); no gating when the vector activation is None. |x| = sqrt(Σx² + 1e-8)."""

    def __init__(self, in_dims, out_dims, vector_gate: bool = False, activations=(F.relu, torch.sigmoid)):
        super().__init__()
        (self.si, self.vi), (self.so, self.vo) = in_dims, out_dims
        self.scalar_act, self.vector_act = activations
        self.vector_gate = vector_gate
        h_dim = max(self.vi, self.vo)
        self.wh = nn.Linear(self.vi, h_dim, bias=False)
        self.ws = nn.Linear(h_dim + self.si, self.so)
        self.wv = nn.Linear(h_dim, self.vo, bias=False)
        if vector_gate and self.vector_act is not None:  # fair-esm builds it unused without a vector activation
            self.wg = nn.Linear(self.so, self.vo)

    def forward(self, x: GVPFeatures) -> GVPFeatures:
        """One perceptron.

        Args:
            x: (s [*, si], v [*, vi, 3]).
        Returns:
            (s [*, so], v [*, vo, 3]).
        """
        s, v = x
        vh = self.wh(v.transpose(-1, -2))  # [*, 3, h]
        s = self.ws(torch.cat([s, _norm(vh, dim=-2)], -1))
        if self.scalar_act:
            s = self.scalar_act(s)
        v = self.wv(vh).transpose(-1, -2)  # [*, vo, 3]
        if self.vector_act:
            gate = self.wg(s).unsqueeze(-1) if self.vector_gate else _norm(v, keepdim=True)
            v = v * self.vector_act(gate)
        return s, v


class GVPLayerNorm(nn.Module):
    """LayerNorm of the scalars; vectors divided by the root-mean-square norm of the nonzero vector channels."""

    def __init__(self, dims, eps: float = 1e-4):
        super().__init__()
        self.scalar_norm = nn.LayerNorm(dims[0])
        self.eps = eps

    def forward(self, x: GVPFeatures) -> GVPFeatures:
        """Normalised features.

        Args:
            x: (s [*, S], v [*, V, 3]).
        Returns:
            (s [*, S], v [*, V, 3]).
        """
        s, v = x
        vn = torch.sum(torch.square(v), -1, keepdim=True) + self.eps  # [*, V, 1]
        nonzero = vn > 2 * self.eps
        vn = torch.sum(vn * nonzero, dim=-2, keepdim=True) / (self.eps + torch.sum(nonzero, dim=-2, keepdim=True))
        return self.scalar_norm(s), nonzero * (v / torch.sqrt(vn + self.eps))


class GVPConv(nn.Module):
    """Messages GVP³([s_j, e_ji, s_i], [V_j, E_ji, V_i]) along edges j -> i, averaged at each target i."""

    def __init__(self, node_dims, edge_dims):
        super().__init__()
        message_in = (2 * node_dims[0] + edge_dims[0], 2 * node_dims[1] + edge_dims[1])
        self.message_func = nn.Sequential(GVP(message_in, node_dims, vector_gate=True),
                                          GVP(node_dims, node_dims, vector_gate=True),
                                          GVP(node_dims, node_dims, activations=(None, None)))

    def forward(self, x: GVPFeatures, source: torch.Tensor, target: torch.Tensor, edge: GVPFeatures) -> GVPFeatures:
        """Mean of the incoming messages (0 at a node without edges).

        Args:
            x: (s [M, S], v [M, V, 3]) node features (M nodes).
            source, target: [E] node indices of each edge.
            edge: (s [E, Se], v [E, Ve, 3]).
        Returns:
            (s [M, S], v [M, V, 3]).
        """
        s, v = x
        message_s, message_v = self.message_func((torch.cat([s[source], edge[0], s[target]], -1),
                                                  torch.cat([v[source], edge[1], v[target]], -2)))
        count = torch.bincount(target, minlength=len(s)).clamp(min=1).to(s.dtype)
        out_s = s.new_zeros(len(s), message_s.shape[-1]).index_add_(0, target, message_s.to(s.dtype))
        out_v = v.new_zeros((len(v),) + message_v.shape[1:]).index_add_(0, target, message_v.to(v.dtype))
        return out_s / count[:, None], out_v / count[:, None, None]


class GVPConvLayer(nn.Module):
    """Message passing, residual and GVP layer norm, a two-GVP feed-forward, residual and GVP layer norm."""

    def __init__(self, node_dims, edge_dims, drop_rate: float):
        super().__init__()
        self.conv = GVPConv(node_dims, edge_dims)
        self.norm = nn.ModuleList(GVPLayerNorm(node_dims) for _ in range(2))
        self.dropout = nn.ModuleList(GVPDropout(drop_rate) for _ in range(2))
        hidden = (4 * node_dims[0], 2 * node_dims[1])
        self.ff_func = nn.Sequential(GVP(node_dims, hidden, vector_gate=True),
                                     GVP(hidden, node_dims, activations=(None, None)))

    def forward(self, x: GVPFeatures, source: torch.Tensor, target: torch.Tensor, edge: GVPFeatures) -> GVPFeatures:
        """One GVP convolution layer.

        Args:
            x: (s [M, S], v [M, V, 3]) node features.
            source, target: [E] node indices of each edge.
            edge: (s [E, Se], v [E, Ve, 3]).
        Returns:
            (s [M, S], v [M, V, 3]).
        """
        dh = self.dropout[0](self.conv(x, source, target, edge))
        x = self.norm[0]((x[0] + dh[0], x[1] + dh[1]))
        dh = self.dropout[1](self.ff_func(x))
        return self.norm[1]((x[0] + dh[0], x[1] + dh[1]))


# ---- the graph and the encoder's parts ---------------------------------------------------------------------
def knn_graph(ca: torch.Tensor, coord_mask: torch.Tensor, padding_mask: torch.Tensor, k: int):
    """fair-esm's k nearest neighbours (self included) of each position, in one top-k over the padded batch.

    Neighbours with coordinates come first (by Cα distance), then positions without coordinates (by sequence
    distance), then padding; only pairs where both positions have coordinates become edges.

    Args:
        ca: [B, L, 3] Cα (0 where missing).
        coord_mask: [B, L] bool, positions with all three atoms.
        padding_mask: [B, L] bool, padding (and residues without N, as fair-esm).
    Returns:
        distance [B, L, K], neighbour [B, L, K] long, edge [B, L, K] bool (kept: both have coordinates).
    """
    length = ca.shape[1]
    coord_2d = coord_mask.unsqueeze(1) & coord_mask.unsqueeze(2)
    residue_2d = ~padding_mask.unsqueeze(1) & ~padding_mask.unsqueeze(2)
    D = coord_2d * _norm(ca.unsqueeze(1) - ca.unsqueeze(2), dim=-1)
    seqpos = torch.arange(length, device=ca.device)
    D_seq = torch.abs(seqpos.unsqueeze(1) - seqpos.unsqueeze(0))
    D_adjust = _nan_to_num(D) + (~coord_2d) * (1e8 + D_seq * 1e6) + (~residue_2d) * 1e10
    distance, neighbour = torch.topk(D_adjust, min(k, length), dim=-1, largest=False)
    return distance, neighbour, distance < 5e7


class GVPGraphEmbedding(nn.Module):
    """Node and edge features of the kNN graph, embedded by one GVP and a GVP layer norm each; the confidence's
    RBF added to the node scalars. Node input: 6 dihedral features and the coordinate flag, 3 vectors; edge input:
    16 distance RBFs, 16 sinusoids of the sequence offset and 2 missing-coordinate flags, the unit vector."""

    def __init__(self, node_dims, edge_dims, top_k_neighbors: int):
        super().__init__()
        self.top_k_neighbors = top_k_neighbors
        self.embed_node = nn.Sequential(GVP((7, 3), node_dims, activations=(None, None)), GVPLayerNorm(node_dims))
        self.embed_edge = nn.Sequential(GVP((34, 1), edge_dims, activations=(None, None)), GVPLayerNorm(edge_dims))
        self.embed_confidence = nn.Linear(16, node_dims[0])

    def forward(self, coords, coord_mask, padding_mask, confidence):
        """The embedded graph of a padded batch, its B L positions flattened.

        Args:
            coords: [B, L, 3, 3] (0 where missing); coord_mask, padding_mask: [B, L] bool; confidence [B, L].
        Returns:
            nodes (s [B L, S], v [B L, V, 3]), edges (s [E, Se], v [E, Ve, 3]), source [E], target [E].
        """
        B, L = coord_mask.shape
        with torch.no_grad():
            node_s = torch.cat([backbone_dihedrals(coords, safe=True), coord_mask.to(coords.dtype).unsqueeze(-1)], -1)
            node_v = node_vectors(coords)
            ca = coords[:, :, 1]
            distance, neighbour, kept = knn_graph(ca, coord_mask, padding_mask, self.top_k_neighbors)
            K = neighbour.shape[-1]
            source = torch.arange(L, device=ca.device).view(1, L, 1).expand(B, L, K)  # each position ...
            offset = (source - neighbour).unsqueeze(-1)  # ... sends to its neighbours
            frequency = torch.exp(torch.arange(0, 16, 2, dtype=torch.float32, device=ca.device)
                                  * -(math.log(10000.0) / 16))
            angles = offset * frequency
            vector = _normalize(ca.unsqueeze(2) - torch.gather(ca, 1, neighbour.reshape(B, L * K, 1).expand(-1, -1, 3))
                                .view(B, L, K, 3))
            no_coords = (~coord_mask).to(coords.dtype)
            edge_s = torch.cat([_nan_to_num(rbf(distance, 16, 0.0, 20.0)), torch.cos(angles), torch.sin(angles),
                                no_coords.unsqueeze(-1).expand(B, L, K).unsqueeze(-1),
                                torch.gather(no_coords, 1, neighbour.reshape(B, L * K)).view(B, L, K, 1)], -1)
            base = (torch.arange(B, device=ca.device) * L).view(B, 1, 1)
            edge_source, edge_target = (source + base)[kept], (neighbour + base)[kept]
            edge_s, edge_v = edge_s[kept], vector[kept].unsqueeze(-2)
        node_s, node_v = self.embed_node((node_s, node_v))
        node_s = node_s + self.embed_confidence(rbf(confidence, 16, 0.0, 1.0))
        edge = self.embed_edge((edge_s, edge_v))
        return (node_s.flatten(0, 1), node_v.flatten(0, 1)), edge, edge_source, edge_target


class GVPEncoder(nn.Module):
    """The graph embedding and `num_layers` GVP convolution layers."""

    def __init__(self, node_dims, edge_dims, top_k_neighbors: int, num_layers: int, dropout: float):
        super().__init__()
        self.embed_graph = GVPGraphEmbedding(node_dims, edge_dims, top_k_neighbors)
        self.encoder_layers = nn.ModuleList(GVPConvLayer(node_dims, edge_dims, dropout) for _ in range(num_layers))

    def forward(self, coords, coord_mask, padding_mask, confidence) -> GVPFeatures:
        """GVP features of a padded batch (arguments as `GVPGraphEmbedding`).

        Returns:
            (s [B, L, S], v [B, L, V, 3]).
        """
        nodes, edge, source, target = self.embed_graph(coords, coord_mask, padding_mask, confidence)
        for layer in self.encoder_layers:
            nodes = layer(nodes, source, target, edge)
        B, L = coord_mask.shape
        return nodes[0].view(B, L, -1), nodes[1].view(B, L, -1, 3)


class Normalize(nn.Module):
    """fair-esm's `Normalize`: gain (x - mean) / (sqrt(unbiased var + ε) + ε) + bias over the last dimension."""

    def __init__(self, features: int, epsilon: float = 1e-6):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))
        self.epsilon = epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised x.

        Args:
            x: [*, D].
        Returns:
            [*, D]
        """
        sigma = torch.sqrt(x.var(-1, keepdim=True) + self.epsilon)
        return self.gain * (x - x.mean(-1, keepdim=True)) / (sigma + self.epsilon) + self.bias


class DihedralFeatures(nn.Module):
    """(cos, sin) of φ, ψ, ω, embedded by a linear layer and `Normalize`."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.node_embedding = nn.Linear(6, embed_dim)
        self.norm_nodes = Normalize(embed_dim)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """Embedded dihedrals.

        Args:
            coords: [B, L, 3, 3] N, CA, C.
        Returns:
            [B, L, D]
        """
        return self.norm_nodes(self.node_embedding(backbone_dihedrals(coords, safe=False)))


class Attention(nn.Module):
    """Multi-head self-attention (fair-esm's `q_proj`, `k_proj`, `v_proj`, `out_proj`) through sdpa."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(embed_dim, embed_dim) for _ in range(4))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Self-attention.

        Args:
            x: [B, L, D].
            key_mask: [B, L] bool, True where a position may be attended to.
        Returns:
            [B, L, D]
        """
        B, L, D = x.shape
        q, k, v = (proj(x).view(B, L, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # [B, H, L, D / H]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :],
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class TransformerEncoderLayer(nn.Module):
    """Pre-norm Transformer layer: x + attention(LN(x)), then x + fc2(relu(fc1(LN(x)))), dropout on both."""

    def __init__(self, embed_dim: int, ffn_dim: int, num_heads: int, dropout: float, attention_dropout: float):
        super().__init__()
        self.self_attn = Attention(embed_dim, num_heads, attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim)
        self.fc1, self.fc2 = nn.Linear(embed_dim, ffn_dim), nn.Linear(ffn_dim, embed_dim)
        self.final_layer_norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """One layer.

        Args:
            x: [B, L, D].
            key_mask: [B, L] bool, True where a position may be attended to.
        Returns:
            [B, L, D]
        """
        x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), key_mask))
        return x + self.dropout(self.fc2(F.relu(self.fc1(self.final_layer_norm(x)))))


def sinusoidal_positions(padding_mask: torch.Tensor, embed_dim: int, padding_idx: int = 1) -> torch.Tensor:
    """fair-esm's `SinusoidalPositionalEmbedding`: position l is padding_idx + 1 + l, 0 on padding.

    Args:
        padding_mask: [B, L] bool.
    Returns:
        [B, L, D]
    """
    half = embed_dim // 2
    frequency = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000) / (half - 1)))
    position = torch.arange(padding_mask.shape[1], dtype=torch.float) + padding_idx + 1
    angles = position.unsqueeze(1) * frequency.unsqueeze(0)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).to(padding_mask.device)
    if embed_dim % 2:
        table = F.pad(table, [0, 1])
    return table.unsqueeze(0) * ~padding_mask.unsqueeze(-1)


# ---- weights ----------------------------------------------------------------------------------------------
class ESMIF1WeightError(FileNotFoundError):
    """A missing or unreadable ESM-IF1 release file; the message says where it was looked for and what to do."""


def release_file(path: str, download: bool = False) -> str:
    """The release file at `path` (the file, or a folder holding `esm_if1_gvp4_t16_142M_UR50.pt`); with
    `download`, fetched from fair-esm's URL into that folder when absent (`data.datasets.download`)."""
    path = os.path.expanduser(str(path))
    file = path if path.endswith(".pt") else os.path.join(path, RELEASE + ".pt")
    if not os.path.isfile(file):
        if not download:
            raise ESMIF1WeightError(f"ESM-IF1 weights {os.path.basename(file)} not found in "
                                    f"{os.path.dirname(file) or '.'}; download {URL} into that folder (or set "
                                    "`download: true`), or set `pretrained: false` for random weights.")
        from ..data.datasets.download import download as fetch

        file = str(fetch(URL, os.path.dirname(file) or ".", name=os.path.basename(file)))
    return file


def read_release(file: str) -> Tuple[argparse.Namespace, Dict[str, torch.Tensor]]:
    """(args, model state dict) of a release file, read with `torch.load(weights_only=True)` allowing only
    `argparse.Namespace` (as ESM-2's `load_esm_checkpoint`).

    Returns:
        (args, {name: tensor [*]}): the release's architecture and its whole state dict (encoder and decoder).
    """
    from .esm.architecture import load_esm_checkpoint

    try:
        data = load_esm_checkpoint(file)
        return data["args"], data["model"]
    except Exception as error:  # noqa: BLE001 - a damaged or foreign file is one sentence
        raise ESMIF1WeightError(f"{file}: not a readable ESM-IF1 release ({type(error).__name__}: "
                                f"{str(error).splitlines()[0] if str(error) else ''}); download it again from "
                                f"{URL}.") from None


def encoder_state(release_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The encoder's state dict (this module's names) from a release's `model` state dict: fair-esm's renaming
    (`RELEASE_NAMES`), the `encoder.` part only (the decoder's keys dropped), the `<mask>` row of `embed_tokens`
    as `mask_embedding`, and the positional embedding's placeholder buffer dropped.

    Args:
        release_state: {name: tensor [*]} the release's `model` (internal names).
    Returns:
        {name: tensor [*]} loadable into `ESMIF1` (`mask_embedding` [D]).
    """
    import esm

    mask_idx = esm.data.Alphabet.from_architecture("invariant_gvp").mask_idx
    state = {}
    for name, value in release_state.items():
        for old, new in RELEASE_NAMES:
            name = name.replace(old, new)
        if not name.startswith("encoder.") or "version" in name or name.endswith("embed_positions._float_tensor"):
            continue
        name = name[len("encoder."):]
        if name == "embed_tokens.weight":
            name, value = "mask_embedding", value[mask_idx]
        state[name] = value
    return state


def _architecture(args: argparse.Namespace) -> Dict[str, Any]:
    missing = [key for key in RELEASE_ARCHITECTURE if not hasattr(args, key)]
    if missing:
        raise ESMIF1WeightError(f"the release's args lack {', '.join(missing)}: not an ESM-IF1 release file.")
    return {key: getattr(args, key) for key in RELEASE_ARCHITECTURE}


@register
class ESMIF1(StructureEncoder):
    """ESM-IF1's structure encoder (GVP-GNN + Transformer) on the backbone; see the module docstring.

    Args:
        input_dim: width of `network`'s input: 21 (the one-hot residue types, not read) alone and in parallel or
            cross fusion; the language model's width in series fusion, read through `input_projection` (derived
            by the assembly; leave it out of configs).
        path: the release file `esm_if1_gvp4_t16_142M_UR50.pt`, or a folder holding it.
        pretrained: False: random weights of the architecture below (default: the release's).
        download: fetch the release from fair-esm's URL into `path`'s folder when it is absent.
        confidence: "one" (1.0 for every residue, as fair-esm's `get_encoder_output`) or "plddt" (`bfactor / 100`
            of AlphaFold DB structures, clamped to [0, 1]).
        readout: "mean" or "sum" of the residue features: the graph feature.
        embed_dim, layers, attention_heads, ffn_dim: the Transformer's architecture with `pretrained: false` (with
            the release they come from its `args`; a value given must then agree).
        gvp_layers, gvp_node_dims, gvp_edge_dims, top_k_neighbors: the GVP-GNN's, likewise.
        dropout, attention_dropout, gvp_dropout: the dropout rates, likewise.
        graph_construction_model: unused (ESM-IF1 builds its own kNN graph); allowed for configs that have one.
    `network(graph, input)` returns residue_feature [N, embed_dim] and graph_feature [B, embed_dim].
    """

    small_config = {"pretrained": False, "embed_dim": 16, "layers": 1, "attention_heads": 2, "ffn_dim": 32,
                    "gvp_layers": 1, "gvp_node_dims": [8, 4], "gvp_edge_dims": [4, 1], "top_k_neighbors": 8}

    def __init__(self, input_dim: int = ONE_HOT_DIM, path: Optional[str] = None, pretrained: bool = True,
                 download: bool = False, confidence: str = "one", readout: str = "mean",
                 embed_dim: Optional[int] = None, layers: Optional[int] = None, attention_heads: Optional[int] = None,
                 ffn_dim: Optional[int] = None, gvp_layers: Optional[int] = None,
                 gvp_node_dims: Optional[Tuple[int, int]] = None, gvp_edge_dims: Optional[Tuple[int, int]] = None,
                 top_k_neighbors: Optional[int] = None, dropout: Optional[float] = None,
                 attention_dropout: Optional[float] = None, gvp_dropout: Optional[float] = None,
                 graph_construction_model: Optional[nn.Module] = None):
        super().__init__(graph_construction_model)
        if confidence not in ("one", "plddt"):
            raise ValueError(f"ESMIF1: confidence must be 'one' or 'plddt', got {confidence!r}.")
        if readout not in ("mean", "sum"):
            raise ValueError(f"ESMIF1: readout must be 'mean' or 'sum', got {readout!r}.")
        given = {"encoder_embed_dim": embed_dim, "encoder_layers": layers, "encoder_attention_heads": attention_heads,
                 "encoder_ffn_embed_dim": ffn_dim, "gvp_num_encoder_layers": gvp_layers,
                 "gvp_node_hidden_dim_scalar": gvp_node_dims and gvp_node_dims[0],
                 "gvp_node_hidden_dim_vector": gvp_node_dims and gvp_node_dims[1],
                 "gvp_edge_hidden_dim_scalar": gvp_edge_dims and gvp_edge_dims[0],
                 "gvp_edge_hidden_dim_vector": gvp_edge_dims and gvp_edge_dims[1],
                 "gvp_top_k_neighbors": top_k_neighbors, "dropout": dropout, "attention_dropout": attention_dropout,
                 "gvp_dropout": gvp_dropout}
        state = None
        if pretrained:
            if path is None:
                raise ValueError(f"ESMIF1: pretrained weights need `path` (the release file {RELEASE}.pt or its "
                                 "folder), or set `pretrained: false` for random weights.")
            file = release_file(path, download)
            args, release_state = read_release(file)
            arch = _architecture(args)
            for key, value in given.items():
                if value is not None and value != arch[key]:
                    raise ValueError(f"ESMIF1: the release has {key} = {arch[key]}, the config asks {value}; remove "
                                     "the architecture options when loading the release.")
            state = encoder_state(release_state)
        else:
            arch = {key: RELEASE_ARCHITECTURE[key] if value is None else value for key, value in given.items()}
        self.input_dim = input_dim
        self.output_dim = D = arch["encoder_embed_dim"]
        self.confidence, self.readout = confidence, readout
        node_dims = (arch["gvp_node_hidden_dim_scalar"], arch["gvp_node_hidden_dim_vector"])
        edge_dims = (arch["gvp_edge_hidden_dim_scalar"], arch["gvp_edge_hidden_dim_vector"])
        # the release's parts are built without initialising what its weights replace (`checkpoint.skipping_init`)
        with skipping_init() if state is not None else contextlib.nullcontext():
            self.mask_embedding = nn.Parameter(torch.randn(D) * D ** -0.5)  # fair-esm's nn.Embedding: N(0, D^-1/2)
            self.embed_gvp_input_features = nn.Linear(15, D)
            self.embed_confidence = nn.Linear(16, D)
            self.embed_dihedrals = DihedralFeatures(D)
            self.gvp_encoder = GVPEncoder(node_dims, edge_dims, arch["gvp_top_k_neighbors"],
                                          arch["gvp_num_encoder_layers"], arch["gvp_dropout"])
            self.embed_gvp_output = nn.Linear(node_dims[0] + 3 * node_dims[1], D)
            self.dropout_module = nn.Dropout(arch["dropout"])
            self.layers = nn.ModuleList(
                TransformerEncoderLayer(D, arch["encoder_ffn_embed_dim"], arch["encoder_attention_heads"],
                                        arch["dropout"], arch["attention_dropout"])
                for _ in range(arch["encoder_layers"]))
            self.layer_norm = nn.LayerNorm(D)
        if state is not None:
            load_state_dict_checked(self, state, file, assign=True)
        # series fusion: the language model's features enter through a projection that starts at zero
        self.input_projection = None
        if input_dim != ONE_HOT_DIM:
            self.input_projection = nn.Linear(input_dim, D)
            nn.init.zeros_(self.input_projection.weight)
            nn.init.zeros_(self.input_projection.bias)

    def backbone(self, batch: ProteinBatch):
        """fair-esm's `CoordBatchConverter` layout of a packed batch (see the module docstring).

        Args:
            batch: ProteinBatch [B proteins, N residues].
        Returns:
            coords [B, L, 3, 3] (N, CA, C; inf at BOS/EOS, NaN on padding and missing atoms), confidence [B, L],
            padding_mask [B, L] bool, and the padded position of each residue: (protein [N], position [N]).
        """
        coords = batch.atom_pos[:, :3].float().masked_fill(~batch.atom_mask[:, :3].unsqueeze(-1), float("nan"))
        if self.confidence == "plddt":
            confidence = (batch.bfactor.float() / 100).clamp(0, 1)
        else:
            confidence = coords.new_ones(len(coords))
        num_residues = batch.num_residues.to(coords.device)
        B, length = batch.batch_size, (int(num_residues.max()) if batch.batch_size else 0) + 2
        protein = batch.residue2graph
        position = functional.position_in_segment(num_residues, protein) + 1  # after BOS
        padded = coords.new_full((B, length, 3, 3), float("nan"))
        padded[:, 0] = float("inf")
        padded[torch.arange(B, device=coords.device), num_residues + 1] = float("inf")
        padded[protein, position] = coords
        padded_confidence = coords.new_full((B, length), -1.0)
        padded_confidence[protein, position] = confidence
        padding_mask = torch.isnan(padded[:, :, 0, 0])
        coord_mask = torch.isfinite(padded.sum(-2).sum(-1))
        padded_confidence = padded_confidence * coord_mask + (-1.0) * padding_mask
        return padded, padded_confidence, padding_mask, (protein, position)

    def embed(self, coords: torch.Tensor, padding_mask: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        """fair-esm's `forward_embedding`: the sum of the token, dihedral, GVP output, confidence and GVP input
        embeddings, plus the position embedding.

        Args:
            coords: [B, L, 3, 3] (non-finite where missing).
            padding_mask: [B, L] bool.
            confidence: [B, L].
        Returns:
            [B, L, D]
        """
        coord_mask = torch.all(torch.all(torch.isfinite(coords), dim=-1), dim=-1)
        coords = _nan_to_num(coords)
        tokens = (self.mask_embedding * math.sqrt(self.output_dim)) * ~padding_mask.unsqueeze(-1)
        gvp_s, gvp_v = self.gvp_encoder(coords, coord_mask, padding_mask, confidence)
        R = rotation_frames(coords).transpose(-2, -1)
        gvp_out = self.embed_gvp_output(torch.cat([gvp_s, _rotate(gvp_v, R).flatten(-2, -1)], -1))
        input_features = torch.cat([backbone_dihedrals(coords, safe=True), _rotate(node_vectors(coords), R)
                                    .flatten(-2, -1)], -1)
        embedding = (tokens + self.embed_dihedrals(coords) + gvp_out
                     + self.embed_confidence(rbf(confidence, 16, 0.0, 1.0))
                     + self.embed_gvp_input_features(input_features))
        return embedding + sinusoidal_positions(padding_mask, self.output_dim).to(embedding.dtype)

    def forward_padded(self, coords: torch.Tensor, padding_mask: torch.Tensor, confidence: torch.Tensor,
                       extra: Optional[torch.Tensor] = None) -> torch.Tensor:
        """fair-esm's `GVPTransformerEncoder.forward` on a padded batch (its BOS/EOS included).

        Args:
            coords: [B, L, 3, 3].
            padding_mask: [B, L] bool.
            confidence: [B, L].
            extra: [B, L, D] (optional) added to the embedding (the series projection of the language model).
        Returns:
            [B, L, D] the last layer's features after the final layer norm.
        """
        x = self.embed(coords, padding_mask, confidence)
        if extra is not None:
            x = x + extra
        x = self.dropout_module(x) * ~padding_mask.unsqueeze(-1)
        for layer in self.layers:
            x = layer(x, ~padding_mask)
        return self.layer_norm(x)

    def encode(self, graph: ProteinBatch, residue_mask: Optional[torch.Tensor] = None) -> Features:
        """`network` without input: ESM-IF1 reads no residue types, so `residue_mask` changes nothing.

        Args:
            graph: ProteinBatch [B proteins, N residues].
            residue_mask: [N] bool (optional), ignored.
        Returns:
            {"residue_feature": [N, D], "graph_feature": [B, D]}.
        """
        return self.network(graph, None)

    def network(self, graph: ProteinBatch, input: Optional[torch.Tensor]) -> Features:
        """Features of the proteins' backbones; `input` read only through the series projection.

        Args:
            graph: ProteinBatch [B proteins, N residues] with atom_pos [N, 14, 3], atom_mask [N, 14] (and bfactor
                [N] for `confidence: plddt`).
            input: [N, input_dim] the language model's features (series fusion), or the one-hot types / None
                (not read).
        Returns:
            {"residue_feature": [N, D], "graph_feature": [B, D]} (D = `output_dim`).
        """
        coords, confidence, padding_mask, (protein, position) = self.backbone(graph)
        extra = None
        if self.input_projection is not None and input is not None:
            projected = self.input_projection(input)
            extra = projected.new_zeros(coords.shape[:2] + projected.shape[-1:])
            extra[protein, position] = projected
        x = self.forward_padded(coords, padding_mask, confidence, extra)
        residue_feature = x[protein, position]
        return {"residue_feature": residue_feature,
                "graph_feature": functional.readout(residue_feature, protein, graph.batch_size, self.readout)}
