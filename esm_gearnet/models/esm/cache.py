"""The feature cache of a frozen ESM: each protein's residue features computed once and kept in host memory,
keyed by the exact tokens fed to ESM (a crop or mutation that changes them is a new entry, never a wrong hit)."""
from __future__ import annotations

from typing import Dict

import torch


class FeatureCache:
    """Residue features per key, on the CPU, added until `gib` GiB are used (0: nothing is kept).

    `len(cache)` is the number of proteins kept, `cache.bytes` their size."""

    def __init__(self, gib: float = 0.0):
        self.budget = float(gib) * 2 ** 30
        self._features: Dict[bytes, torch.Tensor] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._features)

    def __contains__(self, key: bytes) -> bool:
        return key in self._features

    def get(self, key: bytes, device) -> torch.Tensor:
        """The features kept for `key`, on `device`.

        Returns:
            [L, D] one protein's residue features.
        """
        return self._features[key].to(device, non_blocking=True)

    def add(self, key: bytes, feature: torch.Tensor) -> None:
        """Keep a copy of `feature` for `key` when it is new and fits the budget.

        Args:
            key: the protein's tokens as bytes.
            feature: [L, D] its residue features.
        """
        size = feature.numel() * feature.element_size()
        if key not in self._features and self.bytes + size <= self.budget:
            self._features[key] = feature.to("cpu", copy=True)
            self.bytes += size

    def clear(self) -> None:
        self._features.clear()
        self.bytes = 0
