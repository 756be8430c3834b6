"""Config dicts -> objects: a registry keyed by class name.

`build({"class": "GearNet", "input_dim": 21, ...})` looks the class up, builds nested `class:` dicts first
(depth first, lists included) and calls the constructor. torch optimizers and LR schedulers resolve by their
torch names. Mistakes give one sentence naming the config key, the class and what it accepts: an unknown
class or argument (with the closest names), a missing argument, a value of the wrong type (read from the
constructor's type hints: `hidden_dims: 64` where a list of integers is wanted), a value other than null or a
`class:` dict for an argument that takes a function (`lr_lambda: "lambda e: ..."`, which no YAML value can be) or
a value the constructor refuses. An argument whose type hint is a dataclass (ESM's `lora: LoRASettings`) takes a
mapping, checked key by key against the dataclass's fields as a class's arguments are.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import importlib
import importlib.metadata
import inspect
import types
import typing
from typing import Any, Callable, Dict, List, Optional

import torch

from .config import ConfigError
from .errors import InputError

_REGISTRY: Dict[str, Callable] = {}


class ArgumentRefused(ValueError):
    """A constructor's refusal of one of its arguments: `key` (dotted, below the class's config key, e.g.
    `lora.targets`) and what is wrong with it (`problem`, read after the key). A config names the full key."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"`{key}` {problem}")
        self.key, self.problem = key, problem


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


def names_of(kind: type) -> List[str]:
    """The registered names of the subclasses of `kind` (e.g. every encoder), sorted: what one sentence offers."""
    _import_all()
    return sorted(key for key, value in _REGISTRY.items() if inspect.isclass(value) and issubclass(value, kind))


#: entry-point groups through which other packages add classes: each entry point names a class (registered under
#: its class name) or a module (whose `@register` decorators run when it is imported), e.g. in a plugin's pyproject.toml
#: `[project.entry-points."esm_gearnet.models"] egnn = "my_package.egnn:EGNN"`
ENTRY_POINT_GROUPS = ("esm_gearnet.models", "esm_gearnet.tasks")
_plugins_loaded = False
#: the subpackages whose modules `@register` the package's own classes (the package root imports lazily)
BUILT_IN = ("esm_gearnet.data", "esm_gearnet.models", "esm_gearnet.tasks")


def _import_all():
    global _plugins_loaded
    for package in BUILT_IN:  # importing them registers every class the package defines
        importlib.import_module(package)
    if not _plugins_loaded:
        _plugins_loaded = True
        for group in ENTRY_POINT_GROUPS:
            for entry in importlib.metadata.entry_points(group=group):
                _load_plugin(entry, group)


def _load_plugin(entry, group: str) -> None:
    """Import one entry point of another package and register what it names."""
    where = f"the entry point {entry.name} = {entry.value} (group {group}"
    where += f", package {entry.dist.name})" if getattr(entry, "dist", None) is not None else ")"
    try:
        obj = entry.load()
    except Exception as error:  # noqa: BLE001 - any failure of another package's import is one sentence
        raise InputError(f"{where} cannot be imported ({type(error).__name__}: {error}); fix or uninstall that "
                         "package.") from None
    if inspect.isclass(obj):
        register(obj)
    elif not isinstance(obj, types.ModuleType):
        raise InputError(f"{where} names neither a class nor a module; point it at the class to register.")


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


def parameters(cls: Callable):
    target = cls.__init__ if inspect.isclass(cls) else cls
    signature = inspect.signature(target)
    params = [p for p in signature.parameters.values() if p.name != "self"]
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params)
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return named, accepts_any


def _map_classes(value: Any, path: str, fn: Callable[[Dict[str, Any], str], Any]) -> Any:
    """The config value with `fn(dict, path)` in place of every `class:` dict in it (outermost first; `build`
    builds them, `check` checks them)."""
    if isinstance(value, dict):
        if "class" in value:
            return fn(value, path)
        return {k: _map_classes(v, f"{path}.{k}", fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_classes(v, f"{path}[{i}]", fn) for i, v in enumerate(value)]
    return value


def _class_and_arguments(config: Any, path: str):
    """(class, {argument: config value}) of a `class:` dict; one sentence when `config` is none."""
    if not isinstance(config, dict) or "class" not in config:
        raise ConfigError(f"config key `{path}` must be a mapping with a `class:` entry.")
    return resolve(config["class"], path), {k: v for k, v in config.items() if k != "class"}


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def matches(value: Any, hint: Any) -> bool:
    """Whether a config value (YAML: None, bool, int, float, str, list, dict) fits a type hint. A `class:` dict
    fits any hint (it is checked when built); hints this cannot judge (callables, type variables) fit anything."""
    if hint is Any or hint is inspect.Parameter.empty or isinstance(value, dict) and "class" in value:
        return True
    if _is_union(hint):
        return any(matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(matches(v, h) for v, h in zip(value, args))
        return not args or all(matches(v, args[0]) for v in value)
    if origin in (dict, collections.abc.Mapping) or hint is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(hint):  # a mapping of its fields (`check_arguments` checks them)
        return isinstance(value, (dict, hint))
    if inspect.isclass(hint) and origin is None:  # a tensor, a module: no YAML value is one
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    """A type hint in words: `Optional[Sequence[int]]` -> "a list of integers or null"."""
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    if _is_union(hint):  # without the alternatives no config value can be (tensors, modules)
        words = [_describe(h) for h in typing.get_args(hint)
                 if not (inspect.isclass(h) and typing.get_origin(h) is None and h.__module__ != "builtins"
                         and not dataclasses.is_dataclass(h))]
        return " or ".join(dict.fromkeys(words))
    words = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string",
             list: "a list", tuple: "a list", dict: "a mapping"}
    if hint in words:
        return words[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    if args and args[-1] is not Ellipsis and origin is tuple:
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    item = _describe(args[0]) if args else "values"
    for article in ("an ", "a "):
        item = item[len(article):] if item.startswith(article) else item
    plural = {"integer": "integers", "number": "numbers", "string": "strings", "true or false": "booleans"}
    return f"a list of {plural.get(item, item)}"


def type_hints(cls: Callable) -> Dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__ if inspect.isclass(cls) else cls)
    except Exception:  # noqa: BLE001 - hints that do not resolve are not checked
        return {}


def check_arguments(cls: Callable, kwargs: Dict[str, Any], path: str, supplied=(), missing: bool = True) -> None:
    """Refuse, in one sentence naming `path`, an argument `cls` does not take, a missing one (when `missing`) or
    a value that does not fit the constructor's type hint (`supplied`: arguments given at run time, unchecked)."""
    named, accepts_any = parameters(cls)
    names = [p.name for p in named]
    accepted = ", ".join(names) or "no arguments"
    if not accepts_any:
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config key `{path}`: {cls.__name__} got unknown argument {unknown[0]!r}{hint}; "
                              f"it accepts: {accepted}.")
    absent = [p.name for p in named if p.default is p.empty and p.name not in kwargs] if missing else []
    if absent:
        raise ConfigError(f"config key `{path}`: {cls.__name__} needs argument {absent[0]!r}; "
                          f"it accepts: {accepted}.")
    hints = type_hints(cls)
    callables = {p.name for p in named if _takes_callable(p, hints.get(p.name))}
    for key, value in kwargs.items():
        if key in supplied:
            continue
        if key in callables and not _is_built(value):
            # a YAML value is never a function: without this, torch fails deep inside (LambdaLR: TypeError)
            raise ConfigError(f"config key `{path}.{key}` takes a Python function, which a config cannot give "
                              f"(got {_short(value)}); use a class whose arguments are plain values.")
        if key in hints and not matches(value, hints[key]):
            raise type_error(f"{path}.{key}", value, hints[key])
        settings = _dataclass_in(hints.get(key))
        if settings is not None and isinstance(value, dict):  # its keys, types and values, at `path.key`
            check_arguments(settings, value, f"{path}.{key}")
            _refusals_named(settings, f"{path}.{key}", lambda: settings(**value))


def _dataclass_in(hint: Any) -> Optional[type]:
    """The dataclass a type hint names (`Optional[LoRASettings]` -> LoRASettings), or None."""
    for option in typing.get_args(hint) if _is_union(hint) else (hint,):
        if dataclasses.is_dataclass(option) and inspect.isclass(option):
            return option
    return None


def _takes_callable(parameter: inspect.Parameter, hint: Any) -> bool:
    """Whether a constructor parameter takes a function: its type hint (resolved, or the annotation's text
    where it does not resolve, as torch's string annotations) names Callable, or its default is a function."""
    annotation = hint if hint is not None else parameter.annotation
    text = annotation if isinstance(annotation, str) else repr(annotation)
    default = parameter.default
    return "Callable" in text or "callable" in text or \
        (default is not parameter.empty and default is not None and callable(default) and not inspect.isclass(default))


def _is_built(value: Any) -> bool:
    """Whether a config value is null or a `class:` dict (a list of them), the values a function argument may take."""
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_is_built(v) for v in value)
    return value is None or isinstance(value, dict) and "class" in value


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width] + "..."


def type_error(path: str, value: Any, hint: Any) -> ConfigError:
    """The sentence for a config value that does not fit its type hint."""
    extra = ""
    if isinstance(value, str) and matches(1.0, hint) and _is_number(value):
        extra = " (YAML reads a number without a decimal point, such as 1e-4, as text: write 1.0e-4)"
    elif value is None:
        extra = " (a Jinja variable of the config that is not given on the command line renders as null)"
    error = ConfigError(f"config key `{path}` must be {_describe(hint)}, got {value!r}{extra}.")
    error.key, error.value, error.expected = path, value, _describe(hint)
    return error


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def check(config: Any, path: str = "config") -> None:
    """Check a `class:` dict and every `class:` dict nested in it without building anything: classes, argument
    names and value types. Missing arguments are left to `build`, since some are derived or given at run time.
    A class with a `check_config(arguments)` classmethod checks there, too, what its constructor would refuse
    only after a long wait (ESM: that its weights are there)."""
    cls, given = _class_and_arguments(config, path)
    check_arguments(cls, given, path, missing=False)
    if hasattr(cls, "check_config"):
        _refusals_named(cls, path, lambda: cls.check_config(given))
    for key, value in given.items():
        _map_classes(value, f"{path}.{key}", check)


def build(config: Dict[str, Any], path: str = "config", **runtime: Any) -> Any:
    """Build the object a `class:` dict describes.

    Args:
        config: mapping with a `class` key and constructor arguments (nested `class:` dicts are built first).
        path: where the dict sits in the config file, for error messages (e.g. `task.model`).
        runtime: arguments known only at run time (parameters, task lists); they override the config.
    """
    cls, given = _class_and_arguments(config, path)
    check_arguments(cls, {**given, **runtime}, path, supplied=tuple(runtime))
    kwargs = {k: _map_classes(v, f"{path}.{k}", build) for k, v in given.items()}
    kwargs.update(runtime)
    return _refusals_named(cls, path, lambda: cls(**kwargs))


def _refusals_named(cls, path: str, call: Callable[[], Any]) -> Any:
    """call(), a ValueError of it (a value the class refuses: a negative lr, a factor above 1, ...) as one
    ConfigError naming the key; an InputError (a data file it was given is refused) as it is."""
    try:
        return call()
    except (ConfigError, InputError):
        raise
    except ArgumentRefused as error:
        raise ConfigError(f"config key `{path}.{error.key}` {error.problem}") from None
    except ValueError as error:
        raise ConfigError(f"config key `{path}`: {cls.__name__} refuses its arguments: {error}") from None
