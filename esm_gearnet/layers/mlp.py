"""The multi-layer perceptron of the task heads, with TorchDrug's parameter names (`layers.{i}`)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Linear layers with ReLU (and optional batch norm, dropout) between them, none after the last.

    Args:
        input_dim: D_in; hidden_dims: widths of every layer, the last one being the output width.
    """

    def __init__(self, input_dim: int, hidden_dims: Sequence[int], batch_norm: bool = False, dropout: float = 0.0):
        super().__init__()
        dims = [input_dim] + list(hidden_dims)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.batch_norms = nn.ModuleList(nn.BatchNorm1d(d) for d in dims[1:-1]) if batch_norm else None
        self.dropout = nn.Dropout(dropout) if dropout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                if self.batch_norms is not None:
                    x = self.batch_norms[i](x)
                x = torch.relu(x)
                if self.dropout is not None:
                    x = self.dropout(x)
        return x
