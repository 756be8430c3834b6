"""The training engine: one loop for one CPU, one GPU and many GPUs (DDP), with exact resume.

* Training data: `DistributedSampler` (shuffled, `set_epoch` every epoch) or length buckets; `batch_size` is per
  process.
* Evaluation: each rank scores a contiguous slice of the split, predictions are gathered in rank order.
  DEVIATION: the original evaluated through a padded DistributedSampler, which scored some proteins twice.
* Selection: after every epoch, valid and test are evaluated; the best validation score of `metric` is kept
  (`best.pth`) and the final test score is the best-validation model's. DEVIATION: the original reported the
  last epoch's.
* Schedules: `Engine.run` trains any schedule of `schedule.Stage`s (epochs, batches per epoch, a validation
  metric, checkpoints inside an epoch, a weights file after a stage); fine-tuning (`Engine.fit`) and
  pre-training hand it theirs.
* Checkpoints, in `checkpoint.pack`'s layout: `last.pth` carries `training` = {optimizer, scheduler, scaler, step,
  best, metrics, rng, world_size, position, samples (and `within` for a checkpoint inside an epoch)}, written
  atomically by rank 0 after every stage; `resume()` restores all of it, RNG streams of every rank included, so
  a resumed run ends with the same parameters as an uninterrupted one. `best.pth` holds the weights only
  (`training` None).

The engine wires together parts with one concern each; what stays here is the DDP wrapper, the training loop
(`Engine.train_epoch`, one function read top to bottom), evaluation, the schedule loop (`Engine.run`) and the
files a run writes.

==============  ===============================================================================================
module          concern
==============  ===============================================================================================
schedule        what a run trains, in order: `Stage`s
loaders         this rank's DataLoaders: shuffled or length-bucketed training batches, evaluation slices
stepper         precision, the non-finite-loss policy, gradient accumulation, clipping, optimizer and scheduler
gathering       evaluation slices, and predictions and training means gathered across ranks
selection       the best validation epoch (`lower_is_better`)
run_log         the history of records, metrics.jsonl, curves.png, TensorBoard
rng             the random streams of a process, captured and restored
checkpoint      the file layout (`pack`, `task_state`) and safe loading
==============  ===============================================================================================
"""
from __future__ import annotations

import functools
import itertools
import logging
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, Iterable, List, Literal, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import checkpoint, distributed, sharding
from ..config import plain
from ..data.protein import ProteinBatch, collate
from . import evaluation, rng
from .gathering import gather_predictions, mean_over_ranks
from .loaders import Loaders
from .run_log import RunLog
from .schedule import Stage
from .selection import LOWER_IS_BETTER, BestEpoch, lower_is_better, selection_score
from .stepper import Stepper

logger = logging.getLogger("esm_gearnet")

__all__ = ["Engine", "LOWER_IS_BETTER", "lower_is_better"]


def data_parallel(task: nn.Module, device: torch.device, world_size: int, sync_batch_norm: bool,
                  find_unused_parameters: bool) -> Tuple[nn.Module, nn.Module]:
    """(task, model): the task on `device` (its batch norms made SyncBatchNorm under multi-GPU DDP when
    `sync_batch_norm`), and what training calls: the task itself in one process, its DDP wrapper in several.
    Evaluation calls the task directly: each rank scores its own slice, no gradient is synchronised."""
    task = task.to(device)
    if world_size == 1:
        return task, task
    if sync_batch_norm and device.type == "cuda":
        task = nn.SyncBatchNorm.convert_sync_batchnorm(task)
    model = nn.parallel.DistributedDataParallel(task, device_ids=[device] if device.type == "cuda" else None,
                                                find_unused_parameters=find_unused_parameters)
    return task, model


def _stalls_named(method):
    """`method` of the Engine, with a collective that another rank does not answer ending the job in one
    sentence naming this rank, the collective, the method, the epoch and the step (`distributed.stalls_named`)."""
    def where(self) -> str:  # epochs count from 1: train_epoch is in epoch N + 1 until it ends
        if method.__name__ == "train_epoch":
            return f"train_epoch in epoch {self.epoch + 1}, step {self.step}"
        return f"{method.__name__} after epoch {self.epoch}, step {self.step}"

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with distributed.stalls_named(lambda: where(self)):
            return method(self, *args, **kwargs)
    return wrapper


class Engine:
    """Trains and evaluates a task.

    Args:
        task: a `tasks.Task`; train_set, valid_set, test_set: datasets of dict items.
        optimizer, scheduler: built over the task's trainable parameters (scheduler optional; one whose
            `step` takes `metrics` is stepped on the validation score, any other once per epoch).
        batch_size: per process; num_worker: DataLoader workers; gpus: the original's list, checked against
            the world size; log_interval: steps between log lines.
        gradient_interval: optimizer steps every this many batches (gradient accumulation).
        clip_norm: clip the gradient norm; precision: "fp32", or "bf16"/"fp16" autocast on CUDA.
        on_nonfinite: "stop" (raise, naming the step) or "skip" the step (at most `stepper.MAX_SKIPPED_SHARE` of
            an epoch's batches; the epoch's count is the record's `skipped_steps`).
        sync_batch_norm: convert batch norms to SyncBatchNorm under multi-GPU DDP or FSDP.
        strategy: "ddp" (every rank holds the whole model) or "fsdp" (each rank holds 1/W of the parameters,
            gradients and optimizer state: `sharding`; checkpoints are folders, `checkpoint.save_folder`). One
            process runs the plain loop under either.
        find_unused_parameters: passed to DDP.
        bucket: length-bucketed training batches (`sampler.LengthBucketSampler`): less padding for ESM.
        logger: "logging" (log, metrics.jsonl, curves.png, TensorBoard) or "wandb" (also Weights & Biases).
        run_dir: where checkpoints, metrics.jsonl and the log go; config: stored in checkpoints.
        task_names: the dataset's target names in the head's output order, stored in checkpoints.
        seed: the sampler's shuffling seed.
        device: default: this rank's GPU, else the CPU. progress: progress bars (rank 0 only).
        timeout: seconds a collective waits for the other ranks (default `distributed.DEFAULT_TIMEOUT`, 10
            minutes); `training_run` joins the process group with it. A rank that stops answering then ends the
            job with a sentence naming the waiting rank, the collective and the step (`_stalls_named`).
    """

    def __init__(self, task: nn.Module, train_set, valid_set, test_set, optimizer: torch.optim.Optimizer,
                 scheduler=None, batch_size: int = 1, num_worker: int = 0, gpus: Optional[Sequence[int]] = None,
                 log_interval: int = 100, gradient_interval: int = 1, clip_norm: Optional[float] = None,
                 precision: str = "fp32", on_nonfinite: str = "stop", sync_batch_norm: bool = True,
                 find_unused_parameters: bool = False, bucket: bool = False,
                 strategy: Literal["ddp", "fsdp"] = "ddp",
                 logger: Literal["logging", "wandb"] = "logging", run_dir=None,
                 config: Optional[Dict] = None, task_names: Sequence[str] = (), seed: int = 0,
                 device: Optional[torch.device] = None, progress: bool = True,
                 timeout: float = distributed.DEFAULT_TIMEOUT):
        self.world_size, self.rank = distributed.world_size(), distributed.rank()
        self.device = device or (torch.device("cuda", distributed.local_rank()) if torch.cuda.is_available()
                                 else torch.device("cpu"))
        self.stepper = Stepper(optimizer, scheduler, self.device, precision, gradient_interval, clip_norm,
                               on_nonfinite)
        if gpus is not None and len(gpus) != self.world_size:
            log = logging.getLogger("esm_gearnet")  # `logger` is the engine.logger option here
            log.warning("engine.gpus lists %d devices but %d process(es) run; batch_size %d is per process, so the "
                        "global batch is %d. Launch with torchrun --nproc_per_node=%d for the original setting.",
                        len(gpus), self.world_size, batch_size, batch_size * self.world_size, len(gpus))
        if strategy == "fsdp" and precision == "fp16":
            from ..config import ConfigError

            raise ConfigError("config key `engine.precision`: fp16 does not shard (its loss scaler is per process); "
                              "use bf16 or fp32 with engine.strategy: fsdp.")
        self.sharded = sharding.applies(strategy)
        if self.sharded:  # the optimizer's groups then point at the sharded parameters
            names = sharding.parameter_names(task)  # each unit is moved to the device as it is sharded
            if sync_batch_norm and self.device.type == "cuda":
                task = nn.SyncBatchNorm.convert_sync_batchnorm(task)
            self.task = self.model = sharding.shard(task, self.device, precision)
            sharding.rebind(optimizer, names, self.task)
        else:
            self.task, self.model = data_parallel(task, self.device, self.world_size, sync_batch_norm,
                                                  find_unused_parameters)
        self.sets = {"train": train_set, "valid": valid_set, "test": test_set}
        self.loaders = Loaders(batch_size, num_worker, self.rank, self.world_size, seed=seed, bucket=bucket,
                               pin_memory=self.device.type == "cuda")
        self.log_interval = log_interval
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.config = plain(config or {})
        self.task_names = [str(t) for t in task_names]
        self.progress = progress and self.rank == 0
        self.epoch, self.step = 0, 0
        self.samples = 0  # proteins trained on, over all ranks: the position streamed data continues from
        self._position: Optional[Dict[str, Any]] = None  # the caller's position after the last finished stage
        self._within: Optional[Dict[str, Any]] = None  # where a checkpoint inside an epoch stands (this rank's)
        self._stage_epoch, self._score = 0, None
        self.selection = BestEpoch()
        self.run_log = RunLog(self.run_dir, writes=self.rank == 0, logger=logger, config=self.config)
        self.num_evaluated: Dict[str, int] = {}
        self._streamed = False  # whether streamed data was trained on (its checkpoints resume at any world size)
        # samples of one step as the run was started (batch_size x its world size); a run resumed with another
        # world size keeps it, so that a schedule in steps (`commands.pretrain.Stream`) means the same samples
        self.step_samples = batch_size * self.world_size
        self._entries_read = self._entries_skipped = 0  # of streamed data, by this rank

    @property
    def best(self) -> Dict[str, Any]:
        """{"epoch", "score"} of the best validation epoch so far (None, None before the first)."""
        return self.selection.state_dict()

    @property
    def history(self) -> List[Dict[str, Any]]:
        """Every record so far, resumed ones included."""
        return self.run_log.history

    # ---- training ----------------------------------------------------------------------------------------
    @_stalls_named
    def train_epoch(self, train_set=None, batch_per_epoch: Optional[int] = None,
                    stage: Optional[Stage] = None) -> Dict[str, float]:
        """One pass over `train_set` (default: the training split), or its first `batch_per_epoch` batches (the
        original's `train.batch_per_epoch`: each epoch the first batches of that epoch's order); returns the mean
        over batches and ranks of every value the task logs (its `info`). Within `run`, the stage gives the
        data, the batches and the mid-epoch checkpoints; an epoch a resumed checkpoint was saved inside
        continues after its last saved step."""
        stage = stage or Stage(self.sets["train"] if train_set is None else train_set, batches=batch_per_epoch)
        within, self._within = self._within, None  # where a checkpoint inside this epoch left it
        loader, start, num_batch = self._epoch_batches(stage, within)
        self.model.train()
        totals: Dict[str, float] = dict(within["totals"]) if within else {}
        count, started, proteins = (within["count"] if within else 0), time.perf_counter(), 0
        epoch = self.epoch + 1  # epochs count from 1 everywhere: bar, log, metrics.jsonl, checkpoints
        bar = self._bar(loader, f"epoch {epoch}", num_batch - start)
        # a log line every log_interval batches; without a terminal (no bar), ten lines over a long epoch
        interval = self.log_interval or (num_batch // 10 if num_batch >= 100 and not sys.stderr.isatty() else 0)
        self.stepper.zero_grad()
        self.stepper.start_epoch(num_batch, skipped=within["skipped"] if within else 0)
        for i, batch in enumerate(bar, start):
            # streamed data: where the global batch stands, and whether this rank's part is a filler (weight 0)
            place = batch.pop("stream", None)
            weight = place["weight"] if place else 1.0
            if place:
                self._streamed_batch(stage.train, place)
            # the batch onto this process's device
            batch = evaluation.to_device(batch, self.device)
            # an optimizer step ends every gradient_interval batches and the epoch; before it, DDP accumulates
            # gradients locally (no_sync) instead of all-reducing them after every backward pass
            boundary = (i + 1) % self.stepper.gradient_interval == 0 or i + 1 == num_batch
            sync = nullcontext() if boundary or self.model is self.task else self.model.no_sync()
            if self.sharded:  # FSDP: gradients reduce-scattered at the step's last batch only
                sharding.gradient_sync(self.task, boundary)
            with sync:
                # forward: the loss and the values to log (autocast under bf16/fp16)
                with self.stepper.autocast():
                    loss, info = self.model(batch)
                if weight != 1.0:  # a filler: in the collectives like any batch, with no gradient of its own
                    loss = loss * weight
                # a non-finite loss on any rank: raise ("stop"), or drop the step's gradients on every rank
                if not self.stepper.loss_is_finite(loss, f"epoch {epoch}, step {self.step}, batch {i}"):
                    continue
                # backward: this batch's share of the step's gradient (loss / gradient_interval)
                self.stepper.backward(loss)
            # update: clip, optimizer step, gradients to None
            if boundary:
                self.stepper.step(self.task.parameters())
                self.step += 1
            # bookkeeping: sums of the logged values, samples, throughput on the bar, a log line every log_interval
            if weight:
                for key, value in info.items():
                    totals[key] = totals.get(key, 0.0) + float(value)
                count += 1
            passed = place["end"] - place["start"] if place else _num_proteins(batch) * self.world_size
            proteins += passed
            self.samples += passed
            if self.progress:
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}",
                                proteins_per_s=f"{proteins / (time.perf_counter() - started):.1f}")
            if self.rank == 0 and interval and (i + 1) % interval == 0:
                logger.info("epoch %d step %d loss %.4g", epoch, self.step, float(loss.detach()))
            # a checkpoint inside the epoch (`Stage.save_every`), scored first when the stage names a metric
            if boundary and stage.save_every and self.step % stage.save_every == 0 and i + 1 < num_batch:
                if stage.metric:
                    self._validate(stage, epoch=self.epoch + (i + 1) / num_batch,
                                   train=mean_over_ranks({k: v / max(count, 1) for k, v in totals.items()}))
                elif stage.held_out_loss:  # streamed: the epoch's fraction is the sample reached, for any world size
                    self._record_held_out(stage, self.epoch + place["end"] / len(stage.train) if place
                                          else self.epoch + (i + 1) / num_batch,
                                          mean_over_ranks({k: v / max(count, 1) for k, v in totals.items()}))
                self._within = {"batch": i + 1, "totals": totals, "count": count, "skipped": self.stepper.skipped,
                                "stage_epoch": self._stage_epoch, "sample": place["end"] if place else None}
                self.save("last.pth", position=self._position)
                self._within = None
        # the epoch's means over this rank's batches, then over the ranks
        means = mean_over_ranks({k: v / max(count, 1) for k, v in totals.items()})
        self.epoch += 1
        return means

    def _epoch_batches(self, stage: Stage, within: Optional[Dict[str, Any]]):
        """(this rank's loader for the rest of the epoch, the index of its first batch, the epoch's batches)."""
        start = within["batch"] if within else 0
        if getattr(stage.train, "streamed", False):  # from the sample where the run stands, up to the stage's end
            self._streamed = True
            loader = self.loaders.train(stage.train, self.epoch, start_sample=within["sample"] if within else 0,
                                        stop_sample=stage.samples)
            return loader, start, start + len(loader)
        # this rank's batches, in the order of (seed, epoch): the same on every rank and after a resume
        loader = self.loaders.train(stage.train, self.epoch)
        num_batch = min(len(loader), stage.batches or len(loader))
        if start:
            loader = self.loaders.train(stage.train, self.epoch, skip=start)
        if start + len(loader) > num_batch:
            loader = itertools.islice(loader, num_batch - start)
        return loader, start, num_batch

    def _streamed_batch(self, dataset, place: Dict[str, Any]) -> None:
        """The entries of a streamed batch that could not be read: each named in the log and counted; once their
        share of the entries the ranks read passes the dataset's bound, every rank stops at this batch (one
        sentence; the decision is collective, so no rank is left waiting in the next step's all-reduce)."""
        self._entries_read += place["count"] + len(place["skipped"])
        for name, reason in place["skipped"]:
            self._entries_skipped += 1
            logger.warning("skipped entry %s: %s", name, reason)
        bound = getattr(dataset, "max_skipped", 0.01)
        over = self._entries_read >= 100 and self._entries_skipped > bound * self._entries_read
        if distributed.any_true(over, self.device):
            from ..errors import InputError

            raise InputError(f"{getattr(dataset, 'path', 'the streamed dataset')}: more than the dataset's "
                             f"max_skipped ({bound:g}) of the entries read could not be read ({self._entries_skipped} "
                             f"of {self._entries_read} on rank {self.rank}); the log names them: check or rebuild "
                             "the database, or raise dataset.max_skipped.")

    def _record_held_out(self, stage: Stage, epoch, train: Dict[str, float]) -> None:
        """Record the training means so far and the mean loss on the validation split (`held_out_loss`)."""
        self.record({"epoch": epoch, "step": self.step, "samples": self.samples, **stage.record, "train": train,
                     "valid": {"loss": self.held_out_loss("valid")}, "lr": self.stepper.learning_rates(),
                     "skipped_steps": self.stepper.skipped, "skipped_entries": self._entries_skipped})

    @_stalls_named
    def held_out_loss(self, split: str) -> Optional[float]:
        """The task's mean loss over `split` (each rank its slice; None when the split is empty), in eval mode
        and without gradients; every random stream is put back afterwards, so training continues as without it."""
        dataset = self.sets.get(split)
        if dataset is None or len(dataset) == 0:
            return None
        streams = rng.capture()
        torch.manual_seed(self.loaders.seed)
        self.task.eval()
        total, count = 0.0, 0
        # every rank the same number of batches: a task that gathers across ranks in its forward pass (the
        # sequence-structure contrast) would otherwise meet another rank's collective (the < W left over are
        # not scored)
        even = len(dataset) - len(dataset) % self.world_size
        try:
            with torch.no_grad():
                for batch in self.loaders.evaluation(torch.utils.data.Subset(dataset, range(even))):
                    with self.stepper.autocast():
                        loss, _ = self.task(evaluation.to_device(batch, self.device))
                    total, count = total + float(loss) * _num_proteins(batch), count + _num_proteins(batch)
        finally:
            self.task.train()
            rng.restore(streams)
        sums = [sum(part) for part in zip(*distributed.gather_objects((total, count)))]
        return sums[0] / sums[1] if sums[1] else None

    # ---- schedules ---------------------------------------------------------------------------------------
    def run(self, schedule: Iterable[Stage]) -> None:
        """Train the stages of `schedule` in order (`schedule.Stage`): each stage's epochs, each epoch recorded
        (and scored, with the stage's metric), then `last.pth` with the stage's position and the stage's
        weights file. A checkpoint saved inside a stage continues it where it stopped."""
        for stage in schedule:
            within = self._within
            for self._stage_epoch in range(within["stage_epoch"] if within else 0, stage.epochs):
                train = self.train_epoch(stage=stage)
                if stage.metric:
                    self._validate(stage, self.epoch, train)
                    self.stepper.step_scheduler(self._score)
                elif stage.held_out_loss:
                    self._record_held_out(stage, self.epoch, train)
                else:
                    self.record({"epoch": self.epoch, "step": self.step, **stage.record, "train": train,
                                 "lr": self.stepper.learning_rates(), "skipped_steps": self.stepper.skipped})
            if stage.epochs:
                self._position = stage.position
                self.save("last.pth", position=stage.position)
            if stage.weights:
                self.save_weights(stage.weights)
                logger.info("saved the weights to %s", self.run_dir / stage.weights if self.run_dir else
                            stage.weights)

    def _validate(self, stage: Stage, epoch, train: Dict[str, float]) -> None:
        """Score valid and test, keep the best validation score of the stage's metric (its weights become
        best.pth) and record the epoch (the best epoch marked in curves.png)."""
        valid, test = self.evaluate("valid"), self.evaluate("test")
        self._score = selection_score(valid, stage.metric)
        improved = self.selection.update(epoch, self._score, stage.metric)
        self.record({"epoch": epoch, "step": self.step, **stage.record, "train": train, "valid": valid,
                     "test": test, "lr": self.stepper.learning_rates(), "num_evaluated": dict(self.num_evaluated),
                     "skipped_steps": self.stepper.skipped, "best_epoch": self.best["epoch"]})
        if improved:
            self.save_weights("best.pth")

    # ---- evaluation --------------------------------------------------------------------------------------
    @_stalls_named
    def predict(self, split: str):
        """(pred, target, extra) over the whole split, every protein once, in dataset order, on every rank."""
        loader = self.loaders.evaluation(self.sets[split])
        self.task.eval()

        def run(batch):
            extra = {key: batch[key] for key in self.task.extra_keys if key in batch}
            return {"pred": self.task.predict(batch), "target": self.task.target(batch), **extra}

        batches, gathered = self._bar(loader, split), nullcontext()
        if self.sharded:  # every rank runs as many batches (each a collective): fillers after its own
            batches = sharding.evened(batches, lambda: collate([self.sets[split][0]]), self.device)
            gathered = sharding.gathered(self.task)
        preds, targets, extras = [], [], {k: [] for k in self.task.extra_keys}
        with gathered:
            results = list(evaluation.outputs(run, batches, self.device, self.stepper.autocast))
        for out in results[:len(loader)]:
            preds.append(out["pred"])
            targets.append(out["target"])
            for key in extras:
                extras[key].extend(out.get(key, []))
        return gather_predictions(preds, targets, extras)

    def evaluate(self, split: str) -> Dict[str, float]:
        """The task's metrics on `split` ({} when the split is absent or empty)."""
        if self.sets.get(split) is None or len(self.sets[split]) == 0:
            return {}
        pred, target, extra = self.predict(split)
        self.num_evaluated[split] = len(pred)
        return self.task.evaluate(pred, target, extra)

    # ---- fine-tuning -----------------------------------------------------------------------------------
    @_stalls_named
    def fit(self, num_epoch: int, metric: str, batch_per_epoch: Optional[int] = None) -> Dict[str, float]:
        """Train until `num_epoch` epochs (of `batch_per_epoch` batches, default all) are done (continuing a
        resumed run), each scored on the validation split, and return the test metrics of the best validation
        epoch's model (`final`)."""
        self.run(Stage(self.sets["train"], batches=batch_per_epoch, metric=metric)
                 for _ in range(self.epoch, num_epoch))
        return self.final()

    def final(self) -> Dict[str, float]:
        """The best validation epoch's weights (best.pth), scored once more on valid and test (recorded as
        "final"); returns the test metrics. DEVIATION: the original reported the last epoch's test score."""
        if self.best["epoch"] is not None and self.run_dir is not None:
            distributed.barrier()
            self._load_weights(self.run_dir / "best.pth")
        final = {"best_epoch": self.best["epoch"], "valid": self.evaluate("valid"), "test": self.evaluate("test"),
                 "num_evaluated": dict(self.num_evaluated)}
        self.record({"final": final})
        return final["test"]

    def record(self, record: Dict[str, Any]) -> None:
        """Append a JSON-able record to the history and (rank 0) to the log, metrics.jsonl and, for records
        with "epoch", curves.png and TensorBoard (`run_log.RunLog`)."""
        self.run_log.record(record)

    # ---- checkpoints -------------------------------------------------------------------------------------
    @_stalls_named
    def save(self, name: str, position: Optional[Dict[str, Any]] = None) -> None:
        """The full training state as `run_dir/name`, written atomically by rank 0 (every rank's RNG included).

        Args:
            position: where a caller's own loop stands (a plain dict of numbers, strings and lists, or None),
                given back by `resume`; e.g. pre-training's split.
        """
        rng_states = distributed.gather_objects(rng.capture())
        # inside an epoch (`Stage.save_every`): every rank's place and partial sums
        within = distributed.gather_objects(self._within) if self._within is not None else None
        training = {**self.stepper.state_dict(), "step": self.step, "best": self.best,
                    "metrics": self.history, "rng": rng_states, "world_size": self.world_size,
                    "position": position, "samples": self.samples, "streamed": self._streamed,
                    "step_samples": self.step_samples}
        if within is not None:
            training["within"] = within
        self._write(name, training)

    def _write(self, name: str, training: Optional[Dict[str, Any]]) -> None:
        """`run_dir/name` in this framework's layout: a file rank 0 writes atomically, or under `fsdp` a folder
        every rank writes its shards into (`checkpoint.save_folder`; the optimizer's state in the shards)."""
        if self.run_dir is None:
            return
        if self.sharded:
            tensors = sharding.state_dicts(self.task, self.stepper.optimizer if training is not None else None)
            content = checkpoint.pack(None, self.config, self.task_names, epoch=self.epoch,
                                      training=training and {**training, "optimizer": None})
            checkpoint.save_folder(tensors, content, self.run_dir / name)
            return
        if self.rank == 0:
            checkpoint.save_atomic(checkpoint.pack(self.task, self.config, self.task_names, epoch=self.epoch,
                                                   training=training), self.run_dir / name)
        distributed.barrier()

    def _load_weights(self, path) -> None:
        """The task's weights from a checkpoint this engine wrote (a folder under `fsdp`: each rank its shards)."""
        if self.sharded:
            self._load_folder(path, with_optimizer=False)
        else:
            self.task.load_state_dict(checkpoint.task_state(checkpoint.load(path)))

    def _load_folder(self, path, with_optimizer: bool) -> None:
        """This rank's shards of the task (and the optimizer) from the sharded checkpoint `path`, resharded for this
        world size (`checkpoint.load_folder`)."""
        optimizer = self.stepper.optimizer if with_optimizer else None
        tensors = sharding.state_dicts(self.task, optimizer)
        checkpoint.load_folder(tensors, path)
        sharding.load_state_dicts(self.task, optimizer, tensors)

    @_stalls_named
    def save_weights(self, name: str) -> None:
        """The task's weights (no training state) as `run_dir/name` (`_write`)."""
        self._write(name, None)

    def resume(self, path, state: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
        """Continue from a file `save` wrote: weights, optimizer, scheduler, scaler, counters, best epoch,
        history and this rank's RNG. Returns the `position` given to `save`.

        Args:
            state: the file already read (`checkpoint.load(path)`) when the task was built from it
                (`build_task(..., state=checkpoint.task_state(state))`): its weights are then in place. A sharded
                checkpoint (a folder, `engine.strategy: fsdp`) is read here, each rank its shards, resharded for
                this number of processes.
        """
        folder = checkpoint.is_folder(path)
        weights_in_place = state is not None and not folder
        state = checkpoint.load(path, verify=not folder) if state is None else state
        training = checkpoint.resumable_training(state, path, self.world_size)  # (one process: not a folder)
        if folder != self.sharded:
            written, now = ("fsdp", "ddp") if folder else ("ddp", "fsdp")
            raise checkpoint.CheckpointError(
                f"{path} was written under engine.strategy {written} but this run is {now}; resume with "
                f"engine.strategy {written} (or start from its weights with --ckpt).")
        if folder:
            self._load_folder(path, with_optimizer=True)
        elif not weights_in_place:
            checkpoint.load_state_dict_checked(self.task, checkpoint.task_state(state), str(path))
        self.stepper.load_state_dict(training)
        self.epoch, self.step = state["epoch"], training["step"]
        self.selection.load_state_dict(training["best"])
        self.run_log.restore(training["metrics"])  # drops records the interrupted run wrote after `path`
        self.samples = training.get("samples", 0)  # 0 in checkpoints written before samples were counted
        self.step_samples = training.get("step_samples", self.step_samples)
        within = training.get("within")
        if training["world_size"] == self.world_size:
            rng.restore(training["rng"][self.rank])
            self._within = within[self.rank] if within else None
        else:  # another world size (`checkpoint.resumable_training`): streamed data continues at its sample, a
            # sharded checkpoint at its epoch's end; new random streams either way
            from .stream import derived_seed

            self._streamed = bool(training.get("streamed"))
            rng.seed_all(derived_seed(self.loaders.seed, self.step, self.rank))
            self._within = {"batch": 0, "totals": {}, "count": 0, "skipped": 0, "sample": within[0]["sample"],
                            "stage_epoch": within[0]["stage_epoch"]} if within else None
            logger.info("resumed a run of %d process(es) with %d at step %d (sample %d of epoch %d)",
                        training["world_size"], self.world_size, self.step, within[0]["sample"] if within else 0,
                        self.epoch + 1)
        self._position = training["position"]
        return training["position"]

    def close(self) -> None:
        """The end of a run: close the run log (Weights & Biases, TensorBoard) and let go of the DDP wrapper, which
        holds the process group, so that `distributed.shutdown` tears the group down while every rank is still
        there (not later, when the engine is freed: a rank freeing it after its peer had exited hung)."""
        self.run_log.close()
        self.model = self.task

    # ---- console -----------------------------------------------------------------------------------------
    def _bar(self, iterable, description: str, total: Optional[int] = None):
        if not self.progress:
            return iterable
        from tqdm import tqdm
        # a bar on a terminal only: into a log file tqdm would write its frames one after another on one line
        return tqdm(iterable, desc=description, total=total, leave=False, dynamic_ncols=True, mininterval=1.0,
                    disable=not sys.stderr.isatty())


def _num_proteins(batch: Dict[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, ProteinBatch):
            return value.batch_size
    return 0
