"""SiamDiff: Siamese diffusion trajectories of two correlated conformers of each protein (Zhang et al., 2023).

`NoiseTransform(sigma)` makes the second conformer (`graph2`: Gaussian noise of `sigma` Å on every atom). Both
conformers share one noise level t per protein. Each gets its own structure noise ε (variance-exploding form
of a sigmoid beta schedule: x_t = x + ε·sqrt((1 − ᾱ_t)/ᾱ_t)), and both share one sequence mask covering a share
(t + 1)/T of the residues. Each conformer's structure noise and masked residue types are then predicted from
the *other* conformer's residue features. The structure head is equivariant: per edge (i, j) of the noisy
conformer, an MLP of both residues' features (from the other conformer), their distance and the noise level
gives a weight w_ij, and ε̂_i = Σ_j w_ij (x_i − x_j). Loss: γ·structure (MSE of ε) + (1 − γ)·sequence (cross
entropy).

Shapes: B proteins, N residues, E edges, D channels, L residues of one protein.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..data import constants
from ..data.protein import ProteinBatch
from ..layers import MLP, functional
from ..registry import register
from ..models import Encoder
from .base import Task
from .pretrain import mask_residues, sample_residues


@register
class NoiseTransform:
    """Adds `graph2` to an item: the protein with Gaussian noise of `sigma` Å on every atom (a second,
    correlated conformer)."""

    def __init__(self, sigma: float = 0.3):
        self.sigma = sigma

    def __call__(self, item):
        """The item with its second conformer.

        Args:
            item: {"graph": Protein [L residues], ...}.
        Returns:
            {"graph": Protein [L], "graph2": Protein [L] (atom_pos [L, 14, 3] noised), ...}.
        """
        graph = item["graph"]
        noise = torch.randn_like(graph.atom_pos) * self.sigma * graph.atom_mask.unsqueeze(-1)
        return {**item, "graph2": graph.replace(atom_pos=graph.atom_pos + noise)}

    def __repr__(self):
        return f"NoiseTransform(sigma={self.sigma})"


def sigmoid_schedule(begin: float, end: float, num: int) -> torch.Tensor:
    """Betas rising from `begin` to `end` along a sigmoid.

    Returns:
        [num] float64.
    """
    return torch.sigmoid(torch.linspace(-6, 6, num, dtype=torch.float64)) * (end - begin) + begin


def perturb(graph: ProteinBatch, scale: torch.Tensor, noise: torch.Tensor) -> ProteinBatch:
    """Every atom of residue n moved by noise[n] · scale[graph of n] (residues move rigidly).

    Args:
        graph: ProteinBatch [B proteins, N residues].
        scale: [B] the noise scale of each protein.
        noise: [N, 3] one displacement per residue (Å before scaling).
    Returns:
        ProteinBatch [B, N] with new `atom_pos` [N, 14, 3] (present atoms moved), nothing else changed.
    """
    shift = (noise * scale[graph.residue2graph].unsqueeze(-1)).unsqueeze(1) * graph.atom_mask.unsqueeze(-1)
    return graph.replace(atom_pos=graph.atom_pos + shift)


@register
class SiamDiff(Task):
    """Args:
        encoder: the `Encoder` (its graph is built on each noisy conformer).
        num_mlp_layer: depth of both heads; sigma_begin, sigma_end, num_noise_level: the beta schedule;
        gamma: weight of the structure loss; max_mask_ratio: share of residues masked at the last level.
    DEVIATION: masked residues get ESM's `<mask>` token (and a zero structure input); the original turned them
    into glycine (type 0), which is also a real residue to predict.
    """

    def __init__(self, encoder: Encoder, num_mlp_layer: int = 3, sigma_begin: float = 1e-3, sigma_end: float = 0.1,
                 num_noise_level: int = 100, gamma: float = 0.5, max_mask_ratio: float = 1.0, verbose: int = 0):
        super().__init__(encoder)
        self.gamma, self.max_mask_ratio, self.num_noise_level = gamma, max_mask_ratio, num_noise_level
        alpha_bar = torch.cumprod(1 - sigmoid_schedule(sigma_begin, sigma_end, num_noise_level), 0)
        self.register_buffer("noise_scale", ((1 - alpha_bar) / alpha_bar).sqrt().float(), persistent=False)
        dim = encoder.output_dim
        self.struct_mlp = MLP(2 * dim + 2, [dim] * (num_mlp_layer - 1) + [1])
        self.seq_mlp = MLP(dim, [dim] * (num_mlp_layer - 1) + [constants.NUM_RESIDUE_TYPES])

    def sample(self, graph: ProteinBatch):
        """The noise level and sequence mask shared by both conformers.

        Args:
            graph: ProteinBatch [B proteins, N residues].
        Returns:
            (t [B] long noise levels in [0, num_noise_level), mask [N] bool residues to mask).
        """
        t = torch.randint(self.num_noise_level, (graph.batch_size,), device=graph.device)
        ratio = (t + 1).float() / self.num_noise_level * self.max_mask_ratio
        return t, sample_residues(graph, (graph.num_residues.float() * ratio).long().clamp(min=1))

    def predict_noise(self, noisy: ProteinBatch, feature: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """ε̂ for the noisy conformer from the other conformer's features.

        Args:
            noisy: constructed ProteinBatch [B proteins, N residues] with `edge_list` [E, 3].
            feature: [N, D] the other conformer's residue features.
            level: [B] noise level of each protein, t / num_noise_level.
        Returns:
            [N, 3] ε̂ = Σ_j w_ij (x_i − x_j) over the edges i -> j.
        """
        i, j = noisy.edge_list[:, 0], noisy.edge_list[:, 1]
        delta = noisy.pos[i] - noisy.pos[j]
        distance = delta.norm(dim=-1, keepdim=True)
        edge_level = level[noisy.residue2graph[i]].unsqueeze(-1)
        weight = self.struct_mlp(torch.cat([feature[i], feature[j], distance / 10, edge_level], -1))
        return functional.segment_sum(weight * delta, i, noisy.num_residue)

    def forward(self, batch):
        """The SiamDiff loss on two conformers of each protein.

        Args:
            batch: {"graph": ProteinBatch [B proteins, N residues], "graph2": ProteinBatch [B, N] (the second
                conformer, `NoiseTransform`), ...}.
        Returns:
            (loss [], {"loss", "structure_loss", "sequence_loss"}: each [] detached).
        """
        conformers = [batch["graph"], batch["graph2"]]
        t, mask = self.sample(conformers[0])
        scale = self.noise_scale[t]
        noises, graphs, features = [], [], []
        for conformer in conformers:
            noise = torch.randn_like(conformer.pos)
            noisy = perturb(conformer, scale, noise)  # a model reading 3Di reads the noisy conformer's
            graph = self.encoder.construct(mask_residues(noisy, mask, self.encoder.reads_three_di))
            noises.append(noise)
            graphs.append(graph)
            features.append(self.encoder.encode(graph, mask)["residue_feature"])
        level = t.float() / self.num_noise_level
        structure = sequence = 0.0
        target = conformers[0].residue_type[mask]
        for this, other in ((0, 1), (1, 0)):
            structure = structure + F.mse_loss(self.predict_noise(graphs[this], features[other], level), noises[this])
            sequence = sequence + F.cross_entropy(self.seq_mlp(features[other][mask]), target)
        loss = (self.gamma * structure + (1 - self.gamma) * sequence) / 2
        return loss, {"loss": loss.detach(), "structure_loss": structure.detach() / 2,
                      "sequence_loss": sequence.detach() / 2}


__all__ = ["NoiseTransform", "SiamDiff", "perturb", "sigmoid_schedule"]
