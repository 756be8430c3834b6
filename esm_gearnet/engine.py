"""The training engine: one loop for one CPU, one GPU and many GPUs (DDP), with exact resume.

* Training data: `DistributedSampler` (shuffled, `set_epoch` every epoch); `batch_size` is per process.
* Evaluation: each rank scores a contiguous slice of the split, predictions are gathered in rank order.
  DEVIATION: the original evaluated through a padded DistributedSampler, which scored some proteins twice.
* Selection: after every epoch, valid and test are evaluated; the best validation score of `metric` is kept
  (`best.pth`) and the final test score is the best-validation model's. DEVIATION: the original reported the
  last epoch's.
* Checkpoints: `last.pth` = {model, optimizer, scheduler, scaler, epoch, step, config, metrics, best, rng},
  written atomically by rank 0 after every epoch; `resume()` restores all of it, RNG streams of every rank
  included, so a resumed run ends with the same parameters as an uninterrupted one.
"""
from __future__ import annotations

import inspect
import json
import logging
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from . import checkpoint, distributed, report
from .data.protein import ProteinBatch, collate
from .sampler import LengthBucketSampler, dataset_lengths

logger = logging.getLogger("esm_gearnet")

LOWER_IS_BETTER = ("mae", "rmse", "loss")


def lower_is_better(metric: str) -> bool:
    return metric.split(" ")[0] in LOWER_IS_BETTER


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, (torch.Tensor, ProteinBatch)):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def _rng_state() -> Dict[str, Any]:
    numpy_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_gauss": random.getstate()[2],
             "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _plain(value: Any) -> Any:
    """Config values as plain dicts/lists (EasyDict subclasses dict), for weights_only checkpoints."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


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
        on_nonfinite: "stop" (raise, naming the step) or "skip" the step.
        sync_batch_norm: convert batch norms to SyncBatchNorm under multi-GPU DDP.
        find_unused_parameters: passed to DDP.
        bucket: length-bucketed training batches (`sampler.LengthBucketSampler`): less padding for ESM.
        run_dir: where checkpoints, metrics.jsonl and the log go; config: stored in checkpoints.
        seed: the sampler's shuffling seed.
    """

    def __init__(self, task: nn.Module, train_set, valid_set, test_set, optimizer: torch.optim.Optimizer,
                 scheduler=None, batch_size: int = 1, num_worker: int = 0, gpus: Optional[Sequence[int]] = None,
                 log_interval: int = 100, gradient_interval: int = 1, clip_norm: Optional[float] = None,
                 precision: str = "fp32", on_nonfinite: str = "stop", sync_batch_norm: bool = True,
                 find_unused_parameters: bool = False, bucket: bool = False, run_dir=None, config: Optional[Dict] = None,
                 task_names: Sequence[str] = (), seed: int = 0, device: Optional[torch.device] = None, progress: bool = True):
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"engine.precision must be fp32, bf16 or fp16, got {precision!r}.")
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"engine.on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}.")
        self.world_size, self.rank = distributed.world_size(), distributed.rank()
        if gpus is not None and len(gpus) != self.world_size:
            logger.warning("engine.gpus lists %d devices but %d process(es) run; batch_size %d is per process, "
                           "so the global batch is %d. Launch with torchrun --nproc_per_node=%d for the "
                           "original setting.", len(gpus), self.world_size, batch_size,
                           batch_size * self.world_size, len(gpus))
        self.device = device or (torch.device("cuda", distributed.local_rank()) if torch.cuda.is_available()
                                 else torch.device("cpu"))
        self.task = task.to(self.device)
        self.model = self.task
        if self.world_size > 1:
            if sync_batch_norm and self.device.type == "cuda":
                self.task = nn.SyncBatchNorm.convert_sync_batchnorm(self.task)
            self.model = nn.parallel.DistributedDataParallel(
                self.task, device_ids=[self.device] if self.device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters)
        self.sets = {"train": train_set, "valid": valid_set, "test": test_set}
        self.optimizer, self.scheduler = optimizer, scheduler
        self.batch_size, self.num_worker, self.bucket = batch_size, num_worker, bucket
        self.log_interval, self.gradient_interval = log_interval, max(1, gradient_interval)
        self.clip_norm, self.on_nonfinite = clip_norm, on_nonfinite
        self.precision = precision if self.device.type == "cuda" else "fp32"
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.config = _plain(config or {})
        self.seed, self.progress = seed, progress and self.rank == 0
        self.epoch, self.step = 0, 0
        self.best: Dict[str, Any] = {"epoch": None, "score": None}
        self.history: List[Dict[str, Any]] = []
        self.num_evaluated: Dict[str, int] = {}
        self.task_names = [str(t) for t in task_names]
        self._writer = self._tensorboard()

    # ---- data --------------------------------------------------------------------------------------------
    def _loader(self, dataset, sampler=None) -> DataLoader:
        options = dict(num_workers=self.num_worker, collate_fn=collate, pin_memory=self.device.type == "cuda")
        if isinstance(sampler, LengthBucketSampler):
            return DataLoader(dataset, batch_sampler=sampler, **options)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, shuffle=False, **options)

    def _rank_slice(self, dataset) -> Subset:
        """This rank's contiguous share of an evaluation split (sizes differ by at most one, no padding)."""
        n = len(dataset)
        lo, hi = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        return Subset(dataset, list(range(lo, hi)))

    def _autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    # ---- training ----------------------------------------------------------------------------------------
    def train_epoch(self, train_set=None) -> Dict[str, float]:
        """One pass over the training split; returns the mean of the logged values."""
        train_set = self.sets["train"] if train_set is None else train_set
        if self.bucket:
            sampler = LengthBucketSampler(dataset_lengths(train_set), self.batch_size, self.world_size,
                                          self.rank, seed=self.seed)
        else:
            sampler = DistributedSampler(train_set, num_replicas=self.world_size, rank=self.rank,
                                         shuffle=True, seed=self.seed)
        sampler.set_epoch(self.epoch)
        loader = self._loader(train_set, sampler)
        self.model.train()
        totals: Dict[str, float] = {}
        count, started, proteins = 0, time.perf_counter(), 0
        bar = self._bar(loader, f"epoch {self.epoch}")
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(bar):
            batch = to_device(batch, self.device)
            boundary = (i + 1) % self.gradient_interval == 0 or i + 1 == len(loader)
            sync = nullcontext() if boundary or self.model is self.task else self.model.no_sync()
            with sync:
                with self._autocast():
                    loss, info = self.model(batch)
                bad = distributed.any_true(not bool(torch.isfinite(loss)), self.device)
                if bad:
                    message = (f"non-finite loss ({float(loss.detach()):g}) at epoch {self.epoch}, step {self.step}, "
                               f"batch {i}")
                    if self.on_nonfinite == "stop":
                        raise FloatingPointError(message + "; lower the learning rate, use fp32, or set "
                                                 "engine.on_nonfinite: skip to skip such steps.")
                    logger.warning("%s: step skipped", message)
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                scaled = loss / self.gradient_interval
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            if boundary:
                self._optimizer_step()
            for key, value in info.items():
                totals[key] = totals.get(key, 0.0) + float(value)
            count += 1
            proteins += _num_proteins(batch) * self.world_size
            if self.progress:
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}",
                                proteins_per_s=f"{proteins / (time.perf_counter() - started):.1f}")
            if self.rank == 0 and self.log_interval and (i + 1) % self.log_interval == 0:
                logger.info("epoch %d step %d loss %.5f", self.epoch, self.step, float(loss.detach()))
        means = {k: v / max(count, 1) for k, v in totals.items()}
        means = {k: float(np.mean(v)) for k, v in _transpose(distributed.gather_objects(means)).items()}
        self.epoch += 1
        return means

    def _optimizer_step(self) -> None:
        if self.clip_norm:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.task.parameters(), self.clip_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    # ---- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, split: str):
        """(pred, target, extra) over the whole split, every protein once, in dataset order, on every rank."""
        dataset = self.sets[split]
        loader = self._loader(self._rank_slice(dataset))
        self.task.eval()
        preds, targets, extras = [], [], {k: [] for k in self.task.extra_keys}
        for batch in self._bar(loader, split):
            batch = to_device(batch, self.device)
            with self._autocast():
                pred = self.task.predict(batch)
            preds.append(pred.float().cpu())
            targets.append(self.task.target(batch).float().cpu())
            for key in extras:
                if key in batch:
                    extras[key].extend(batch[key])
        local = (torch.cat(preds) if preds else None, torch.cat(targets) if targets else None, extras)
        parts = distributed.gather_objects(local)
        pred = torch.cat([p for p, _, _ in parts if p is not None])
        target = torch.cat([t for _, t, _ in parts if t is not None])
        extra = {k: sum((e[k] for _, _, e in parts), []) for k in extras}
        extra = {k: v for k, v in extra.items() if len(v) == len(pred)}
        return pred, target, extra

    def evaluate(self, split: str) -> Dict[str, float]:
        if self.sets.get(split) is None or len(self.sets[split]) == 0:
            return {}
        pred, target, extra = self.predict(split)
        self.num_evaluated[split] = len(pred)
        return self.task.evaluate(pred, target, extra)

    # ---- the loop ----------------------------------------------------------------------------------------
    def fit(self, num_epoch: int, metric: str) -> Dict[str, float]:
        """Train until `num_epoch` epochs are done (continuing a resumed run), keep the best validation model,
        and return the test metrics of that model."""
        direction = -1.0 if lower_is_better(metric) else 1.0
        while self.epoch < num_epoch:
            train = self.train_epoch()
            valid, test = self.evaluate("valid"), self.evaluate("test")
            if metric not in valid:
                raise KeyError(f"metric: {metric!r} is not among the validation metrics ({', '.join(valid)}); "
                               "set `metric:` in the config to one of them.")
            score = valid[metric]
            record = {"epoch": self.epoch, "step": self.step, "train": train, "valid": valid, "test": test,
                      "lr": [g["lr"] for g in self.optimizer.param_groups],
                      "num_evaluated": dict(self.num_evaluated)}
            self.record(record)
            if self.best["score"] is None or direction * score > direction * self.best["score"]:
                self.best = {"epoch": self.epoch, "score": score}
                self.save_weights("best.pth")
            self._step_scheduler(score)
            self.save("last.pth")
        if self.best["epoch"] is not None and self.run_dir is not None:
            distributed.barrier()
            state = checkpoint.load(self.run_dir / "best.pth")
            self.task.load_state_dict(checkpoint.task_state(state))
        final = {"best_epoch": self.best["epoch"], "valid": self.evaluate("valid"), "test": self.evaluate("test"),
                 "num_evaluated": dict(self.num_evaluated)}
        self.record({"final": final})
        return final["test"]

    def _step_scheduler(self, score: float) -> None:
        if self.scheduler is None:
            return
        if "metrics" in inspect.signature(self.scheduler.step).parameters:
            self.scheduler.step(score)
        else:
            self.scheduler.step()

    # ---- state -------------------------------------------------------------------------------------------
    def save(self, name: str, position: Optional[Dict[str, Any]] = None) -> None:
        """Full training state, written atomically by rank 0 (RNG states of every rank included)."""
        rng = distributed.gather_objects(_rng_state())
        if self.rank == 0 and self.run_dir is not None:
            training = {"optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                        "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                        "step": self.step, "best": self.best, "metrics": self.history, "rng": rng,
                        "world_size": self.world_size, "position": position}
            checkpoint.save_atomic(checkpoint.pack(self.task, self.config, self.task_names, self.epoch, training),
                                   self.run_dir / name)
        distributed.barrier()

    def save_weights(self, name: str) -> None:
        if self.rank == 0 and self.run_dir is not None:
            checkpoint.save_atomic(checkpoint.pack(self.task, self.config, self.task_names, self.epoch),
                                   self.run_dir / name)
        distributed.barrier()

    def resume(self, path) -> Optional[Dict[str, Any]]:
        """Continue from a `last.pth` written by `save`: weights, optimizer, scheduler, counters, RNG."""
        state = checkpoint.load(path)
        if not checkpoint.is_packed(state) or not state.get("training"):
            raise checkpoint.CheckpointError(f"{path} holds model weights only; resume needs a last.pth written "
                                             "during training (use --ckpt to start from weights).")
        training = state["training"]
        if training.get("world_size", 1) != self.world_size:
            raise checkpoint.CheckpointError(f"{path} was written by {training['world_size']} process(es) but "
                                             f"{self.world_size} run now; resume with the same number.")
        checkpoint.load_state_dict_checked(self.task, checkpoint.task_state(state), str(path))
        self.optimizer.load_state_dict(training["optimizer"])
        if self.scheduler is not None and training["scheduler"] is not None:
            self.scheduler.load_state_dict(training["scheduler"])
        if self.scaler is not None and training.get("scaler"):
            self.scaler.load_state_dict(training["scaler"])
        self.epoch, self.step, self.best = state["epoch"], training["step"], training["best"]
        self.history = list(training["metrics"])
        _set_rng_state(training["rng"][self.rank])
        if self.rank == 0 and self.run_dir is not None:  # drop records the interrupted run wrote after `path`
            text = "".join(json.dumps(r) + "\n" for r in self.history)
            metrics = self.run_dir / "metrics.jsonl"
            if not metrics.is_file() or metrics.read_text() != text:
                metrics.write_text(text)
        return training.get("position")

    # ---- output ------------------------------------------------------------------------------------------
    def record(self, record: Dict[str, Any]) -> None:
        self.history.append(record)
        if self.rank != 0:
            return
        logger.info("%s", json.dumps(record))
        if self.run_dir is not None:
            with open(self.run_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
            if "epoch" in record:
                try:
                    report.write_curves(self.run_dir)
                except ImportError:  # matplotlib is a dependency; a broken install must not stop training
                    logger.warning("matplotlib cannot be imported: curves.png is not drawn")
        if self._writer is not None and "epoch" in record:
            for split in ("train", "valid", "test"):
                for key, value in record.get(split, {}).items():
                    self._writer.add_scalar(f"{split}/{key}", value, record["epoch"])
            self._writer.flush()

    def _tensorboard(self):
        if self.rank != 0 or self.run_dir is None:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.run_dir))

    def _bar(self, iterable, description: str):
        if not self.progress:
            return iterable
        from tqdm import tqdm
        return tqdm(iterable, desc=description, leave=False, dynamic_ncols=True, mininterval=1.0)


def _num_proteins(batch: Dict[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, ProteinBatch):
            return value.batch_size
    return 0


def _transpose(dicts: List[Dict[str, float]]) -> Dict[str, List[float]]:
    out: Dict[str, List[float]] = {}
    for d in dicts:
        for k, v in d.items():
            out.setdefault(k, []).append(v)
    return out
