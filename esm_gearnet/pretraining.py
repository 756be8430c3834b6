"""The pre-training loop of `script/pretrain.py`, faithful to the original's order of work.

For every block of `save_interval` epochs: for every species in `dataset.species_start..species_end` (one
dataset when absent) and every split of it, train `save_interval` epochs on that split; after the block, save
the encoder's weights as `model_epoch_N.pth` (a bare state_dict, what `--ckpt` reads). After each split the full
training state goes to `last.pth` with the number of splits done, so `--resume RUN_DIR` continues where a
crashed run stopped.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import List, Optional

import torch

from . import checkpoint, distributed
from .engine import Engine
from .registry import build
from .training import parameter_groups, resume_file, training_run

logger = logging.getLogger("esm_gearnet")


def _training_split(dataset):
    return dataset.split()[0] if hasattr(dataset, "split") else dataset


def run_pretrain(argv: Optional[List[str]] = None) -> Path:
    """Returns the run directory."""
    with training_run(argv, "Pre-train an encoder with a self-supervised objective (AlphaFold DB, ...).") as (
            args, cfg, run_dir, resume):
        dataset_cfg = copy.deepcopy(cfg.dataset)
        start, end = dataset_cfg.pop("species_start", 0), dataset_cfg.pop("species_end", 0)
        if end < start:
            raise ValueError(f"dataset.species_end ({end}) must not be below dataset.species_start ({start}).")
        species_list = list(range(start, end)) if end > start else [None]

        def load(species, split):
            if species is not None:
                dataset_cfg.update(species_id=species, split_id=split)
            return build(dataset_cfg, "dataset")

        dataset = load(species_list[0], 0)
        task = build(cfg.task, "task")
        if args.ckpt:
            checkpoint.load_state_dict_checked(task.encoder, checkpoint.model_weights(checkpoint.load(args.ckpt)),
                                               args.ckpt)
        lr = float(cfg.optimizer.get("lr", 1e-3))
        optimizer = build(cfg.optimizer, "optimizer", params=parameter_groups(cfg, task, lr))
        engine = Engine(task, _training_split(dataset), None, None, optimizer, run_dir=run_dir, config=cfg,
                        seed=args.seed, **dict(cfg.get("engine") or {}))
        torch.manual_seed(args.seed + distributed.rank())
        if resume:
            engine.resume(resume_file(resume))
            logger.info("resumed after %d split(s) of training", engine.extra.get("units_done", 0))
        done = engine.extra.get("units_done", 0)
        interval, num_epoch = int(cfg.get("save_interval", 1)), int(cfg.train.num_epoch)
        unit = 0
        current = (species_list[0], 0)
        for first in range(0, num_epoch, interval):
            epochs = min(interval, num_epoch - first)
            for species in species_list:
                split = 0
                while True:
                    if (species, split) != current:
                        dataset, current = load(species, split), (species, split)
                    if unit >= done:
                        engine.sets["train"] = _training_split(dataset)
                        for _ in range(epochs):
                            train = engine.train_epoch()
                            engine._record({"epoch": engine.epoch, "step": engine.step, "species": species,
                                            "split": split, "train": train,
                                            "lr": [g["lr"] for g in optimizer.param_groups]})
                        engine.extra["units_done"] = unit + 1
                        engine.save("last.pth")
                    unit += 1
                    split += 1
                    if split >= getattr(dataset, "num_splits", 1):
                        break
            if distributed.rank() == 0:
                name = run_dir / f"model_epoch_{first + epochs}.pth"
                checkpoint.save_atomic(task.encoder.state_dict(), name)
                logger.info("saved the encoder's weights to %s", name)
            distributed.barrier()
    return run_dir


__all__ = ["run_pretrain"]
