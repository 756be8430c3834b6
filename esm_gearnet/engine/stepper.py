"""From losses to parameter updates: precision, the non-finite-loss policy, gradient accumulation, clipping,
the optimizer step and the scheduler step.

One optimizer step spans `gradient_interval` batches: each batch's loss is divided by the interval before its
backward pass, so the accumulated gradient is the mean over the batches (what one batch of interval x
batch_size would give). At the step the gradient norm is clipped to `clip_norm` (after unscaling under fp16),
the optimizer steps and the gradients are set to None.

Precision: "fp32" everywhere; on CUDA "bf16" or "fp16" run the forward pass under `torch.autocast`, and fp16
scales the loss with a `GradScaler`. On CPU every precision runs as fp32.

A non-finite loss on any rank is seen by every rank (one all-reduce per batch), so all ranks take the same
branch: "stop" raises `CannotLearn` naming the epoch, step and batch; "skip" drops the gradients accumulated
since the last step and goes on with the next batch, until more than MAX_SKIPPED_SHARE of the epoch's batches
(and more than one) were skipped: then the run cannot learn and `CannotLearn` ends it too. The epoch's count of
skipped batches is `Stepper.skipped` (metrics.jsonl's `skipped_steps`).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, Optional

import torch
from torch import nn

from .. import distributed
from . import evaluation
from ..errors import UserError

logger = logging.getLogger("esm_gearnet")

PRECISIONS = ("fp32", "bf16", "fp16")
NONFINITE_POLICIES = ("stop", "skip")
# More than this share of an epoch's batches (and more than one) skipped under on_nonfinite: skip ends the run;
# unbounded, a run that skipped 46 of its 48 steps ended "successfully" with a best epoch at chance level.
MAX_SKIPPED_SHARE = 0.1


class CannotLearn(UserError, FloatingPointError):
    """A run whose losses are not finite: at once under on_nonfinite "stop", or too often under "skip". The user
    acts (a lower learning rate, fp32), so it ends the command with one sentence and exit code 2."""


class Scheduler:
    """A learning-rate scheduler and how it is stepped, both decided where it is built
    (`assembly.build_scheduler`): once per epoch after validation, on the validation score (`on_score`, as
    ReduceLROnPlateau wants) or on the epoch."""

    def __init__(self, scheduler, on_score: bool):
        self.scheduler, self.on_score = scheduler, on_score

    def step(self, score: float) -> None:
        if self.on_score:
            self.scheduler.step(score)
        else:
            self.scheduler.step()

    def state_dict(self) -> Dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)


class Stepper:
    """Owns the optimizer, the scheduler and the GradScaler, and the rules for using them.

    Args:
        optimizer: over the task's trainable parameters.
        scheduler: optional, a `Scheduler` (which knows whether it is stepped on the validation score).
        device: where the model runs (autocast and GradScaler only on CUDA).
        precision: "fp32", "bf16" or "fp16".
        gradient_interval: batches per optimizer step (values below 1 count as 1).
        clip_norm: clip the gradient norm to this value (None or 0: no clipping).
        on_nonfinite: "stop" or "skip" (module docstring).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler=None, device: torch.device = torch.device("cpu"),
                 precision: str = "fp32", gradient_interval: int = 1, clip_norm: Optional[float] = None,
                 on_nonfinite: str = "stop"):
        if precision not in PRECISIONS:
            raise ValueError(f"engine.precision must be fp32, bf16 or fp16, got {precision!r}.")
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"engine.on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}.")
        if scheduler is not None and not isinstance(scheduler, Scheduler):
            raise TypeError("Engine/Stepper: give the scheduler as engine.stepper.Scheduler(scheduler, on_score), "
                            "which says how it is stepped (assembly.build_scheduler builds one from a config).")
        self.optimizer, self.scheduler = optimizer, scheduler
        self.precision = precision if device.type == "cuda" else "fp32"
        self._autocast = evaluation.autocast(device, self.precision)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.gradient_interval = max(1, gradient_interval)
        self.clip_norm, self.on_nonfinite = clip_norm, on_nonfinite
        self.skipped, self.num_batch = 0, 0

    def start_epoch(self, num_batch: int, skipped: int = 0) -> None:
        """A new epoch of `num_batch` batches: its count of skipped batches starts at `skipped` (0, or the count
        a checkpoint inside the epoch saved)."""
        self.skipped, self.num_batch = skipped, num_batch

    def autocast(self):
        """The context of a forward pass: autocast to bf16/fp16 on CUDA, nothing under fp32."""
        return self._autocast()

    def loss_is_finite(self, loss: torch.Tensor, where: str) -> bool:
        """False on every rank when the loss of any rank is NaN or infinite; then "stop" raises `CannotLearn` and
        "skip" drops the accumulated gradients (raising `CannotLearn` once too many were skipped this epoch).

        Args:
            loss: [] this rank's loss of the batch.
            where: "epoch E, step S, batch I", for the message.
        """
        if not distributed.any_true(not bool(torch.isfinite(loss)), loss.device):
            return True
        message = f"non-finite loss ({float(loss.detach()):g}) at {where}"
        if self.on_nonfinite == "stop":
            raise CannotLearn(message + "; lower the learning rate, use fp32, or set engine.on_nonfinite: skip to "
                              "skip such steps.")
        self.skipped += 1
        if self.skipped > max(1, MAX_SKIPPED_SHARE * self.num_batch):
            raise CannotLearn(f"{message}: {self.skipped} of the epoch's {self.num_batch} batches had a non-finite "
                              f"loss, more than the {MAX_SKIPPED_SHARE:.0%} that engine.on_nonfinite: skip allows, so "
                              "the run cannot learn; lower the learning rate or use fp32.")
        logger.warning("%s: step skipped", message)
        self.zero_grad()
        return False

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of this batch's share of the step: loss / gradient_interval (scaled under fp16)."""
        share = loss / self.gradient_interval
        (self.scaler.scale(share) if self.scaler else share).backward()

    def step(self, parameters: Iterable[nn.Parameter]) -> None:
        """Clip the gradient norm of `parameters` (unscaled first under fp16), step the optimizer (through the
        GradScaler under fp16, which skips steps with non-finite gradients), and set the gradients to None."""
        if self.clip_norm:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(parameters, self.clip_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step_scheduler(self, score: float) -> None:
        """Once per epoch, after validation (`Scheduler.step`)."""
        if self.scheduler is not None:
            self.scheduler.step(score)

    def learning_rates(self):
        """[the learning rate of every parameter group]."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> Dict[str, Any]:
        """{"optimizer", "scheduler" (None without one), "scaler" (None unless fp16)}."""
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what `state_dict` returned (a missing scheduler or scaler state is left as built; a missing
        optimizer state is a sharded checkpoint's, which the engine loads from the shards)."""
        if state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
