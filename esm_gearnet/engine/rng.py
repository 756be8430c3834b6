"""The random number streams of one process, captured and restored: what makes a resumed run bit-identical.

A captured state holds only tensors, numbers and lists, so it loads with `torch.load(weights_only=True)`:

===============  =========================================================================================
key              stream
===============  =========================================================================================
torch            `torch.get_rng_state()`, uint8 tensor (CPU generator: dropout, augmentation on CPU)
python           the 625 words of `random`'s Mersenne Twister, a list of int
python_gauss     `random`'s cached Gaussian (None or float)
numpy            [name, keys as int64 tensor [624], position, has_gauss, cached_gaussian] of `np.random`
cuda             `torch.cuda.get_rng_state()` of the current device, only when CUDA is available
===============  =========================================================================================
"""
from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch

PYTHON_RANDOM_VERSION = 3  # the first element of `random.getstate()`


def capture() -> Dict[str, Any]:
    """Every random stream of this process (table above)."""
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": list(python_state[1]), "python_gauss": python_state[2],
             "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: Dict[str, Any]) -> None:
    """Set every stream to a state `capture` returned (CUDA only when both sides have it)."""
    torch.set_rng_state(state["torch"])
    random.setstate((PYTHON_RANDOM_VERSION, tuple(state["python"]), state["python_gauss"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_all(seed: int) -> None:
    """Seed every stream of this process from one integer (a run resumed with another number of processes,
    whose saved streams belong to other ranks)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
