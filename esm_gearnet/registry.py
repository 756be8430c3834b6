"""Config dicts -> objects: a registry keyed by class name.

`build({"class": "GearNet", "input_dim": 21, ...})` looks the class up, builds nested `class:` dicts first
(depth first, lists included) and calls the constructor. torch optimizers and LR schedulers resolve by their
torch names. Mistakes give one sentence naming the config key, the class and what it accepts.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Dict, Optional

import torch

from .config import ConfigError

_REGISTRY: Dict[str, Callable] = {}


def register(obj: Callable = None, *, name: Optional[str] = None):
    """Class decorator: make a class buildable from configs under its name (or `name`)."""

    def add(target):
        key = name or target.__name__
        if key in _REGISTRY and _REGISTRY[key] is not target:
            raise ValueError(f"two classes registered under the name {key!r}: {_REGISTRY[key]} and {target}.")
        _REGISTRY[key] = target
        return target

    return add(obj) if obj is not None else add


_TORCH_BASES = (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def _torch_classes() -> Dict[str, Callable]:
    found = {}
    for module in (torch.optim, torch.optim.lr_scheduler):
        for key, value in vars(module).items():
            if inspect.isclass(value) and not key.startswith("_") and issubclass(value, _TORCH_BASES):
                found.setdefault(key, value)
    return found


def registered_names():
    _import_all()
    return sorted(set(_REGISTRY) | set(_torch_classes()))


def _import_all():
    # importing the package registers every class it defines
    import esm_gearnet  # noqa: F401


def resolve(name: str, path: str = "config") -> Callable:
    """The class registered under `name` (a dotted prefix such as `layers.` is ignored)."""
    _import_all()
    if not isinstance(name, str):
        raise ConfigError(f"config key `{path}.class` must be a class name, got {name!r}.")
    short = name.rsplit(".", 1)[-1]
    if short in _REGISTRY:
        return _REGISTRY[short]
    torch_classes = _torch_classes()
    if short in torch_classes:
        return torch_classes[short]
    close = difflib.get_close_matches(short, registered_names(), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see esm_gearnet.registry.registered_names()."
    raise ConfigError(f"config key `{path}.class`: unknown class {name!r}{hint}")


def _parameters(cls: Callable):
    target = cls.__init__ if inspect.isclass(cls) else cls
    signature = inspect.signature(target)
    params = [p for p in signature.parameters.values() if p.name != "self"]
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params)
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return named, accepts_any


def _build_value(value: Any, path: str) -> Any:
    if isinstance(value, dict):
        if "class" in value:
            return build(value, path)
        return {k: _build_value(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_build_value(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def build(config: Dict[str, Any], path: str = "config", **runtime: Any) -> Any:
    """Build the object a `class:` dict describes.

    Args:
        config: mapping with a `class` key and constructor arguments (nested `class:` dicts are built first).
        path: where the dict sits in the config file, for error messages (e.g. `task.model`).
        runtime: arguments known only at run time (parameters, task lists); they override the config.
    """
    if not isinstance(config, dict) or "class" not in config:
        raise ConfigError(f"config key `{path}` must be a mapping with a `class:` entry.")
    cls = resolve(config["class"], path)
    kwargs = {k: _build_value(v, f"{path}.{k}") for k, v in config.items() if k != "class"}
    kwargs.update(runtime)
    named, accepts_any = _parameters(cls)
    names = [p.name for p in named]
    accepted = ", ".join(names) or "no arguments"
    if not accepts_any:
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config key `{path}`: {cls.__name__} got unknown argument {unknown[0]!r}{hint}; "
                              f"it accepts: {accepted}.")
    missing = [p.name for p in named if p.default is p.empty and p.name not in kwargs]
    if missing:
        raise ConfigError(f"config key `{path}`: {cls.__name__} needs argument {missing[0]!r}; "
                          f"it accepts: {accepted}.")
    return cls(**kwargs)
