"""What a training config may hold, checked before anything is built, downloaded or trained.

`validate(cfg, source)` refuses, in one sentence naming the key path, what would otherwise fail late or not at all:
a missing section, an unknown top-level, `engine` or `train` key (with the closest names), a value of the wrong type
or below its minimum, an unknown class or argument anywhere in `dataset` and `task` (types read from the
constructors' hints, see `registry.check`), and an optimizer or scheduler its torch class refuses (a negative lr,
a plateau factor of 6.0: both are built once on a stand-in parameter).
"""
from __future__ import annotations

import difflib
from typing import Any, Dict, Optional

import torch

from ..config import ConfigError, variable_keys
from ..engine.trainer import Engine
from ..registry import build, check, matches, parameters, type_error, type_hints
from .build import check_task

REQUIRED = ("dataset", "task", "optimizer", "train")

# every top-level key a config may hold: the original's, and this framework's own (see the README)
TOP_LEVEL: Dict[str, Any] = {
    "output_dir": Optional[str], "dataset": dict, "task": dict, "optimizer": dict, "scheduler": Optional[dict],
    "engine": Optional[dict], "train": dict, "metric": Optional[str], "save_interval": Optional[int],
    "lr_ratio": Optional[float], "sequence_model_lr_ratio": Optional[float], "fix_sequence_model": Optional[bool],
    "original_optimizer_groups": Optional[bool], "model_checkpoint": Optional[str], "checkpoint": Optional[str],
    "lora_lr_ratio": Optional[float],
}
TRAIN: Dict[str, Any] = {"num_epoch": int, "batch_per_epoch": Optional[int], "num_step": Optional[int]}

# Engine arguments that the run supplies, not the config's `engine:` block
ENGINE_RUNTIME = {"task", "train_set", "valid_set", "test_set", "optimizer", "scheduler", "run_dir", "config",
                  "task_names", "seed", "device", "progress"}

MINIMUM = {"save_interval": 1, "lr_ratio": 0, "sequence_model_lr_ratio": 0, "train.num_epoch": 0,
           "train.batch_per_epoch": 1, "train.num_step": 1, "engine.batch_size": 1, "engine.gradient_interval": 1,
           "engine.num_worker": 0, "engine.log_interval": 0, "engine.timeout": 1,
           "lora_lr_ratio": 0}


def engine_options() -> Dict[str, Any]:
    """The keys an `engine:` block may hold, with their type hints."""
    hints = type_hints(Engine)
    named, _ = parameters(Engine)
    return {p.name: hints.get(p.name, Any) for p in named if p.name not in ENGINE_RUNTIME}


def _check_block(block: Any, allowed: Dict[str, Any], path: str) -> None:
    """Keys of `block` among `allowed` (closest names otherwise), values of their type and minimum."""
    if not isinstance(block, dict):
        raise ConfigError(f"config key `{path.rstrip('.') or 'config'}` must be a mapping of keys, got {block!r}.")
    for key, value in block.items():
        where = f"{path}{key}"
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}?" if close else f"the keys are {', '.join(allowed)}."
            raise ConfigError(f"config key `{where}` is unknown; {hint}")
        if not matches(value, allowed[key]):
            raise type_error(where, value, allowed[key])
        if where in MINIMUM and value is not None and value < MINIMUM[where]:
            raise ConfigError(f"config key `{where}` must be at least {MINIMUM[where]}, got {value!r}.")


def validate(cfg, source: str, dataset_keys: Optional[Dict[str, Any]] = None, template: bool = True) -> None:
    """Refuse, in one sentence naming the key path, a config that cannot train (see the module's docstring).

    Args:
        cfg: the rendered config (a dict); source: the config file, named when a section is missing.
        dataset_keys: keys of `dataset` that the script reads itself (name -> type hint), not the dataset class.
        template: whether `source` is a Jinja template (-c) whose variables a null may come from; a run's
            config.yaml is not, and is never rendered.
    Raises:
        ConfigError
    """
    try:
        _validate(cfg, source, dataset_keys)
    except ConfigError as error:
        # a null that a Jinja variable left: name the variable to give on the command line
        variable = variable_keys(source).get(getattr(error, "key", None)) \
            if template and getattr(error, "value", 0) is None else None
        if variable is None:
            raise
        raise ConfigError(f"{source}: config key `{error.key}` is {{{{ {variable} }}}}, which was not given; pass "
                          f"--{variable} ({error.expected.replace(' or null', '')}).") from None


def _validate(cfg, source: str, dataset_keys: Optional[Dict[str, Any]]) -> None:
    missing = [key for key in REQUIRED if not cfg.get(key)]
    missing += ["task.model"] if isinstance(cfg.get("task"), dict) and not cfg.task.get("model") else []
    if missing:
        raise ConfigError(f"{source} lacks {', '.join(missing)}; a training config needs dataset, task (with its "
                          "model), optimizer and train, as config/EC/esm_gearnet.yaml has.")
    _check_block(cfg, TOP_LEVEL, "")
    _check_block(cfg.train, TRAIN, "train.")
    _check_block(cfg.get("engine") or {}, engine_options(), "engine.")
    own = {k: v for k, v in cfg.dataset.items() if k in (dataset_keys or {})}
    _check_block(own, dataset_keys or {}, "dataset.")
    check({k: v for k, v in cfg.dataset.items() if k not in own}, "dataset")
    check_task(cfg)
    # the optimizer and scheduler once on a stand-in parameter: torch's own range checks, named by key
    optimizer = build(cfg.optimizer, "optimizer", params=[torch.nn.Parameter(torch.zeros(1))])
    if cfg.get("scheduler") is not None:
        build(cfg.scheduler, "scheduler", optimizer=optimizer)


__all__ = ["engine_options", "validate"]
