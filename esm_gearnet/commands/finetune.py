"""`esm-gearnet downstream` (`script/downstream.py`): fine-tune a model on a downstream task (EC, GO, PSR, MSP,
your own folder): dataset, task (runtime task list, --ckpt weights, training-split statistics), optimizer,
engine, then the engine's fine-tuning schedule (`Engine.fit`)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .. import distributed
from ..assembly import build_optimizer, build_scheduler, build_task, runtime_task_list, selection_metric
from ..engine import Engine
from ..engine.run_log import format_metrics
from ..registry import build
from .arguments import DESCRIPTIONS
from .exits import one_sentence
from .run import building, encoder_weights, resume_file, resumed_state, resumed_weights, setup_logging, training_run

logger = logging.getLogger("esm_gearnet")


@one_sentence
def main(argv: Optional[List[str]] = None) -> int:
    run_downstream(argv)
    return 0


def build_downstream(cfg, run_dir: Optional[Path], seed: int, ckpt: Optional[str] = None,
                     progress: bool = True, resume_from: Optional[Path] = None) -> Engine:
    """Dataset, task (runtime task list, --ckpt weights, training-split statistics), optimizer, engine. The
    encoder of --ckpt (or the config's `model_checkpoint`) is built from its weights, never initialised.

    `resume_from`: the checkpoint a resumed run continues from: the task is built from its weights and
    statistics, never initialised (--ckpt is not read: those weights would be replaced), and the engine resumes
    from it (`Engine.resume`)."""
    resumed = resumed_state(resume_from) if resume_from is not None else None
    dataset = build(cfg.dataset, "dataset")
    train_set, valid_set, test_set = dataset.split()
    logger.info("%s: train %d, valid %d, test %d", dataset, len(train_set), len(valid_set), len(test_set))
    task_list = runtime_task_list(cfg, dataset.tasks)
    if resumed is not None:
        with building(cfg):
            task = build_task(cfg, task_list, resumed_weights(resumed), str(resume_from))
    else:
        weights = ckpt or cfg.get("model_checkpoint")
        encoder, source = encoder_weights(weights) if weights else (None, "the checkpoint")
        with building(cfg):
            task = build_task(cfg, task_list, source=source, encoder_state=encoder)
        task.preprocess(train_set)
    metric = selection_metric(cfg, task)
    optimizer = build_optimizer(cfg, task)
    scheduler = build_scheduler(cfg, optimizer, metric)
    engine = Engine(task, train_set, valid_set, test_set, optimizer, scheduler, run_dir=run_dir, config=cfg,
                    task_names=dataset.tasks, seed=seed, progress=progress, **dict(cfg.get("engine") or {}))
    if resumed is not None:
        engine.resume(resume_from, resumed)
    return engine


def run_downstream(argv: Optional[List[str]] = None) -> Dict[str, float]:
    with training_run(argv, DESCRIPTIONS["downstream"]) as (
            args, cfg, run_dir, resume):
        engine = build_downstream(cfg, run_dir, args.seed, ckpt=args.ckpt,
                                  resume_from=resume_file(resume) if resume else None)
        if not resume:
            torch.manual_seed(args.seed + distributed.rank())  # per-rank streams for dropout and augmentation
        else:
            setup_logging(run_dir)
            logger.info("resumed at epoch %d, step %d", engine.epoch, engine.step)
        result = engine.fit(cfg.train.num_epoch, selection_metric(cfg, engine.task), cfg.train.get("batch_per_epoch"))
        engine.close()
        logger.info("done: run directory %s; best validation epoch %s, its test metrics: %s; curves: %s",
                    run_dir, engine.best["epoch"], format_metrics(result), run_dir / "curves.png")
    return result


__all__ = ["build_downstream", "main", "run_downstream"]
