"""The `esm-gearnet` command: embed, predict, report, downstream and pretrain.

    esm-gearnet embed -c CONFIG [--ckpt PATH] INPUT... -o OUT.npz [--per-residue] [--resume]
    esm-gearnet predict --ckpt RUN_DIR_OR_CHECKPOINT INPUT... -o predictions.csv [--threshold T] [--scores S.npz]
    esm-gearnet report RUN_DIR... [--label NAME...] [-o report.png]
    esm-gearnet downstream -c CONFIG ...   /   esm-gearnet pretrain -c CONFIG ...   /   ... --resume RUN_DIR

Any key of the config can be set on the command line: --engine.batch_size 4 --dataset.path /data (see
`esm-gearnet downstream -c CONFIG --help`). `esm-gearnet COMMAND --help` describes each command.
"""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

#: command -> its module in esm_gearnet.commands (imported when run: `--help` of one command loads no other)
COMMANDS = {"embed": "embed", "predict": "predict", "report": "report", "downstream": "finetune",
            "pretrain": "pretrain"}


def command(name: str):
    """The `main(argv)` of a command."""
    return importlib.import_module(f"{__package__}.{COMMANDS[name]}").main


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        print(f"\nerror: name a command: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    return command(argv[0])(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
