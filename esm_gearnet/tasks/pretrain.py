"""Self-supervised pre-training objectives with the original config names: multiview contrast (`Unsupervised`
around `MultiviewContrast`), residue type, distance, angle and dihedral prediction.

Every objective is a `Task` (an encoder and a head) whose `forward(batch)` returns (loss, logged values); it
reaches the encoder only through the `Encoder` contract: `encoder(batch, residue_mask)`, or `construct` then
`encode` where it edits the graph in between. Information an objective asks the model to predict is removed
from everything the model sees: masked residues become ESM's `<mask>` token, a zero structure input row, an
unknown residue type (so edge features carry nothing) and lose their side-chain atoms; sampled edges are removed
together with every other edge between the same two residues.

The original's `Unsupervised` task around `MultiviewContrast` is one task here, `MultiviewContrast`; the config
layout maps onto it in `esm_gearnet.assembly.build`.

Shapes: B proteins, N residues, E edges, D channels, P sampled residue pairs or paths.
"""
from __future__ import annotations

import math
import random
from typing import Dict, Sequence

import torch
from torch.nn import functional as F

from ..data import constants, foldseek
from ..data.protein import ProteinBatch
from ..layers import MLP, functional
from ..models import Encoder
from ..registry import register
from .base import Task


# ---- sampling helpers ---------------------------------------------------------------------------------------
def sample_in_segments(segment: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`counts[g]` items drawn uniformly without replacement among those with `segment == g`.

    Args:
        segment: [M] long, the group of each of M items.
        counts: [G] long, how many to draw in each of G groups.
    Returns:
        [M] bool, the items drawn.
    """
    num = len(segment)
    perm = torch.argsort(torch.rand(num, device=segment.device))
    perm = perm[torch.argsort(segment[perm], stable=True)]
    sizes = torch.bincount(segment, minlength=len(counts))
    rank = torch.empty_like(segment)
    rank[perm] = torch.arange(num, device=segment.device) - functional.offsets(sizes)[segment[perm]]
    return rank < counts[segment]


def sample_residues(graph: ProteinBatch, counts: torch.Tensor) -> torch.Tensor:
    """`counts[b]` residues of known type drawn without replacement in each protein b.

    Args:
        graph: ProteinBatch [B proteins, N residues].
        counts: [B] long.
    Returns:
        [N] bool, the residues drawn.

    DEVIATION: the original's residue-type masking drew its residues with replacement from all residues (so a
    residue could be drawn twice, and unknown residues were drawn with targets that mean nothing).
    """
    known = graph.residue_type < constants.NUM_RESIDUE_TYPES
    segment = torch.where(known, graph.residue2graph, torch.full_like(graph.residue2graph, graph.batch_size))
    return sample_in_segments(segment, torch.cat([counts, counts.new_zeros(1)]))


def mask_residues(graph: ProteinBatch, mask: torch.Tensor, three_di: bool = False) -> ProteinBatch:
    """The batch with the residues of `mask` made unknown: type 20 and no side-chain atoms.

    Args:
        graph: ProteinBatch [B proteins, N residues].
        mask: [N] bool, the residues to mask.
        three_di: whether to compute 3Di states the batch lacks, before the side chains go.
    Returns:
        ProteinBatch [B, N] with new `residue_type` [N], `atom_mask` [N, 14], `atom_pos` [N, 14, 3] (and
        `three_di_state` [N] or None).

    The batch's 3Di states, if it has them, stay: they describe the structure before masking. With `three_di`
    (an encoder that `reads_three_di`) a batch without them gets them, computed before the side chains go
    (3Di reads CB), as SaProt keeps a masked residue's structure token.
    """
    states = graph.three_di_state
    if three_di and states is None:
        states = foldseek.batch_states(graph)
    side_chain = mask.unsqueeze(-1) & (torch.arange(constants.NUM_ATOM_SLOTS, device=mask.device) >= 4)
    return graph.replace(residue_type=graph.residue_type.masked_fill(mask, constants.UNKNOWN),
                         atom_mask=graph.atom_mask & ~side_chain,
                         atom_pos=graph.atom_pos.masked_fill(side_chain.unsqueeze(-1), 0.0),
                         three_di_state=states)


def drop_edges(graph: ProteinBatch, keep: torch.Tensor) -> ProteinBatch:
    """The graph with only some of its edges.

    Args:
        graph: constructed ProteinBatch with `edge_list` [E, 3] (and `edge_feature` [E, De]).
        keep: [E] bool, the edges to keep.
    Returns:
        ProteinBatch with `edge_list` [E', 3] (and `edge_feature` [E', De]), E' = keep.sum().
    """
    feature = graph.edge_feature[keep] if graph.edge_feature is not None else None
    return graph.replace(edge_list=graph.edge_list[keep], edge_feature=feature)


def remove_pairs(graph: ProteinBatch, node_a: torch.Tensor, node_b: torch.Tensor) -> ProteinBatch:
    """The batch without any edge between residues node_a[p] and node_b[p] (either direction, any relation).

    Args:
        graph: constructed ProteinBatch [B proteins, N residues] with `edge_list` [E, 3].
        node_a, node_b: [P] long residue indices.
    Returns:
        ProteinBatch with `edge_list` [E', 3], E' <= E.
    """
    n = graph.num_residue
    pair = torch.minimum(node_a, node_b) * n + torch.maximum(node_a, node_b)
    src, dst = graph.edge_list[:, 0], graph.edge_list[:, 1]
    edge = torch.minimum(src, dst) * n + torch.maximum(src, dst)
    return drop_edges(graph, ~torch.isin(edge, pair))


def sample_edges(graph: ProteinBatch, num_sample: int) -> torch.Tensor:
    """`num_sample` edges drawn with replacement in every protein that has edges; self-loops (sequential offset
    0) are never drawn.

    Args:
        graph: constructed ProteinBatch [B proteins, N residues] with `edge_list` [E, 3].
        num_sample: edges per protein.
    Returns:
        [S] long indices into `edge_list`, S = num_sample × the proteins that have edges besides self-loops.
    """
    candidates = (graph.edge_list[:, 0] != graph.edge_list[:, 1]).nonzero().flatten()
    edge2graph = graph.residue2graph[graph.edge_list[candidates, 1]]
    order = candidates[torch.argsort(edge2graph, stable=True)]
    sizes = torch.bincount(edge2graph, minlength=graph.batch_size)
    has = (sizes > 0).nonzero().flatten()
    pick = (torch.rand(len(has), num_sample, device=sizes.device) * sizes[has, None]).long()
    return order[(functional.offsets(sizes)[has, None] + pick).flatten()]


def next_edges(graph: ProteinBatch, node: torch.Tensor) -> torch.Tensor:
    """For each residue of `node`, a random edge leaving it to another residue.

    Args:
        graph: constructed ProteinBatch [B proteins, N residues] with `edge_list` [E, 3].
        node: [P] long residue indices.
    Returns:
        [P] long indices into `edge_list`, -1 where the residue has no such edge.
    """
    candidates = (graph.edge_list[:, 0] != graph.edge_list[:, 1]).nonzero().flatten()
    src = graph.edge_list[candidates, 0]
    order = candidates[torch.argsort(src, stable=True)]
    degree = torch.bincount(src, minlength=graph.num_residue)
    pick = (torch.rand(len(node), device=node.device) * degree[node]).long()
    index = order[(functional.offsets(degree)[node] + pick).clamp(max=max(len(order) - 1, 0))]
    return torch.where(degree[node] > 0, index, torch.full_like(index, -1))


# ---- residue type ---------------------------------------------------------------------------------------------
@register
class ResidueTypePrediction(Task):
    """Predict the types of `mask_rate` of the residues (at least one per protein) from the masked protein.

    Args:
        encoder: the `Encoder` (its graph is built after masking); mask_rate: share of residues masked;
        num_mlp_layer: head depth.
    """

    def __init__(self, encoder: Encoder, mask_rate: float = 0.15, num_mlp_layer: int = 2, verbose: int = 0):
        super().__init__(encoder)
        self.mask_rate = mask_rate
        dim = encoder.output_dim
        self.mlp = MLP(dim, [dim] * (num_mlp_layer - 1) + [constants.NUM_RESIDUE_TYPES])

    def sample_mask(self, graph: ProteinBatch) -> torch.Tensor:
        """The residues to mask, `mask_rate` of each protein's (at least one).

        Args:
            graph: ProteinBatch [B proteins, N residues].
        Returns:
            [N] bool.
        """
        return sample_residues(graph, (graph.num_residues.float() * self.mask_rate).long().clamp(min=1))

    def forward(self, batch):
        """Cross entropy of the masked residues' types from their features [N, D].

        Args:
            batch: {"graph": ProteinBatch [B proteins, N residues], ...}.
        Returns:
            (loss [], {"loss": [], "accuracy": []} without gradient).
        """
        graph = batch["graph"]
        mask = self.sample_mask(graph)
        masked = mask_residues(graph, mask, self.encoder.reads_three_di)
        feature = self.encoder(masked, residue_mask=mask)["residue_feature"]
        logits, target = self.mlp(feature[mask]), graph.residue_type[mask]
        loss = F.cross_entropy(logits, target)
        return loss, {"loss": loss.detach(), "accuracy": (logits.argmax(-1) == target).float().mean()}


# ---- distance, angle, dihedral --------------------------------------------------------------------------------
class _PathPrediction(Task):
    """Sample paths of `num_points` residues along edges, remove their edges, predict their geometry from the
    concatenated features of the path's residues."""
    num_points: int

    def __init__(self, encoder: Encoder, num_sample: int, num_output: int, num_mlp_layer: int):
        super().__init__(encoder)
        self.num_sample = num_sample
        hidden = [encoder.output_dim] * (num_mlp_layer - 1)
        self.mlp = MLP(self.num_points * encoder.output_dim, hidden + [num_output])

    def sample_paths(self, graph: ProteinBatch) -> torch.Tensor:
        """Paths i-j(-k(-l)) along edges, without repeated residues.

        Args:
            graph: constructed ProteinBatch [B proteins, N residues] with `edge_list` [E, 3].
        Returns:
            [P, num_points] long residue indices.
        """
        edges = sample_edges(graph, self.num_sample)
        path = [graph.edge_list[edges, 0], graph.edge_list[edges, 1]]
        valid = torch.ones_like(path[0], dtype=torch.bool)
        while len(path) < self.num_points:
            step = next_edges(graph, path[-1])
            node = graph.edge_list[step.clamp(min=0), 1]
            valid &= (step >= 0) & ~torch.stack([node == p for p in path]).any(0)
            path.append(node)
        return torch.stack(path, -1)[valid]

    def target(self, pos: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
        """What is predicted for each path.

        Args:
            pos: [N, 3] CA positions (Å).
            path: [P, num_points] residue indices (`sample_paths`).
        Returns:
            [P]
        """
        raise NotImplementedError

    def criterion(self, pred: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Cross entropy and accuracy.

        Args:
            pred: [P, num_class] logits.
            target: [P] long class indices.
        Returns:
            {"loss": [], "accuracy": []}.
        """
        loss = F.cross_entropy(pred, target)
        return {"loss": loss, "accuracy": (pred.argmax(-1) == target).float().mean()}

    def forward(self, batch):
        """The geometry of sampled paths predicted from the features of their residues, their edges removed.

        Args:
            batch: {"graph": ProteinBatch [B proteins, N residues], ...}.
        Returns:
            (loss [], {name: [] detached}): `criterion`'s values ("loss", and "accuracy" for the classes).
        """
        graph = self.encoder.construct(batch["graph"])
        path = self.sample_paths(graph)
        hidden = remove_pairs(graph, path[:, :-1].flatten(), path[:, 1:].flatten())
        feature = self.encoder.encode(hidden)["residue_feature"]
        values = self.criterion(self.mlp(feature[path].flatten(1)), self.target(graph.pos, path))
        return values["loss"], {k: v.detach() for k, v in values.items()}


@register
class DistancePrediction(_PathPrediction):
    """Regress the Cα distance of `num_sample` sampled edges per protein, removed from the graph first.

    Args:
        encoder; num_sample: edges per protein; num_mlp_layer: head depth.
    """
    num_points = 2

    def __init__(self, encoder: Encoder, num_sample: int = 256, num_mlp_layer: int = 2, verbose: int = 0):
        super().__init__(encoder, num_sample, 1, num_mlp_layer)

    def target(self, pos, path):
        """The CA distance of each sampled edge.

        Args:
            pos: [N, 3] CA positions (Å).
            path: [P, 2] residue indices.
        Returns:
            [P] distances (Å).
        """
        return (pos[path[:, 0]] - pos[path[:, 1]]).norm(dim=-1)

    def criterion(self, pred, target):
        """Mean squared error.

        Args:
            pred: [P, 1] predicted distances (Å).
            target: [P] distances (Å).
        Returns:
            {"loss": []}.
        """
        return {"loss": F.mse_loss(pred.squeeze(-1), target)}


class _GeometryClassification(_PathPrediction):
    def __init__(self, encoder: Encoder, num_sample: int = 512, num_class: int = 8, num_mlp_layer: int = 2,
                 verbose: int = 0):
        super().__init__(encoder, num_sample, num_class, num_mlp_layer)
        self.num_class = num_class


@register
class AnglePrediction(_GeometryClassification):
    """Classify the angle i-j-k (at j) of sampled pairs of edges i→j→k into `num_class` bins over [0, π); both
    edges (every relation between those residues) are removed from the graph first."""
    num_points = 3

    def target(self, pos, path):
        """The bin of each angle i-j-k.

        Args:
            pos: [N, 3] CA positions (Å).
            path: [P, 3] residue indices.
        Returns:
            [P] long bins in [0, num_class).
        """
        angle = functional.angle_between(pos[path[:, 0]] - pos[path[:, 1]], pos[path[:, 2]] - pos[path[:, 1]])
        return functional.to_bins(angle, self.num_class, 0.0, math.pi)


@register
class DihedralPrediction(_GeometryClassification):
    """Classify the dihedral angle of sampled paths i→j→k→l into `num_class` bins; the three edges are removed
    first. By default the angle is unsigned, over [0, π), as in the original; `signed: true` bins the signed
    angle over [-π, π)."""
    num_points = 4

    def __init__(self, encoder: Encoder, num_sample: int = 512, num_class: int = 8, num_mlp_layer: int = 2,
                 signed: bool = False, verbose: int = 0):
        super().__init__(encoder, num_sample, num_class, num_mlp_layer)
        self.signed = signed

    def target(self, pos, path):
        """The bin of each dihedral angle i-j-k-l.

        Args:
            pos: [N, 3] CA positions (Å).
            path: [P, 4] residue indices.
        Returns:
            [P] long bins in [0, num_class).
        """
        angle = functional.dihedral(*(pos[path[:, k]] for k in range(4)), signed=self.signed)
        low = -math.pi if self.signed else 0.0
        return functional.to_bins(angle, self.num_class, low, math.pi)


# ---- multiview contrast ---------------------------------------------------------------------------------------
@register
class SubsequenceNode:
    """Crop: a random window of at most `max_length` consecutive residues of each protein."""

    def __init__(self, max_length: int = 100):
        self.max_length = max_length

    def __call__(self, graph: ProteinBatch) -> ProteinBatch:
        """The crop.

        Args:
            graph: ProteinBatch [B proteins, N residues].
        Returns:
            ProteinBatch [B, N'] with N' = the sum of min(num_residues, max_length).
        """
        lengths = graph.num_residues
        start = (torch.rand(len(lengths), device=lengths.device) * (lengths - self.max_length + 1).clamp(min=1)).long()
        position = functional.position_in_segment(lengths, graph.residue2graph)
        offset = position - start[graph.residue2graph]
        return graph.subresidue((offset >= 0) & (offset < self.max_length))


@register
class SubspaceNode:
    """Crop: the residues within a radius of a random centre residue of each protein; the radius is
    `min_radius` or, if larger, the distance that holds `min_neighbor` residues."""

    def __init__(self, entity_level: str = "node", min_neighbor: int = 15, min_radius: float = 15.0):
        if entity_level not in ("node", "residue"):
            raise ValueError(f"SubspaceNode: entity_level {entity_level!r} is not supported; use node (residues).")
        self.min_neighbor, self.min_radius = min_neighbor, min_radius

    def __call__(self, graph: ProteinBatch) -> ProteinBatch:
        """The crop.

        Args:
            graph: ProteinBatch [B proteins, N residues].
        Returns:
            ProteinBatch [B, N'], N' <= N.
        """
        lengths = graph.num_residues
        centre = functional.offsets(lengths) + (torch.rand(len(lengths), device=lengths.device) * lengths).long()
        distance = (graph.pos - graph.pos[centre[graph.residue2graph]]).norm(dim=-1)
        order = torch.argsort(distance)
        order = order[torch.argsort(graph.residue2graph[order], stable=True)]
        kth = functional.offsets(lengths) + (lengths.clamp(max=self.min_neighbor) - 1).clamp(min=0)
        radius = distance[order[kth]].clamp(min=self.min_radius)
        return graph.subresidue(distance <= radius[graph.residue2graph])


@register
class IdentityNode:
    """Noise: none."""

    def __call__(self, graph: ProteinBatch) -> ProteinBatch:
        """The graph itself.

        Args:
            graph: ProteinBatch [B proteins, N residues].
        Returns:
            ProteinBatch [B, N], `graph`.
        """
        return graph


@register
class RandomEdgeMask:
    """Noise: remove `mask_rate` of each protein's edges at random (after graph construction)."""

    def __init__(self, mask_rate: float = 0.15):
        self.mask_rate = mask_rate

    def __call__(self, graph: ProteinBatch) -> ProteinBatch:
        """The graph without some of its edges.

        Args:
            graph: constructed ProteinBatch [B proteins, N residues] with `edge_list` [E, 3].
        Returns:
            ProteinBatch [B, N] with `edge_list` [E', 3] (and `edge_feature` [E', De]), E' <= E.
        """
        edge2graph = graph.residue2graph[graph.edge_list[:, 1]]
        counts = (graph.num_edges.float() * self.mask_rate).long()
        return drop_edges(graph, ~sample_in_segments(edge2graph, counts))


@register
class MultiviewContrast(Task):
    """Two views of every protein (a random crop, graph construction, a random noise), the encoder's protein
    features projected by an MLP, cosine similarities over `tau`, InfoNCE with the other view as the positive.

    The original nested it as `task: {class: Unsupervised, model: {class: MultiviewContrast, model: ENCODER}}`;
    `esm_gearnet.assembly.build` maps that layout onto this task. Made symmetric: the loss averages both directions
    (view 1 → view 2 and back); the original used one.

    Args:
        encoder: the `Encoder`; crop_funcs, noise_funcs: one of each is drawn per view; num_mlp_layer: depth of
        the projection; tau: temperature.
    """

    def __init__(self, encoder: Encoder, crop_funcs: Sequence = (), noise_funcs: Sequence = (),
                 num_mlp_layer: int = 2, activation: str = "relu", tau: float = 0.07):
        super().__init__(encoder)
        if activation != "relu":
            raise ValueError(f"MultiviewContrast: activation must be 'relu' (the original's), got {activation!r}.")
        self.crop_funcs = list(crop_funcs) or [IdentityNode()]
        self.noise_funcs = list(noise_funcs) or [IdentityNode()]
        self.tau = tau
        self.mlp = MLP(encoder.output_dim, [encoder.output_dim] * num_mlp_layer)

    def view(self, graph: ProteinBatch) -> ProteinBatch:
        """One random view: a crop of each protein, its graph, then noise.

        Args:
            graph: ProteinBatch [B proteins, N residues], before graph construction.
        Returns:
            constructed ProteinBatch [B, N'] (N' <= N) with `edge_list` [E, 3].
        """
        graph = random.choice(self.crop_funcs)(graph)
        return random.choice(self.noise_funcs)(self.encoder.construct(graph))

    def forward(self, batch):
        """InfoNCE between the graph features [B, D] of two views of each protein.

        Args:
            batch: {"graph": ProteinBatch [B proteins, N residues], ...}.
        Returns:
            (loss [], {"loss": [], "accuracy": []} without gradient).
        """
        features = []
        for _ in range(2):
            output = self.encoder.encode(self.view(batch["graph"]))
            features.append(F.normalize(self.mlp(output["graph_feature"]), dim=-1))
        score = features[0] @ features[1].t() / self.tau
        labels = torch.arange(len(score), device=score.device)
        loss = (F.cross_entropy(score, labels) + F.cross_entropy(score.t(), labels)) / 2
        accuracy = (score.argmax(-1) == labels).float().mean()
        return loss, {"loss": loss.detach(), "accuracy": accuracy}


__all__ = ["AnglePrediction", "DihedralPrediction", "DistancePrediction", "IdentityNode", "MultiviewContrast",
           "RandomEdgeMask", "ResidueTypePrediction", "SubspaceNode", "SubsequenceNode"]
