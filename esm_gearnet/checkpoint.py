"""Checkpoint files: one layout for everything this framework writes, one reader for the original's files.

Every file this framework writes (`last.pth`, `best.pth`, pre-training's `model_epoch_N.pth`) is a dict:

==============  ==================================================================================================
key             meaning
==============  ==================================================================================================
format          `FORMAT`, the layout's name and version
encoder         the encoder's state_dict (what `--ckpt` and `embed` read)
head            the rest of the task's state_dict (prediction heads, normalisation buffers)
config          the rendered config the run was built from (a plain dict): loading never renders a template again
task_names      the dataset's target names (EC numbers, GO terms, ...) in the head's output order; [] if none
epoch           epochs trained when the file was written
training        None, or the state `--resume` needs: optimizer, scheduler, scaler, step, best, metrics, rng,
                world_size and `position` (where a loop other than the epoch count stands, e.g. pre-training)
==============  ==================================================================================================

The original wrote bare state_dicts of its model (FusionNetwork, GearNet, GVP-GNN, CDConv); `encoder_state`
reads those too. Files are loaded with `weights_only=True` (no pickled code) and written atomically.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

FORMAT = "esm_gearnet.checkpoint/1"
ENCODER_PREFIX = "encoder."


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


def pack(task: nn.Module, config: Dict[str, Any], task_names: Sequence[str] = (), epoch: int = 0,
         training: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The checkpoint of a task (its `encoder` and the rest, the head) in this framework's layout."""
    state = task.state_dict()
    return {"format": FORMAT,
            "encoder": {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)},
            "head": {k: v for k, v in state.items() if not k.startswith(ENCODER_PREFIX)},
            "config": config, "task_names": [str(t) for t in task_names], "epoch": epoch, "training": training}


def is_packed(checkpoint: Any) -> bool:
    return isinstance(checkpoint, dict) and checkpoint.get("format") == FORMAT


def task_state(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The task's state_dict of a packed checkpoint (encoder entries under `encoder.`, then the head)."""
    return {**{ENCODER_PREFIX + k: v for k, v in checkpoint["encoder"].items()}, **checkpoint["head"]}


def _describe(checkpoint: Any) -> str:
    if not isinstance(checkpoint, dict):
        return f"a {type(checkpoint).__name__}"
    keys = list(checkpoint)
    shown = ", ".join(map(str, keys[:8])) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
    return f"the keys {shown}" if keys else "an empty dict"


# The original's GVP vector dropout owned `dummy_param = nn.Parameter(torch.empty(0))` (to find its device), so
# every GVP-GNN state_dict it wrote holds `layers.{i}.dropout.{0,1}.vdropout.dummy_param`.
LEGACY_DROPPED_SUFFIXES = ("vdropout.dummy_param",)


def encoder_state(checkpoint: Any, source: str) -> Dict[str, torch.Tensor]:
    """The encoder's state_dict in a checkpoint: this framework's layout, or the original's bare state_dict of
    its model (FusionNetwork, GearNet, GVP-GNN, CDConv).

    DEVIATION: the original's GVP-GNN state_dicts carry empty `...vdropout.dummy_param` tensors (a device probe of
    its dropout, no weight); they are accepted and dropped here, since this GVP dropout needs no such parameter.

    Raises:
        CheckpointError: the file holds neither, naming what it holds.
    """
    if is_packed(checkpoint):
        return checkpoint["encoder"]
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return {k: v for k, v in checkpoint.items()
                if not (k.endswith(LEGACY_DROPPED_SUFFIXES) and v.numel() == 0)}
    raise CheckpointError(f"{source} holds {_describe(checkpoint)}, which is neither a checkpoint of this "
                          "framework nor a bare state_dict of an encoder (the original's released .pth files); "
                          "pass a run directory, its best.pth/last.pth, a model_epoch_N.pth or such a state_dict.")


def load_state_dict_checked(module: nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """`module.load_state_dict(state)` that lists missing, unexpected and mis-shaped keys in its error."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                 if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    # the ESM wrapper checks and drops the original's `mapping` buffer itself
    unexpected = [k for k in unexpected if not k.endswith("sequence_model.mapping") and k != "mapping"]
    if missing or unexpected or misshaped:
        def show(keys):
            return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "") if keys else "none"
        raise CheckpointError(f"{source} does not fit {type(module).__name__}: missing keys: {show(missing)}; "
                              f"unexpected keys: {show(unexpected)}; mis-shaped keys (checkpoint vs model): "
                              f"{show(misshaped)}. Check that the config builds the model the checkpoint was saved from.")
    module.load_state_dict(state)
