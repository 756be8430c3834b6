"""A seeded permutation of [0, n) evaluated per index, and seeds derived from integers: how a streamed epoch's order
is drawn without a list of the entries (`engine.stream`), and how `FoldCompDB` draws its held-out sample."""
from __future__ import annotations

import numpy as np


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def derived_seed(*values: int) -> int:
    """A 63-bit seed from integers (e.g. seed, epoch, position): the same on every machine and process."""
    state = np.uint64(0x9E3779B97F4A7C15)
    for value in values:
        state = _mix(np.array([state ^ np.uint64(int(value) & 0xFFFFFFFFFFFFFFFF)], np.uint64))[0]
    return int(state >> np.uint64(1))


class Permutation:
    """A seeded bijection of [0, n), evaluated per index in O(1) memory: a 4-round Feistel network over the
    smallest even number of bits that holds n, with cycle walking (an index mapped outside [0, n) is mapped
    again until it lands inside; the domain is at most 4n, so that takes few rounds).

    Args:
        n: the size; seed: any integer.
    """

    ROUNDS = 4

    def __init__(self, n: int, seed: int):
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        bits += bits % 2
        self.half = np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        self.keys = [np.uint64(derived_seed(seed, self.n, r)) for r in range(self.ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << self.half) | right

    def __call__(self, indices) -> np.ndarray:
        """[k] int64 images of `indices` (each in [0, n))."""
        x = self._feistel(np.asarray(indices, np.int64).astype(np.uint64))
        outside = x >= np.uint64(self.n)
        while outside.any():
            x[outside] = self._feistel(x[outside])
            outside = x >= np.uint64(self.n)
        return x.astype(np.int64)


__all__ = ["Permutation", "derived_seed"]
