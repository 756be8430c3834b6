"""The `esm-gearnet` command: embed, predict, pack, report, consolidate, plan, downstream, pretrain, configs, demo.

    esm-gearnet embed -c CONFIG [--ckpt PATH] INPUT... -o OUT.npz [--per-residue] [--resume]
    esm-gearnet embed -c CONFIG [--ckpt PATH] FOLDCOMP_DB -o OUT/ [--shard-size K] [--resume]   (torchrun too)
    esm-gearnet predict --ckpt RUN_DIR_OR_CHECKPOINT INPUT... -o predictions.csv [--threshold T] [--scores S.npz]
    esm-gearnet pack INPUT... -o DB [--workers N] [--max-ca-error 1.0] [--split-breaks]   a FoldComp database
    esm-gearnet report RUN_DIR... [--label NAME...] [-o report.png]
    esm-gearnet consolidate RUN_DIR_OR_FOLDER [-o FILE] [--encoder-only]   a sharded checkpoint as one file
    esm-gearnet configs                  the configs that ship with the package (-c NAME finds them anywhere)
    esm-gearnet demo                     the built-in demo, offline, from any folder
    esm-gearnet plan -c CONFIG --gpus N --gpu-memory GiB   the memory each GPU needs under ddp, fsdp, LoRA
    esm-gearnet downstream -c CONFIG ...   /   esm-gearnet pretrain -c CONFIG ...   /   ... --resume RUN_DIR

Any key of the config can be set on the command line: --engine.batch_size 4 --dataset.path /data (see
`esm-gearnet downstream -c CONFIG --help`). `esm-gearnet COMMAND --help` describes each command.
"""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

from .arguments import command_parser, parse_args, program
from .exits import reader_left

#: command -> its module in esm_gearnet.commands (imported when run: `--help` of one command loads no other)
COMMANDS = {"embed": "embed", "predict": "predict", "pack": "pack", "report": "report", "consolidate": "consolidate",
            "plan": "plan", "downstream": "finetune", "pretrain": "pretrain", "configs": "configs", "demo": "demo"}


def command(name: str):
    """The `main(argv)` of a command."""
    return importlib.import_module(f"{__package__}.{COMMANDS[name]}").main


def main(argv: Optional[List[str]] = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `esm-gearnet --help | head`: the reader left; say nothing more
        return reader_left()


def _main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv and argv[0] == "--version":
        from .. import __version__

        print(f"esm-gearnet {__version__}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        what = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"\nerror: {what}; name one of: {', '.join(COMMANDS)} (or --help, --version).", file=sys.stderr)
        return 2
    token = program.set(f"esm-gearnet {argv[0]}")
    try:
        if any(a in ("-h", "--help") for a in argv[1:]):  # from the light parsers: no torch imported for help
            parser = command_parser(argv[0])
            parser.parse_args(argv[1:]) if argv[0] in ("report", "pack", "consolidate", "configs", "demo") \
                else parse_args(argv[1:], parser)
        return command(argv[0])(argv[1:])
    finally:
        program.reset(token)


if __name__ == "__main__":
    sys.exit(main())
