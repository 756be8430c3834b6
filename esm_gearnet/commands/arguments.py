"""The command line around a config: the script's options, the config's Jinja variables and key overrides.

    script/downstream.py -c config/EC/esm_gearnet.yaml --output_dir runs/ --engine.batch_size 4 \\
        --dataset.path /data --task.model.structure_model.hidden_dims "[256, 256]"

Every `--NAME VALUE` (or `--NAME=VALUE`) that is not an option of the script sets the Jinja variable NAME where
the config declares one (its value read as a Python literal, as in the original); otherwise NAME is a key path
of the rendered config (`a.b.c`, list items as `a.b[2]` or `a.b.2`) and VALUE is read as YAML (numbers such as
`1e-4` included). A path must exist up to its last key, which may be new in an existing mapping below the top
level (the checks of the config then judge it); an unknown path ends in one sentence with the closest keys. Overrides are applied after rendering, before validation, and are
part of the config a run saves as its `config.yaml`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..config import ConfigError, Override, detect_variables, literal


def base_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """The options every training script shares: -c/--config, -s/--seed and -h/--help (which also lists the
    config's variables, see `parse_args`)."""
    parser = script_parser(description)
    parser.add_argument("-c", "--config", default=None, help="YAML configuration file (a Jinja template)")
    parser.add_argument("-s", "--seed", type=int, default=1024, help="random seed (default 1024)")
    return parser


def script_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """An ArgumentParser whose -h/--help is left to `parse_args` (so it can describe the config too)."""
    parser = argparse.ArgumentParser(description=description, add_help=False, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-h", "--help", action="store_true", help="show this help (with -c: the config's "
                        "variables and how to override its keys) and exit")
    return parser


def split_overrides(argv: Sequence[str], parser: argparse.ArgumentParser) -> Tuple[List[str], List[Override]]:
    """(argv without them, [(NAME, VALUE)]): every `--NAME VALUE` / `--NAME=VALUE` that `parser` does not know."""
    known = parser._option_string_actions
    rest, overrides = [], []
    tokens = list(argv)
    while tokens:
        token = tokens.pop(0)
        if token == "--":
            rest += [token] + tokens
            break
        if not token.startswith("--") or token.split("=", 1)[0] in known:
            rest.append(token)
            continue
        name, equals, value = token[2:].partition("=")
        if not equals:
            if not tokens:
                raise ConfigError(f"option --{name} needs a value: --{name} VALUE.")
            value = tokens.pop(0)
        overrides.append((name, value))
    return rest, overrides


def parse_args(argv: Optional[Sequence[str]], parser: argparse.ArgumentParser,
               config_of: Callable[[argparse.Namespace], Optional[str]] = lambda args: args.config
               ) -> Tuple[argparse.Namespace, Dict[str, Any], List[Override]]:
    """Parse the script's options, the config's variables and the key overrides.

    Args:
        parser: the script's parser (from `script_parser` / `base_parser`).
        config_of: the config file the parsed options name (None when there is none).
    Returns:
        (args, variables, overrides): the script's options; every Jinja variable of the config (None where not
        given); the (key path, VALUE) pairs that are not variables, for `load_config`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, pairs = split_overrides(argv, parser)
    if "-h" in rest or "--help" in rest:  # before the required options are asked for
        only_config = argparse.ArgumentParser(add_help=False)
        only_config.add_argument("-c", "--config", default=None)
        path = only_config.parse_known_args(rest)[0].config
        print(parser.format_help() + config_help(path, sorted(detect_variables(path)) if path else []))
        raise SystemExit(0)
    args = parser.parse_args(rest)
    path = config_of(args)
    names = sorted(detect_variables(path)) if path else []
    variables = {name: None for name in names}
    overrides = []
    for name, value in pairs:
        if name in variables:
            variables[name] = literal(value)
        else:
            overrides.append((name, value))
    return args, variables, overrides


def config_help(path: Optional[str], names: Sequence[str]) -> str:
    """The help text about a config: its variables and the key-override syntax."""
    lines = [""]
    if path:
        lines.append(f"options of {path} (its Jinja variables):")
        lines += [f"  --{name} VALUE" for name in names] or ["  (none)"]
        lines.append("")
    lines += ["any key of the rendered config: --KEY.PATH VALUE (VALUE read as YAML), e.g.",
              "  --output_dir runs/ --engine.batch_size 4 --dataset.path /data --train.num_epoch 10",
              "  --task.model.structure_model.hidden_dims \"[256, 256]\""]
    return "\n".join(lines) + "\n"


__all__ = ["base_parser", "config_help", "parse_args", "script_parser", "split_overrides"]
