"""Config files: Jinja2 template -> YAML -> key overrides -> EasyDict.

A config may hold Jinja variables (`branch: {{ branch }}`); every undeclared variable becomes a command-line
option of the scripts (`--branch MF`, see `arguments`). Values are read as Python literals where they are one
(`3`, `0.1`, `[1, 2]`, `None`), else kept as strings. A variable that is not given renders as YAML null, as in the
original. Key overrides (`--engine.batch_size 4`) set keys of the rendered config (`apply_overrides`).
"""
from __future__ import annotations

import ast
import difflib
import os
import re
import traceback
from typing import Any, Dict, Iterator, Optional, Sequence, Set, Tuple

import easydict
import jinja2
import jinja2.meta
import yaml


Override = Tuple[str, str]  # (key path, VALUE as typed)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file or key and what to do."""


def _read(path: str) -> str:
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file with -c.")
    with open(path, "r", encoding="utf-8") as handle:
        return handle.read()


def _finalize(value: Any) -> Any:
    # None renders as YAML null (the original rendered the text "null"), while `{{ x | default(1, true) }}`
    # still sees a missing variable as None; other values are inserted as they are
    return "null" if value is None else value


def _parse_template(text: str, path: str):
    """(template, syntax tree); a syntax error or an unknown filter or test ends in one sentence."""
    # StrictUndefined: `{{ x.y }}` of a variable without that attribute is an error, not an empty value
    environment = jinja2.Environment(finalize=_finalize, undefined=jinja2.StrictUndefined)
    try:
        return environment.from_string(text), environment.parse(text)
    except jinja2.TemplateSyntaxError as error:  # an unknown filter is a TemplateAssertionError, one of these
        raise ConfigError(f"{path}, line {error.lineno}: Jinja template error: {error.message.rstrip('.')}.") from None


def _template_line(error: BaseException) -> str:
    """", line N" of the template line that raised while rendering, from the traceback jinja2 rewrites."""
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__) if frame.filename == "<template>"]
    return f", line {lines[-1]}" if lines else ""


def detect_variables(path: str) -> Set[str]:
    """The undeclared Jinja variables of a config file (each one is a command-line option)."""
    _, tree = _parse_template(_read(path), path)
    return set(jinja2.meta.find_undeclared_variables(tree))


MARK = "__jinja_variable__"


def variable_keys(path: str) -> Dict[str, str]:
    """{key path: variable} of the keys whose whole value is one Jinja variable of the config (found by
    rendering every variable as a marker); {} when the config cannot be rendered so."""
    names = detect_variables(path)
    try:
        config = yaml.safe_load(render_config(path, {name: f"{MARK}{name}{MARK}" for name in names}))
    except Exception:  # noqa: BLE001 - arithmetic or filters on a variable: no marker survives
        return {}
    return {path: value[len(MARK):-len(MARK)] for path, value in key_items(config)
            if isinstance(value, str) and value.startswith(MARK) and value.endswith(MARK)}


def literal(value: Any) -> Any:
    """`"3"` -> 3, `"[1, 2]"` -> [1, 2], `"None"` -> None; text that is no Python literal stays a string."""
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value


def render_config(path: str, variables: Optional[Dict[str, Any]] = None) -> str:
    """The config text after Jinja rendering. Every variable of the config that `variables` does not give is
    None, so one file renders to one config wherever it is read (training, pre-training, embed, predict, tests):
    `{{ true if x is none else x }}` means true everywhere."""
    template, tree = _parse_template(_read(path), path)
    given = {name: None for name in jinja2.meta.find_undeclared_variables(tree)}
    given.update(variables or {})
    try:
        return template.render(given)
    except Exception as error:  # noqa: BLE001 - an undefined attribute, a division by zero, a failing filter
        raise ConfigError(f"{path}{_template_line(error)}: the Jinja template fails while rendering "
                          f"({type(error).__name__}: {error}); check the expression and the variables given on "
                          "the command line.") from None


def load_config(path: str, variables: Optional[Dict[str, Any]] = None,
                overrides: Sequence[Override] = ()) -> easydict.EasyDict:
    """Render a config with `variables`, parse it as YAML, set the key `overrides` and return it as an EasyDict.

    Raises:
        ConfigError: missing file, template error, YAML error or unknown override, naming the file (and line).
    """
    rendered = render_config(path, variables)
    try:
        config = yaml.safe_load(rendered)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML after rendering ({problem}).") from None
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping of keys (output_dir, dataset, task, ...).")
    return easydict.EasyDict(apply_overrides(config, overrides, path, list(variables or ())))


def plain(value: Any) -> Any:
    """A config (EasyDict) as plain dicts and lists, for yaml.safe_dump."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _value(text: str) -> Any:
    """VALUE read as YAML; `1e-4`, which YAML 1.1 reads as text, is a number as in YAML 1.2."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"cannot read {text!r} as a YAML value ({getattr(error, 'problem', error)}).") from None
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
        return float(value)
    return value


def key_items(node: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """(key path, value) of every key of a config, depth first: `task.model`, `a.edge_layers[2].k`."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        path = f"{prefix}[{key}]" if isinstance(node, list) else f"{prefix}.{key}" if prefix else str(key)
        yield path, value
        yield from key_items(value, path)


def apply_overrides(cfg: Dict[str, Any], overrides: Sequence[Override], source: str,
                    variables: Sequence[str] = ()) -> Dict[str, Any]:
    """`cfg` with each (key path, VALUE) set; an unknown path ends in one sentence with the closest keys.

    Args:
        source: the config file, for messages; variables: the config's Jinja variables, offered as alternatives.
    """
    for name, text in overrides:
        keys = [k for k in re.split(r"\.|\[(\d+)\]\.?", name) if k]
        node, found = cfg, True
        for i, key in enumerate(keys):
            last = i == len(keys) - 1
            if isinstance(node, list) and key.isdigit() and int(key) < len(node):
                key = int(key)
            elif not (isinstance(node, dict) and (key in node or last and i > 0)):
                found = False
                break
            if last:
                node[key] = _value(text)
            else:
                node = node[key]
        if not found:
            candidates = list(dict.fromkeys([f"--{v}" for v in variables] + [f"--{p}" for p, _ in key_items(cfg)]))
            close = difflib.get_close_matches(f"--{name}", candidates, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else \
                f"; its top-level keys are {', '.join(map(str, cfg))}."
            raise ConfigError(f"option --{name} is neither an option of the script, a variable of {source} nor "
                              f"a key path of it{hint}")
    return cfg
