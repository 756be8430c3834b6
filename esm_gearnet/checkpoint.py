"""Checkpoint files: atomic writes, loading without pickled code, readable mismatches."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


def save_atomic(obj: Any, path) -> None:
    """torch.save into a temporary file beside `path`, then rename: a killed writer leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        torch.save(obj, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load(path) -> Dict[str, Any]:
    """Load a checkpoint with `weights_only=True` (tensors, numbers, strings and containers only)."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path given to --ckpt / --resume.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - one sentence for any unreadable file
        raise CheckpointError(f"checkpoint {path} cannot be read safely ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:200]}); it may be truncated or hold pickled objects.") from None


def model_weights(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The encoder's state_dict from either format `--ckpt` accepts: a bare model state_dict (the
    original's released files, `model_epoch_N.pth`) or a training checkpoint of this framework (its task's
    `model.*` entries)."""
    if isinstance(checkpoint.get("model"), dict) and "epoch" in checkpoint:
        state = checkpoint["model"]
        return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return checkpoint


def load_state_dict_checked(module: nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """`module.load_state_dict(state)` that lists missing, unexpected and mis-shaped keys in its error."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                 if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    # the ESM wrapper drops the original's `mapping` buffer itself
    unexpected = [k for k in unexpected if not k.endswith("sequence_model.mapping") and k != "mapping"]
    if missing or unexpected or misshaped:
        def show(keys):
            return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "") if keys else "none"
        raise CheckpointError(f"{source} does not fit {type(module).__name__}: missing keys: {show(missing)}; "
                              f"unexpected keys: {show(unexpected)}; mis-shaped keys (checkpoint vs model): "
                              f"{show(misshaped)}. Check that the config builds the model the checkpoint was saved from.")
    module.load_state_dict(state)
