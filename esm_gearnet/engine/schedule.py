"""What a run trains, in order: a schedule is any iterable of `Stage`s, which `Engine.run` trains one by one.

Fine-tuning is one stage per epoch, each scored on the validation split (`Engine.fit`); pre-training is the
original's blocks of species and splits, one stage per split, and a stage of no epochs that writes a block's
weights file (`commands.pretrain`). A schedule is usually a generator: a stage's dataset is loaded only when the
engine asks for that stage, so a resumed run loads no finished stage's data.

Checkpoints: after every stage that trained, `last.pth` holds the stage's `position` (the caller's, given back by
`Engine.resume`, from which the caller's schedule continues), and with `save_every` also every that many
optimizer steps inside an epoch, together with where inside the stage the engine stands: a run killed between
two such checkpoints resumes from the last one exactly, with the stage that the caller's schedule yields again.
The engine also counts the samples (proteins over all ranks) it trained on (`Engine.samples`), the position
that streamed data continues from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional


@dataclass
class Stage:
    """A piece of a schedule: `epochs` epochs over `train`, then a checkpoint and an optional weights file.

    Args:
        train: the training set (a dataset of dict items); None only for a stage of no epochs.
        epochs: epochs over `train` (0: the stage only writes `weights`).
        batches: batches per epoch, the first of each epoch's order (None: all; the original's
            `train.batch_per_epoch`).
        metric: after every epoch (and every mid-epoch checkpoint), score the validation and test splits, keep
            the best validation score of this metric (`best.pth`) and step the scheduler on it. None: no
            evaluation, and the scheduler is not stepped (pre-training).
        save_every: also checkpoint every this many optimizer steps inside an epoch (None: after the stage only).
        record: fields added to every epoch's record (pre-training's species and split).
        position: the caller's position once this stage is done, stored in `last.pth` (a plain dict, or None).
        weights: a file of the task's weights (no training state) written after the stage, e.g.
            `model_epoch_5.pth`.
        samples: for streamed data (`engine.stream`), the position in the epoch's sequence where the stage ends
            (None: the end of the epoch); a schedule in steps ends inside an epoch.
        held_out_loss: at every checkpoint, record the task's mean loss on the validation split (pre-training
            from a stream, whose tasks have no metrics).
    """

    train: Any = None
    epochs: int = 1
    batches: Optional[int] = None
    metric: Optional[str] = None
    save_every: Optional[int] = None
    record: Dict[str, Any] = field(default_factory=dict)
    position: Optional[Dict[str, Any]] = None
    weights: Optional[str] = None
    samples: Optional[int] = None
    held_out_loss: bool = False

    def __post_init__(self):
        if self.epochs and self.train is None:
            raise ValueError("a Stage that trains (epochs > 0) needs its training set.")
        if self.save_every is not None and self.save_every < 1:
            raise ValueError(f"Stage.save_every must be a positive number of steps, got {self.save_every}.")
