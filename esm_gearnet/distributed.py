"""Process-group set-up for `torchrun`, `python -m torch.distributed.launch` and plain `python`.

Both launchers export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them the run is
one process. NCCL on CUDA, gloo on CPU. Every helper also works when no group is initialised.
"""
from __future__ import annotations

import os
from typing import Any, List, Tuple

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def init() -> torch.device:
    """Join the process group the launcher describes (if any) and return this process's device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value: Any, source: int = 0) -> Any:
    """`value` of rank `source`, on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def gather_objects(value: Any) -> List[Any]:
    """[value of rank 0, value of rank 1, ...] on every rank."""
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


class _GatherRows(torch.autograd.Function):
    """All ranks' rows in rank order; backward: the gradient summed over the ranks, this rank's rows kept."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: List[int]) -> torch.Tensor:
        padded = torch.cat([x, x.new_zeros(max(sizes) - len(x), *x.shape[1:])])
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.start, ctx.count = sum(sizes[:dist.get_rank()]), len(x)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad[ctx.start:ctx.start + ctx.count], None


def all_gather_with_grad(x: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(the rows of all ranks in rank order [sum of rows, ...], index of this rank's first row). Gradients flow
    back to the rank each row came from, summed over the ranks that used it. Ranks may hold different numbers
    of rows.

    The backward pass is one all-reduce. (torch.distributed.nn's all_gather emulates its backward on gloo with
    scatters, which made a gloo rank abort at exit about one run in ten.)"""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x, 0
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    sizes = [int(n) for n in sizes]
    return _GatherRows.apply(x.contiguous(), sizes), sum(sizes[:dist.get_rank()])


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on at least one."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def shutdown(wait: bool = True) -> None:
    """Leave the group; with `wait`, together (a rank leaving while a peer still talks makes gloo abort the
    peer). After an error, leave at once: the other ranks may never reach the barrier."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
