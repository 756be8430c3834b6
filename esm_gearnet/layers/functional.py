"""Segment operations on packed batches, and the one pair of pack <-> pad helpers.

A packed batch concatenates per-residue rows of B proteins into N rows; `num_residues [B]` says how many
rows each protein owns, in order.
"""
import torch
import torch.nn.functional as F


def segment_ids(num_residues: torch.Tensor) -> torch.Tensor:
    """Protein index of every packed row.

    Args:
        num_residues: [B] residues per protein.
    Returns:
        [N] long, row i belongs to protein `segment_ids[i]`.
    """
    return torch.repeat_interleave(torch.arange(len(num_residues), device=num_residues.device), num_residues)


def offsets(num_residues: torch.Tensor) -> torch.Tensor:
    """[B] index of each protein's first packed row."""
    return torch.cumsum(num_residues, 0) - num_residues


def position_in_segment(num_residues: torch.Tensor, residue2graph: torch.Tensor = None) -> torch.Tensor:
    """[N] index of each packed row inside its own protein (0 .. L_b - 1)."""
    if residue2graph is None:
        residue2graph = segment_ids(num_residues)
    return torch.arange(len(residue2graph), device=num_residues.device) - offsets(num_residues)[residue2graph]


def to_padded(x: torch.Tensor, num_residues: torch.Tensor, value=0, max_length: int = None):
    """Packed rows to a padded tensor.

    Args:
        x: [N, *] packed per-residue values.
        num_residues: [B] residues per protein.
        value: fill value of the padding.
        max_length: L; defaults to the longest protein.
    Returns:
        padded [B, L, *] and mask [B, L] (True on real residues).
    """
    num_residues = num_residues.to(x.device)
    batch_size = len(num_residues)
    length = int(num_residues.max()) if max_length is None and batch_size else (max_length or 0)
    residue2graph = segment_ids(num_residues)
    position = position_in_segment(num_residues, residue2graph)
    padded = x.new_full((batch_size, length) + tuple(x.shape[1:]), value)
    padded[residue2graph, position] = x
    mask = torch.arange(length, device=x.device) < num_residues.unsqueeze(-1)
    return padded, mask


def to_packed(padded: torch.Tensor, mask_or_num_residues: torch.Tensor) -> torch.Tensor:
    """Padded tensor back to packed rows.

    Args:
        padded: [B, L, *].
        mask_or_num_residues: [B, L] bool mask of real residues, or [B] residues per protein
            (then the first L_b positions of row b are real).
    Returns:
        [N, *] rows of the real residues, protein after protein.
    """
    if mask_or_num_residues.dim() == 1:
        length = padded.shape[1]
        mask = torch.arange(length, device=padded.device) < mask_or_num_residues.to(padded.device).unsqueeze(-1)
    else:
        mask = mask_or_num_residues
    return padded[mask]


def segment_sum(x: torch.Tensor, residue2graph: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[B, *] sum of the rows of x [N, *] of each protein."""
    out = x.new_zeros((batch_size,) + tuple(x.shape[1:]))
    return out.index_add_(0, residue2graph, x)


def readout(x: torch.Tensor, residue2graph: torch.Tensor, batch_size: int, kind: str) -> torch.Tensor:
    """[B, *] "sum" or "mean" of each protein's rows: the protein feature of the encoders."""
    if kind == "sum":
        return segment_sum(x, residue2graph, batch_size)
    if kind == "mean":
        return segment_mean(x, residue2graph, batch_size)
    raise ValueError(f"readout must be 'sum' or 'mean', got {kind!r}.")


def segment_mean(x: torch.Tensor, residue2graph: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[B, *] mean of the rows of x [N, *] of each protein (0 for a protein without rows)."""
    total = segment_sum(x, residue2graph, batch_size)
    count = torch.bincount(residue2graph, minlength=batch_size).clamp(min=1).to(x.dtype)
    return total / count.view((-1,) + (1,) * (x.dim() - 1))


# ---- geometry ----------------------------------------------------------------------------------------------
def angle_between(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[P] angle in [0, π] between vectors u, v [P, 3]."""
    return torch.atan2(torch.linalg.cross(u, v, dim=-1).norm(dim=-1), (u * v).sum(-1))


def dihedral(p0, p1, p2, p3, signed: bool = False) -> torch.Tensor:
    """[P] dihedral angle of the points p0-p1-p2-p3 [P, 3]: in (-π, π] when signed, else its size in [0, π]."""
    b0, b1, b2 = p1 - p0, p2 - p1, p3 - p2
    n1, n2 = torch.linalg.cross(b0, b1, dim=-1), torch.linalg.cross(b1, b2, dim=-1)
    cross = torch.linalg.cross(n1, n2, dim=-1)
    if not signed:
        return torch.atan2(cross.norm(dim=-1), (n1 * n2).sum(-1))
    return torch.atan2((cross * F.normalize(b1, dim=-1)).sum(-1), (n1 * n2).sum(-1))


def to_bins(angle: torch.Tensor, num_class: int, low: float, high: float) -> torch.Tensor:
    """[P] long: the bin of each value of `angle` [P] among `num_class` equal bins over [low, high) (`high` in
    the last bin)."""
    return ((angle - low) / (high - low) * num_class).long().clamp(0, num_class - 1)
