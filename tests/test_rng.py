"""rng.capture/restore: every stream continues where it was, and the state survives a weights_only checkpoint."""
import random

import numpy as np
import torch

from esm_gearnet import checkpoint
from esm_gearnet.engine import rng


def _draws():
    return torch.rand(3).tolist(), random.random(), random.gauss(0, 1), np.random.rand(3).tolist()


def test_restored_streams_repeat_their_draws(tmp_path):
    random.gauss(0, 1)  # leaves a cached Gaussian in `random`'s state
    checkpoint.save_atomic({"rng": rng.capture()}, tmp_path / "rng.pth")
    expected = _draws()
    _draws()
    rng.restore(checkpoint.load(tmp_path / "rng.pth")["rng"])
    assert _draws() == expected
