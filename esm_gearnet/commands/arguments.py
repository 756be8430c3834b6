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
from contextvars import ContextVar
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..config import ConfigError, Override, detect_variables, literal


#: the program name a command's usage shows: `esm-gearnet downstream` when `esm-gearnet` runs it (set by
#: `commands.main`), else argparse's own (the script's file name)
program: ContextVar[Optional[str]] = ContextVar("program", default=None)


def base_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """The options every training script shares: -c/--config, -s/--seed and -h/--help (which also lists the
    config's variables, see `parse_args`)."""
    parser = script_parser(description)
    parser.add_argument("-c", "--config", default=None, help="YAML configuration file (a Jinja template)")
    parser.add_argument("-s", "--seed", type=int, default=1024, help="random seed (default 1024)")
    return parser


def script_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """An ArgumentParser whose -h/--help is left to `parse_args` (so it can describe the config too)."""
    parser = argparse.ArgumentParser(prog=program.get(), description=description, add_help=False,
                                     allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
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


# ---- the commands' parsers: light (no torch), so that `esm-gearnet COMMAND --help` answers at once ----------
DESCRIPTIONS = {"downstream": "Fine-tune a model on a downstream task (EC, GO, PSR, MSP, your own folder).",
                "pretrain": "Pre-train an encoder with a self-supervised objective (AlphaFold DB, ...)."}


def downstream_parser(description: str) -> argparse.ArgumentParser:
    parser = base_parser(description)
    parser.add_argument("--ckpt", default=None,
                        help="model weights to fine-tune from (the original's .pth or a checkpoint of this framework)")
    parser.add_argument("--resume", default=None, help="run directory (or its last.pth) to continue exactly; "
                        "without -c, the run's own config.yaml")
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # passed by python -m torch.distributed.launch
    return parser


def add_input_options(parser: argparse.ArgumentParser,
                      output_help: str = "the file to write; its suffix chooses the format") -> None:
    parser.add_argument("inputs", nargs="+", help="PDB/mmCIF files (.gz too), folders, or text files of paths")
    parser.add_argument("-o", "--output", required=True, help=output_help)
    parser.add_argument("--workers", type=int, default=2, help="parsing processes")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    parser.add_argument("--max-residues", type=int, default=4096, help="padded residues per batch")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def embed_parser() -> argparse.ArgumentParser:
    parser = script_parser("Embeddings of your own structures (.npz, .pt or .h5); with one FoldComp database as "
                           "INPUT, or under torchrun, a folder of shards (see --shard-size).")
    parser.add_argument("-c", "--config", default=None, help="the model's config (optional with --ckpt of a run)")
    parser.add_argument("--ckpt", default=None, help="weights: a run directory, a checkpoint or a bare state_dict")
    parser.add_argument("--per-residue", action="store_true", help="also write per-residue embeddings")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: autocast on CUDA (the CPU runs fp32)")
    parser.add_argument("--resume", action="store_true", help="keep the proteins already in OUT, embed the rest "
                        "(a folder: the shards already written)")
    parser.add_argument("--shard-size", type=int, default=None, help="entries per shard of a folder output "
                        "(default 10000; a resumed folder keeps its own)")
    parser.add_argument("--format", choices=("npz", "h5"), default=None, help="the shards' format in a folder "
                        "output (default npz)")
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # passed by python -m torch.distributed.launch
    add_input_options(parser, "the file to write (its suffix chooses the format); with a FoldComp database as "
                      "input or under torchrun, the folder of shards")
    return parser


def predict_parser() -> argparse.ArgumentParser:
    parser = script_parser("Predictions of a trained task for your own structures (CSV).")
    parser.add_argument("--ckpt", required=True, help="a run directory (its best.pth) or a checkpoint of it")
    parser.add_argument("-c", "--config", default=None, help="override the config the checkpoint carries")
    parser.add_argument("--threshold", type=float, default=0.5, help="terms scored at least this are listed")
    parser.add_argument("--top", type=int, default=5, help="how many best-scoring terms to list")
    parser.add_argument("--scores", default=None, help="also write the full score matrix to this .npz")
    add_input_options(parser)
    return parser


def pack_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program.get(), description="Pack structures into a FoldComp database "
                                     "(one entry per chain, each checked after compressing; FoldCompDB reads it). "
                                     "A killed pack continues when run again with the same command.")
    parser.add_argument("inputs", nargs="+", help="PDB/mmCIF files (.gz too), folders, text files of paths, and "
                        "AlphaFold DB proteome tars (.tar, read member by member, never extracted)")
    parser.add_argument("-o", "--output", required=True, help="the database to write: DB, beside DB.index, "
                        "DB.lookup, DB.dbtype (and DB.skipped.tsv listing what was left out, with reasons)")
    parser.add_argument("--workers", type=int, default=2, help="packing processes (default 2; a crash of "
                        "foldcomp costs only its structure)")
    parser.add_argument("--max-ca-error", type=float, default=1.0, help="leave out a chain whose Cα atoms move "
                        "more than this (Å) through compression (default 1.0)")
    parser.add_argument("--split-breaks", action="store_true", help="pack a chain with breaks (consecutive Cα "
                        "more than 4.2 Å apart), which FoldComp cannot represent, as its segments NAME_seg1, "
                        "NAME_seg2, ... instead of leaving it out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def consolidate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program.get(), description="Write a sharded checkpoint (the folder "
                                     "engine.strategy: fsdp writes as best.pth, last.pth, model_epoch_N.pth) as one "
                                     "file; embed, predict and --ckpt read the folders directly.")
    parser.add_argument("path", help="the folder, or a run directory (its best.pth, else last.pth)")
    parser.add_argument("-o", "--output", default=None, help="the file to write (default: NAME-consolidated.pth "
                        "beside the folder)")
    parser.add_argument("--encoder-only", action="store_true", help="the encoder's bare state_dict, as the "
                        "original's released .pth files")
    return parser


def report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program.get(), description="Training curves of one or more runs side by "
                                     "side.")
    parser.add_argument("runs", nargs="+", help="run directories (holding metrics.jsonl)")
    parser.add_argument("--label", action="append", default=None,
                        help="the name of a run in the legend, once per run in order (default: the config keys "
                             "in which the runs differ)")
    parser.add_argument("-o", "--output", default=None, help="the figure (default: report.png in the first run)")
    return parser


def configs_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=program.get(), description="The configs that ship with the package, one "
                                   "name a line (give one as -c NAME from any folder).")


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program.get(), description="The built-in demo, offline: the data "
                                     "pipeline on generated backbones, then ESM-GearNet fine-tuned on DemoFolds.")
    parser.add_argument("inputs", nargs="*", help="structure files or folders for the pipeline (default: generated "
                        "backbones)")
    parser.add_argument("--output_dir", default="output/demo", help="where the run directory goes")
    parser.add_argument("--pipeline-only", action="store_true", help="the data pipeline alone, no fine-tuning")
    return parser


def plan_parser() -> argparse.ArgumentParser:
    parser = script_parser("The memory each GPU needs to train a config under ddp, fsdp, fsdp + activation "
                           "checkpointing and LoRA (parameters, gradients, optimizer state, activations), and which "
                           "fit. The model is built on the meta device: no weights are read.")
    parser.add_argument("-c", "--config", default=None, help="the training config (a file or a packaged name)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs (processes) of the run (default 1)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB of memory per GPU (default 80)")
    parser.add_argument("--length", type=int, default=None, help="residues per protein (default: the config's "
                        "TruncateProtein max_length, else 1022)")
    parser.add_argument("--lora-rank", type=int, default=16, help="the LoRA rows' rank when the config has no "
                        "sequence_model.lora (default 16, on q, k, v and out projections)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of the `esm-gearnet` command `name`."""
    if name == "plan":
        return plan_parser()
    if name in DESCRIPTIONS:
        return downstream_parser(DESCRIPTIONS[name])
    return {"embed": embed_parser, "predict": predict_parser, "pack": pack_parser, "report": report_parser,
            "consolidate": consolidate_parser,
            "configs": configs_parser, "demo": demo_parser}[name]()


__all__ = ["DESCRIPTIONS", "add_input_options", "base_parser", "command_parser", "config_help", "configs_parser",
           "consolidate_parser", "demo_parser", "downstream_parser", "plan_parser",
           "embed_parser", "pack_parser", "parse_args", "predict_parser", "report_parser", "script_parser",
           "split_overrides"]
