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

A streamed dataset (`FoldCompDB`: AlphaFold DB or ESM Atlas as a FoldComp database) has no species and splits:
`Stream` trains `train.num_epoch` epochs over its entries, or `train.num_step` steps, a step being a global batch
of the run as it was started (batch_size x its world size); every `save_interval` steps `last.pth` is written
(a run killed between two continues from the last, with any number of processes) with the mean loss on the
dataset's held-out sample; after every epoch `model_epoch_N.pth`, and at the end of a schedule in steps
`model_step_N.pth`, holds the encoder's weights for `--ckpt` and `embed`.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch

from .. import distributed
from ..assembly import build_optimizer, build_task
from ..engine import Engine, Stage
from ..config import ConfigError
from ..registry import build, resolve
from .arguments import DESCRIPTIONS
from .exits import one_sentence
from .run import building, encoder_weights, resume_file, resumed_state, resumed_weights, setup_logging, training_run

logger = logging.getLogger("esm_gearnet")


# keys of the config's dataset block read here, not by the dataset class: species_start..species_end
DATASET_KEYS = {"species_start": int, "species_end": int}


@one_sentence
def main(argv: Optional[List[str]] = None) -> int:
    run_pretrain(argv)
    return 0


def run_pretrain(argv: Optional[List[str]] = None) -> Path:
    """Returns the run directory."""
    with training_run(argv, DESCRIPTIONS["pretrain"],
                      dataset_keys=DATASET_KEYS) as (args, cfg, run_dir, resume):
        dataset_cfg = copy.deepcopy(cfg.dataset)
        start, end = dataset_cfg.pop("species_start", 0), dataset_cfg.pop("species_end", 0)
        if end < start:
            raise ValueError(f"dataset.species_end ({end}) must not be below dataset.species_start ({start}).")
        streamed = getattr(resolve(dataset_cfg["class"], "dataset.class"), "streamed", False)
        if streamed and end > start:
            raise ConfigError("dataset.species_start/species_end are for AlphaFoldDB's species; a streamed dataset "
                              f"({dataset_cfg['class']}) has none: remove them.")
        if not streamed and cfg.train.get("num_step") is not None:
            raise ConfigError(f"train.num_step is for streamed datasets (FoldCompDB); {dataset_cfg['class']} "
                              "trains train.num_epoch epochs: remove train.num_step.")
        resumed = resumed_state(resume_file(resume)) if resume else None
        with building(cfg):
            if resumed is not None:  # built from the checkpoint's weights, never initialised; --ckpt not read
                task = build_task(cfg, state=resumed_weights(resumed), source=str(resume_file(resume)))
            elif args.ckpt:  # the encoder built from --ckpt's weights, never initialised; the head fresh
                encoder, source = encoder_weights(args.ckpt)
                task = build_task(cfg, source=source, encoder_state=encoder)
            else:
                task = build_task(cfg)
        train, valid = build(dataset_cfg, "dataset").split()[:2] if streamed else (None, None)
        engine = Engine(task, train, valid, None, build_optimizer(cfg, task), run_dir=run_dir, config=cfg,
                        seed=args.seed, **dict(cfg.get("engine") or {}))
        torch.manual_seed(args.seed + distributed.rank())
        position: Dict[str, Any] = {"splits_done": 0, "num_splits": {}}
        if resume:
            position = engine.resume(resume_file(resume), resumed) or position
            if not streamed:
                logger.info("resumed after %d split(s) of training", position["splits_done"])
        if streamed:
            schedule = Stream(cfg, train, valid, engine, run_dir, logging_to_run_dir=resume is None)
        else:
            schedule = Blocks(cfg, dataset_cfg, list(range(start, end)) if end > start else [None], position,
                              run_dir, logging_to_run_dir=resume is None)
        engine.run(schedule)
        engine.close()
        if schedule.trained:
            weights = "model_step_*.pth" if cfg.train.get("num_step") is not None else "model_epoch_*.pth"
            logger.info("done: run directory %s; encoder weights %s (for --ckpt and embed); curves: %s", run_dir,
                        weights, run_dir / "curves.png")
        else:
            logger.info("run %s had finished: nothing to do", run_dir)
    return run_dir


class Blocks:
    """The original's schedule (module docstring) as `Stage`s: one per split still to train, and after each block
    one that writes its `model_epoch_N.pth`.

    Args:
        cfg: the run's config; dataset_cfg: its dataset block without species_start/species_end.
        species: the species ids in order ([None]: the one dataset of the config).
        position: {"splits_done", "num_splits"} of the checkpoint resumed from (zeros for a new run).
        run_dir: the run directory; logging_to_run_dir: whether log.txt is already written to (a resumed run
            starts writing it with its first split to train, so a resume of a finished run changes no file).
    """

    def __init__(self, cfg, dataset_cfg: Dict[str, Any], species: List[Optional[int]], position: Dict[str, Any],
                 run_dir: Path, logging_to_run_dir: bool):
        self.cfg, self.dataset_cfg, self.species = cfg, dataset_cfg, species
        self.done, self.num_splits = position["splits_done"], dict(position["num_splits"])
        self.run_dir, self.logging_to_run_dir = run_dir, logging_to_run_dir
        self.trained = False  # whether any split was trained (False: the resumed run had finished)

    def load(self, species: Optional[int], split: int):
        if species is not None:
            self.dataset_cfg.update(species_id=species, split_id=split)
        dataset = build(self.dataset_cfg, "dataset")
        self.num_splits[str(species)] = getattr(dataset, "num_splits", 1)
        return dataset.split()[0] if hasattr(dataset, "split") else dataset

    def __iter__(self) -> Iterator[Stage]:
        interval, num_epoch = self.cfg.get("save_interval") or 1, self.cfg.train.num_epoch
        unit = 0  # splits of the schedule passed so far, done before or now
        for first in range(0, num_epoch, interval):
            epochs = min(interval, num_epoch - first)
            for species in self.species:
                split = 0
                while True:
                    if unit >= self.done:  # load and train only the splits not done yet
                        if not self.logging_to_run_dir:
                            setup_logging(self.run_dir)
                            self.logging_to_run_dir = True
                        self.trained = True
                        train = self.load(species, split)
                        yield Stage(train, epochs, batches=self.cfg.train.get("batch_per_epoch"),
                                    record={"species": species, "split": split},
                                    position={"splits_done": unit + 1, "num_splits": dict(self.num_splits)})
                    unit += 1
                    split += 1
                    if split >= self.num_splits[str(species)]:
                        break
            name = f"model_epoch_{first + epochs}.pth"
            # trained in this block now, or stopped between the block's last split and this file (every rank
            # reaches the same branch, so the broadcast is collective)
            if unit > self.done or (unit == self.done
                                    and distributed.broadcast_object(not (self.run_dir / name).exists())):
                yield Stage(epochs=0, weights=name)


class Stream:
    """Pre-training on a streamed dataset (module docstring) as `Stage`s, one per epoch.

    Args:
        cfg: the run's config (`train.num_epoch` or `train.num_step`, `save_interval` in steps).
        train, valid: the streamed training entries and the held-out sample (`FoldCompDB.split()`).
        engine: the run's engine, resumed when the run is (its epoch, samples and `step_samples` say where the
            schedule stands).
        run_dir, logging_to_run_dir: as for `Blocks`.
    """

    def __init__(self, cfg, train, valid, engine: Engine, run_dir: Path, logging_to_run_dir: bool):
        self.train, self.engine, self.run_dir = train, engine, run_dir
        self.logging_to_run_dir = logging_to_run_dir
        self.num_step = cfg.train.get("num_step")
        num_epoch = cfg.train.get("num_epoch")
        if self.num_step is None and num_epoch is None:
            raise ConfigError("train needs num_epoch (epochs over the database's entries) or num_step (steps of "
                              "batch_size x processes entries) for a streamed dataset.")
        if self.num_step is not None and num_epoch is not None:
            raise ConfigError("give train.num_epoch or train.num_step, not both.")
        # the schedule in samples: steps are those of the run as it was started, whatever the world size now
        self.target = (self.num_step * engine.step_samples if self.num_step is not None
                       else num_epoch * len(train))
        self.save_samples = (cfg.get("save_interval") or 1000) * engine.step_samples
        self.held_out = valid is not None and len(valid) > 0
        self.trained = False

    def __iter__(self) -> Iterator[Stage]:
        n = len(self.train)
        global_batch = self.engine.loaders.batch_size * self.engine.world_size
        save_every = max(1, -(-self.save_samples // global_batch))  # steps of this run's global batch
        epoch = self.engine.epoch
        while n and epoch * n < self.target:
            if not self.logging_to_run_dir:
                setup_logging(self.run_dir)
                self.logging_to_run_dir = True
            self.trained = True
            stop = min(n, self.target - epoch * n)
            last = (epoch + 1) * n >= self.target
            weights = (f"model_step_{self.num_step}.pth" if self.num_step is not None and last
                       else None if self.num_step is not None else f"model_epoch_{epoch + 1}.pth")
            yield Stage(self.train, 1, samples=stop if stop < n else None, save_every=save_every,
                        held_out_loss=self.held_out, weights=weights)
            epoch += 1


__all__ = ["Blocks", "Stream", "main", "run_pretrain"]
