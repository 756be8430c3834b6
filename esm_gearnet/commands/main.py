"""The `esm-gearnet` command: embed, predict, report, downstream and pretrain.

    esm-gearnet embed -c CONFIG [--ckpt PATH] INPUT... -o OUT.npz [--per-residue] [--resume]
    esm-gearnet predict --ckpt RUN_DIR_OR_CHECKPOINT INPUT... -o predictions.csv [--threshold T] [--scores S.npz]
    esm-gearnet report RUN_DIR... [--label NAME...] [-o report.png]
    esm-gearnet downstream -c CONFIG ...   /   esm-gearnet pretrain -c CONFIG ...   /   ... --resume RUN_DIR

Any key of the config can be set on the command line: --engine.batch_size 4 --dataset.path /data (see
`esm-gearnet downstream -c CONFIG --help`). `esm-gearnet COMMAND --help` describes each command.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from .arguments import parse_args, script_parser


def _one_sentence(main):
    """Errors a user can act on (a bad path, config or checkpoint, a run that cannot learn) end the command with
    their one sentence and exit code 2, faults of the machine (`errors.fault_errors`) with theirs and exit code 1,
    Ctrl-C with one line ("interrupted; resume with --resume RUN" for a run) and exit code 130."""
    import functools

    @functools.wraps(main)
    def wrapper(argv: Optional[List[str]] = None) -> int:
        from ..errors import INTERRUPTED_EXIT_CODE, Interrupted, fault_errors, ignoring_ctrl_c, user_errors

        try:
            return main(argv)
        except user_errors() as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except fault_errors() as error:
            print(f"error: {error}", file=sys.stderr)
            from ..distributed import StalledError

            if isinstance(error, StalledError):
                # a rank that stopped answering still belongs to the process group, and tearing the group down
                # (also at interpreter exit) can wait for it forever: end this process now
                _end_process(1)
            return 1
        except (Interrupted, KeyboardInterrupt) as error:
            with ignoring_ctrl_c():
                print(str(error) if isinstance(error, Interrupted) else "interrupted", file=sys.stderr)
                # a peer rank may be inside a collective this one left: end now rather than tear the group down
                _end_process(INTERRUPTED_EXIT_CODE, only_in_a_group=True)
            return INTERRUPTED_EXIT_CODE
    return wrapper


def _end_process(code: int, only_in_a_group: bool = False) -> None:
    """End this process at once with `code` (logs flushed, no interpreter clean-up that could wait for a peer);
    with `only_in_a_group`, only when a process group is joined (a single process returns normally)."""
    import logging
    import os

    dist = sys.modules.get("torch.distributed")  # not imported: no group joined (and no torch import to end)
    if only_in_a_group and (dist is None or not dist.is_initialized()):
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="PDB/mmCIF files (.gz too), folders, or text files of paths")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--workers", type=int, default=2, help="parsing processes")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    parser.add_argument("--max-residues", type=int, default=4096, help="padded residues per batch")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def embed_parser() -> argparse.ArgumentParser:
    parser = script_parser("Embeddings of your own structures (.npz, .pt or .h5).")
    parser.add_argument("-c", "--config", default=None, help="the model's config (optional with --ckpt of a run)")
    parser.add_argument("--ckpt", default=None, help="weights: a run directory, a checkpoint or a bare state_dict")
    parser.add_argument("--per-residue", action="store_true", help="also write per-residue embeddings")
    parser.add_argument("--resume", action="store_true", help="keep the proteins already in OUT, embed the rest")
    _common(parser)
    return parser


def predict_parser() -> argparse.ArgumentParser:
    parser = script_parser("Predictions of a trained task for your own structures (CSV).")
    parser.add_argument("--ckpt", required=True, help="a run directory (its best.pth) or a checkpoint of it")
    parser.add_argument("-c", "--config", default=None, help="override the config the checkpoint carries")
    parser.add_argument("--threshold", type=float, default=0.5, help="terms scored at least this are listed")
    parser.add_argument("--top", type=int, default=5, help="how many best-scoring terms to list")
    parser.add_argument("--scores", default=None, help="also write the full score matrix to this .npz")
    _common(parser)
    return parser


@_one_sentence
def embed_main(argv: Optional[List[str]] = None) -> int:
    from .embed import run_embed
    from .run import setup_logging

    args, variables, overrides = parse_args(argv, embed_parser())
    setup_logging(None)
    count, skipped = run_embed(args.inputs, args.output, args.config, args.ckpt, args.per_residue, args.resume,
                               args.workers, args.device, args.max_residues, progress=not args.quiet,
                               variables=variables, overrides=overrides)
    print(f"embedded {count} protein(s) into {args.output}; {len(skipped)} input(s) skipped")
    return 0 if count or (args.resume and not skipped) else 1


@_one_sentence
def predict_main(argv: Optional[List[str]] = None) -> int:
    from .embed import run_predict
    from .run import setup_logging

    args, variables, overrides = parse_args(argv, predict_parser())
    setup_logging(None)
    count, skipped = run_predict(args.inputs, args.output, args.ckpt, args.config, args.threshold, args.top,
                                 args.scores, args.workers, args.device, args.max_residues, not args.quiet,
                                 variables=variables, overrides=overrides)
    print(f"predicted {count} protein(s) into {args.output}; {len(skipped)} input(s) skipped")
    return 0 if count else 1


@_one_sentence
def report_main(argv: Optional[List[str]] = None) -> int:
    from ..engine.report import plot_runs

    parser = argparse.ArgumentParser(description="Training curves of one or more runs side by side.")
    parser.add_argument("runs", nargs="+", help="run directories (holding metrics.jsonl)")
    parser.add_argument("--label", action="append", default=None,
                        help="the name of a run in the legend, once per run in order (default: the config keys "
                             "in which the runs differ)")
    parser.add_argument("-o", "--output", default=None, help="the figure (default: report.png in the first run)")
    args = parser.parse_args(argv)
    output = args.output or str(Path(args.runs[0]) / "report.png")
    plot_runs(args.runs, output, args.label)
    print(f"wrote {output}")
    return 0


@_one_sentence
def downstream_main(argv: Optional[List[str]] = None) -> int:
    from .run import run_downstream

    run_downstream(argv)
    return 0


@_one_sentence
def pretrain_main(argv: Optional[List[str]] = None) -> int:
    from .pretrain import run_pretrain

    run_pretrain(argv)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"embed": embed_main, "predict": predict_main, "report": report_main,
                "downstream": downstream_main, "pretrain": pretrain_main}
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if not argv or argv[0] not in commands:
        print(__doc__.strip(), file=sys.stderr)
        print(f"\nerror: name a command: {', '.join(commands)}.", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
