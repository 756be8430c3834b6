"""Config files: Jinja2 template -> YAML -> EasyDict, and the command-line options they declare.

A config may hold Jinja variables (`branch: {{ branch }}`); every undeclared variable becomes a command-line
option of the scripts (`--branch MF`). Values are read as Python literals where they are one (`3`, `0.1`,
`[1, 2]`, `None`), else kept as strings. A variable that is not given renders as YAML null, as in the original.
"""
from __future__ import annotations

import argparse
import ast
import os
import traceback
from typing import Any, Dict, Optional, Sequence, Set, Tuple

import easydict
import jinja2
import jinja2.meta
import yaml


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


def load_config(path: str, variables: Optional[Dict[str, Any]] = None) -> easydict.EasyDict:
    """Render a config with `variables`, parse it as YAML and return it as an EasyDict.

    Raises:
        ConfigError: missing file, template error or YAML error, naming the file (and line).
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
    return easydict.EasyDict(config)


def base_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """The options every script shares: -c/--config and -s/--seed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-c", "--config", required=True, help="YAML configuration file (a Jinja template)")
    parser.add_argument("-s", "--seed", type=int, default=1024, help="random seed (default 1024)")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None, parser: Optional[argparse.ArgumentParser] = None
               ) -> Tuple[argparse.Namespace, Dict[str, Any]]:
    """Parse the script options, then the options the config's Jinja variables declare.

    Returns:
        (args, variables): the script's options, and a dict of every config variable (None where not given).
    """
    parser = parser or base_parser()
    args, unparsed = parser.parse_known_args(argv)
    names = sorted(detect_variables(args.config))
    variable_parser = argparse.ArgumentParser(
        prog=f"{parser.prog} -c {args.config}", description="options declared by the config's Jinja variables")
    for name in names:
        variable_parser.add_argument(f"--{name}", default=None, help=f"value of {{{{ {name} }}}} in the config")
    values, rest = variable_parser.parse_known_args(unparsed)
    if rest:
        hint = f"; this config declares {', '.join('--' + n for n in names)}" if names else ""
        parser.error(f"unrecognised arguments: {' '.join(rest)}{hint}")
    return args, {name: literal(getattr(values, name)) for name in names}
