"""What every training command (`finetune`, `pretrain`) does around its work (`training_run`): the command line,
the config rendered and checked, the process group, the run directory and its lock, logging, seeds, `--ckpt`
weights and the checkpoint `--resume` continues from.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import sys
import time
import traceback
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml

from .. import checkpoint, distributed, sharding, writing
from ..assembly import validate
from ..config import ConfigError, load_config, load_run_config, plain
from ..engine.stepper import CannotLearn
from ..errors import Interrupted, fault_errors, ignoring_ctrl_c, user_errors
from .arguments import downstream_parser, parse_args

logger = logging.getLogger("esm_gearnet")


def seed_everything(seed: int) -> None:
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def setup_logging(run_dir: Optional[Path]) -> None:
    """INFO to stderr and run_dir/log.txt on rank 0, warnings only on the other ranks."""
    log = logging.getLogger("esm_gearnet")
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if distributed.rank() == 0 else logging.WARNING)
    form = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers: List[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None and distributed.rank() == 0:
        handlers.append(_LogFile(run_dir / "log.txt"))
    for handler in handlers:
        handler.setFormatter(form)
        log.addHandler(handler)


class _LogFile(logging.FileHandler):
    """log.txt, flushed after every record (as `logging.FileHandler`); when the disk stops taking lines, one warning
    on stderr instead of a traceback per record (the command's own sentence follows when an output fails)."""

    def handleError(self, record: logging.LogRecord) -> None:
        if not getattr(self, "failed", False):
            self.failed = True
            print(f"warning: {self.baseFilename} cannot be written any more ({sys.exc_info()[1]}); the log goes to "
                  "stderr only.", file=sys.stderr)


def resumed_run_dir(resume: str) -> Path:
    """The run directory that --resume names (the directory, or the folder of a checkpoint file in it)."""
    path = Path(os.path.expanduser(resume))
    return path.parent if path.is_file() else path


def make_run_dir(cfg, resume: Optional[str]) -> Path:
    """output_dir/Task/Dataset/Model/time, created by rank 0 and broadcast (no working-directory race);
    the resumed run's own directory when resuming."""
    if resume is not None:
        return resumed_run_dir(resume)
    name = None
    if distributed.rank() == 0:
        base = Path(os.path.expanduser(str(cfg.get("output_dir") or "output")))
        base = base / cfg.task["class"] / cfg.dataset["class"] / cfg.task.model["class"]
        stamp = time.strftime("%Y-%m-%d-%H-%M-%S")
        for suffix in [""] + [f"-{i}" for i in range(1, 1000)]:
            candidate = base / (stamp + suffix)
            try:
                candidate.mkdir(parents=True, exist_ok=False)
                name = str(candidate)
                break
            except FileExistsError:
                continue
            except OSError as error:  # the location was checked before the work; it changed since
                raise writing.refusal(candidate, error) from None
    return Path(distributed.broadcast_object(name))


def building(cfg):
    """The context a run's task is built in: under `engine.strategy: fsdp` with several processes, weights read
    from files keep their dtype until their unit is sharded (`checkpoint.keeping_dtypes`)."""
    sharded = sharding.applies((cfg.get("engine") or {}).get("strategy", "ddp"))
    return checkpoint.keeping_dtypes() if sharded else nullcontext()


def resumed_state(path) -> Dict:
    """The checkpoint --resume continues from, read once: a file whole (the task is built from its weights), a
    sharded checkpoint (`engine.strategy: fsdp`) without its tensors (each rank reads its own shards when the
    engine resumes; the task is built as new)."""
    return checkpoint.load(path, verify=not checkpoint.is_folder(path))


def resumed_weights(state: Dict) -> Optional[Dict[str, torch.Tensor]]:
    """The task's state_dict of what `resumed_state` read, None for a sharded checkpoint (read by the engine)."""
    return None if state.get("sharded") else checkpoint.task_state(state)


def encoder_weights(path) -> Tuple[Dict[str, torch.Tensor], str]:
    """`--ckpt`: (the encoder's state_dict, the file it was read from) of a checkpoint of this framework
    (best.pth, last.pth, model_epoch_N.pth) or one of the original's bare state_dicts, for
    `build_task(..., encoder_state=...)`: the encoder is built with these weights, the head starts fresh."""
    path = checkpoint.locate(path)
    logger.info("loading encoder weights from %s", path)
    return checkpoint.encoder_state(checkpoint.load(path), str(path)), str(path)


@contextmanager
def training_run(argv: Optional[List[str]], description: str, dataset_keys: Optional[Dict] = None):
    """What every training script does around its work: parse the command line, render and validate the config
    (`schema.validate`: nothing is made before it passes), join the process group, make (or reuse, when
    resuming) the run directory, log there, save the rendered config and seed every rank alike. Yields (args,
    cfg, run_dir, resume); an error after the run directory exists is written into its log.txt too; leaves the
    process group at the end (at once after an error: the other ranks may never reach the barrier).

    Args:
        dataset_keys: keys of the config's `dataset` that the script reads itself (see `schema.validate`).
    """
    # a run's config.yaml is no template: it has no variables, every --NAME VALUE sets a key of it
    args, variables, overrides = parse_args(argv, downstream_parser(description))
    source = config_file(args)
    if source is None:
        raise ConfigError("give the config with -c CONFIG, or --resume RUN_DIR to continue a run from its own "
                          "config.yaml.")
    if args.ckpt is not None and "ckpt" in variables:
        variables["ckpt"] = args.ckpt
    template = args.config is not None
    cfg = load_config(source, variables, overrides) if template else load_run_config(source, overrides)
    validate(cfg, source, dataset_keys, template=template)
    resume = args.resume or cfg.get("checkpoint")
    # the weight files named, found before anything is made (they are read once the model exists)
    weights = args.ckpt or cfg.get("model_checkpoint")
    if weights:
        checkpoint.present(checkpoint.locate(weights))
    if resume:  # a file this many processes cannot continue is refused here, before anything is built
        checkpoint.check_resumable(resume_file(resume), distributed.world_size())
    run_dir, lock = None, ExitStack()  # the ranks of a run share rank 0's lock: a second run there is refused
    try:
        if distributed.rank() == 0:  # a read-only or full location is found before any work, not at the first save
            writing.writable(Path(resumed_run_dir(resume) if resume else cfg.get("output_dir") or "output")
                             / "config.yaml")
            if resume:
                lock.enter_context(writing.output_lock(resumed_run_dir(resume), what="run directory"))
        distributed.init((cfg.get("engine") or {}).get("timeout", distributed.DEFAULT_TIMEOUT))
        run_dir = make_run_dir(cfg, resume)
        if distributed.rank() == 0 and not resume:
            lock.enter_context(writing.output_lock(run_dir, what="run directory"))
        # a resumed run's log.txt is appended to once it has work to do (`setup_logging(run_dir)` again): a
        # resume that finds the run finished changes no file
        setup_logging(run_dir if resume is None else None)
        if distributed.rank() == 0 and resume is None:  # the config as run: rendered, overrides applied
            writing.write_atomic(run_dir / "config.yaml", yaml.safe_dump(plain(cfg), sort_keys=False))
        elif distributed.rank() == 0 and run_dir.is_dir():
            writing.remove_leftovers(run_dir)  # what a killed run was writing: .last.pth.PID@HOST.xxxxxxxx
        logger.info("config %s, run directory %s, %d process(es)", source, run_dir, distributed.world_size())
        seed_everything(args.seed)  # same initial weights on every rank
        yield args, cfg, run_dir, resume
    except KeyboardInterrupt:
        # a second Ctrl-C (the terminal's and torchrun's both reach a rank) must not break off the clean-up
        with ignoring_ctrl_c():
            error = interrupted(run_dir)
            _log_error(run_dir, error)
            lock.close()
        # the process group is left as it is: a peer may be inside a collective this rank will never join, and
        # the command ends this process at once (`exits.one_sentence`)
        raise error from None
    except BaseException as error:
        _log_error(run_dir, error)
        lock.close()
        if resume is None and isinstance(error, user_errors()) and not isinstance(error, CannotLearn):
            _remove_unstarted(run_dir)  # a bad config, file or download; a fault or a run that cannot learn stays
        if not isinstance(error, distributed.StalledError):  # with a peer gone, leaving the group can wait forever
            distributed.shutdown(wait=False)
        raise
    lock.close()
    distributed.shutdown()


def interrupted(run_dir: Optional[Path]) -> Interrupted:
    """Ctrl-C (SIGINT; torchrun forwards it to every rank) during a run: its one sentence, saying how to
    continue."""
    if run_dir is not None and (Path(run_dir) / "last.pth").is_file():
        return Interrupted(f"interrupted; resume with --resume {run_dir}")
    if run_dir is not None and Path(run_dir).is_dir():
        return Interrupted(f"interrupted before the first checkpoint; nothing in {run_dir} to resume, start the run "
                           "again")
    return Interrupted("interrupted")


# what the set-up alone writes into a new run directory
SET_UP_FILES = {"log.txt", "config.yaml", ".lock"}


def _remove_unstarted(run_dir: Optional[Path]) -> None:
    """A failed start leaves no run behind: after an error a user can act on (a config, a file, a download), rank
    0 removes a new run directory that holds only what the set-up wrote (its config and the log of the failed
    start, whose sentence the command prints); one that holds more (a metrics record, a checkpoint) stays, as does
    the run of a fault of the machine or of a run that cannot learn (its log.txt says what happened)."""
    if run_dir is None or distributed.rank() != 0 or not Path(run_dir).is_dir():
        return
    if {p.name for p in Path(run_dir).iterdir()} <= SET_UP_FILES:
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in list(Path(run_dir).parents)[:3]:  # Task/Dataset/Model (`make_run_dir`), when left empty
            try:
                parent.rmdir()
            except OSError:
                break


def _log_error(run_dir: Optional[Path], error: BaseException) -> None:
    """Rank 0 appends the error that ends a run to its log.txt: the one sentence of an error a user can act on,
    else the traceback."""
    if run_dir is None or distributed.rank() != 0 or not Path(run_dir).is_dir():
        return
    if isinstance(error, Interrupted):
        text = f"{error}\n"
    elif isinstance(error, user_errors() + fault_errors()):
        text = f"error: {error}\n"
    else:
        text = "".join(traceback.format_exception(error))
    try:
        writing.append_line(Path(run_dir) / "log.txt", f"{time.strftime('%H:%M:%S')} {text}")
    except writing.OutputError:  # the disk that ended the run may not take this line either: stderr has it
        pass


def config_file(args) -> Optional[str]:
    """-c CONFIG, else the config.yaml of the run that --resume names (None without either), which is read as
    plain YAML (`config.load_run_config`), never rendered again."""
    if args.config or not args.resume:
        return args.config
    run_dir = resumed_run_dir(args.resume)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} holds no config.yaml, so it is not a run directory of this framework; "
                          "give --resume a run directory, or the config with -c CONFIG.")
    return str(run_dir / "config.yaml")


def resume_file(resume) -> Path:
    """The last.pth of a run directory, or the checkpoint file given."""
    return checkpoint.locate(resume, ("last.pth",))


__all__ = ["building", "encoder_weights", "resume_file", "resumed_state", "resumed_weights", "seed_everything",
           "setup_logging", "training_run"]
