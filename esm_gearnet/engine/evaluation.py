"""The one evaluation loop: a model run over batches without autograd, its outputs brought back as float tensors
on the CPU. The engine's validation (`Engine.predict`), `predict` (a task's scores) and `embed` (an encoder's
features) all run it; what a task's outputs mean is the task's (`Task.scores`, `Task.prediction_columns`)."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Dict, Iterable, Iterator

import torch

from ..data.protein import ProteinBatch


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch (tensor, ProteinBatch, or dict of them and other values) on `device`; other values as they are."""
    if isinstance(batch, (torch.Tensor, ProteinBatch)):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def autocast(device: torch.device, precision: str) -> Callable[[], Any]:
    """The context of a forward pass for `precision` on `device`: autocast to bf16/fp16 on CUDA, nothing under fp32
    or on the CPU (where every precision runs as fp32)."""
    if precision == "fp32" or device.type != "cuda":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast("cuda", dtype=dtype)


def outputs(run: Callable[[Any], Dict[str, Any]], batches: Iterable, device: torch.device,
            autocast: Callable[[], Any] = nullcontext) -> Iterator[Dict[str, Any]]:
    """`run(batch)` for every batch (moved onto `device`), under `torch.no_grad()` and `autocast()`: each result
    with its tensors as float on the CPU (other values as they are).

    Not `inference_mode`: a frozen ESM's feature cache keeps what evaluation computes for the training steps after
    it, which autograd must be able to read.
    """
    for batch in batches:
        batch = to_device(batch, device)
        with torch.no_grad(), autocast():
            result = run(batch)
        yield {key: value.float().cpu() if isinstance(value, torch.Tensor) else value
               for key, value in result.items()}
