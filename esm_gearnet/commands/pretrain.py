"""The pre-training loop of `script/pretrain.py`, faithful to the original's order of work.

For every block of `save_interval` epochs: for every species in `dataset.species_start..species_end` (one
dataset when absent) and every split of it, train `save_interval` epochs on that split; after the block, save
the encoder's weights as `model_epoch_N.pth` (a checkpoint of this framework's layout, what `--ckpt` and
`embed` read). After each split the full training state goes to `last.pth` with the loop's position (splits
done, and the number of splits of every species met so far), so `--resume RUN_DIR`:

* skips the finished splits without loading them (their count per species is in the position),
* rewrites no `model_epoch_N.pth` of a finished block (one is written only by the run that finished its block,
  or by the resume that finds it missing right at the block's end),
* changes no file when the run had finished, and otherwise ends with the weights of the uninterrupted run.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .. import distributed
from ..assembly.build import build_task, optimizer_groups
from ..engine.trainer import Engine
from ..registry import build
from .run import load_encoder_weights, resume_file, setup_logging, training_run

logger = logging.getLogger("esm_gearnet")


# keys of the config's dataset block read here, not by the dataset class: species_start..species_end
DATASET_KEYS = {"species_start": int, "species_end": int}


def _training_split(dataset):
    return dataset.split()[0] if hasattr(dataset, "split") else dataset


def run_pretrain(argv: Optional[List[str]] = None) -> Path:
    """Returns the run directory."""
    with training_run(argv, "Pre-train an encoder with a self-supervised objective (AlphaFold DB, ...).",
                      dataset_keys=DATASET_KEYS) as (args, cfg, run_dir, resume):
        dataset_cfg = copy.deepcopy(cfg.dataset)
        start, end = dataset_cfg.pop("species_start", 0), dataset_cfg.pop("species_end", 0)
        if end < start:
            raise ValueError(f"dataset.species_end ({end}) must not be below dataset.species_start ({start}).")
        species_list = list(range(start, end)) if end > start else [None]

        def load(species, split):
            if species is not None:
                dataset_cfg.update(species_id=species, split_id=split)
            return build(dataset_cfg, "dataset")

        task = build_task(cfg)
        if args.ckpt:
            load_encoder_weights(task, args.ckpt)
        lr = float(cfg.optimizer.get("lr", 1e-3))
        optimizer = build(cfg.optimizer, "optimizer", params=optimizer_groups(cfg, task, lr))
        engine = Engine(task, None, None, None, optimizer, run_dir=run_dir, config=cfg, seed=args.seed,
                        **dict(cfg.get("engine") or {}))
        torch.manual_seed(args.seed + distributed.rank())
        position: Dict[str, Any] = {"splits_done": 0, "num_splits": {}}
        if resume:
            position = engine.resume(resume_file(resume)) or position
            logger.info("resumed after %d split(s) of training", position["splits_done"])
        done, num_splits = position["splits_done"], dict(position["num_splits"])
        interval, num_epoch = cfg.get("save_interval") or 1, cfg.train.num_epoch
        unit = 0  # splits of the schedule passed so far, done before or now
        logging_to_run_dir = resume is None
        for first in range(0, num_epoch, interval):
            epochs = min(interval, num_epoch - first)
            for species in species_list:
                split = 0
                while True:
                    if unit >= done:  # load and train only the splits not done yet
                        if not logging_to_run_dir:
                            setup_logging(run_dir)
                            logging_to_run_dir = True
                        dataset = load(species, split)
                        num_splits[str(species)] = getattr(dataset, "num_splits", 1)
                        for _ in range(epochs):
                            train = engine.train_epoch(_training_split(dataset), cfg.train.get("batch_per_epoch"))
                            engine.record({"epoch": engine.epoch, "step": engine.step, "species": species,
                                           "split": split, "train": train,
                                           "lr": engine.stepper.learning_rates(),
                                           "skipped_steps": engine.stepper.skipped})
                        engine.save("last.pth", position={"splits_done": unit + 1, "num_splits": num_splits})
                    unit += 1
                    split += 1
                    if split >= num_splits[str(species)]:
                        break
            name = f"model_epoch_{first + epochs}.pth"
            # trained in this block now, or stopped between the block's last split and this file (every rank
            # reaches the same branch, so the broadcast is collective)
            if unit > done or (unit == done and distributed.broadcast_object(not (run_dir / name).exists())):
                engine.save_weights(name)
                logger.info("saved the encoder's weights to %s", run_dir / name)
        engine.close()
        if unit == done and resume:
            logger.info("run %s had finished: nothing to do", run_dir)
        else:
            logger.info("done: run directory %s; encoder weights model_epoch_*.pth (for --ckpt and embed); "
                        "curves: %s", run_dir, run_dir / "curves.png")
    return run_dir


__all__ = ["run_pretrain"]
