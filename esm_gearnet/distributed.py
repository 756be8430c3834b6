"""Process-group set-up for `torchrun`, `python -m torch.distributed.launch` and plain `python`.

Both launchers export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them the run is
one process. NCCL on CUDA, gloo on CPU. Every helper also works when no group is initialised.

A rank that stops answering (stopped, swapped out, dead without its connections closing) holds the others in
their next collective for the group's timeout, `engine.timeout` (DEFAULT_TIMEOUT; gloo's own is 30 minutes).
Under gloo the collective then fails on the ranks that wait, and `stalls_named` turns that failure into one
sentence naming the rank, the collective and the step. NCCL's watchdog ends the process itself, with its own
message naming the collective.
"""
from __future__ import annotations

import gc
import logging
import os
import traceback
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from .errors import MachineFault

logger = logging.getLogger("esm_gearnet")
# DEVIATION: the original used torch's default process-group timeout (30 minutes for gloo), so a rank that
# stopped answering held the others that long; 10 minutes still lets a rank load a large checkpoint or cache.
DEFAULT_TIMEOUT = 600.0  # seconds (engine.timeout)
# what gloo says (lower-cased) when a peer stopped answering (the timeout) or when its connection closed
_TIMED_OUT = ("timed out waiting", "timeout caused pair closure", "socket timeout")
_CLOSED = ("connection closed by peer", "connection reset by peer")
_timeout: Optional[float] = None


class StalledError(MachineFault, RuntimeError):
    """A collective that another rank did not answer within the group's timeout, or whose peer went away."""


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def init(timeout: float = DEFAULT_TIMEOUT) -> torch.device:
    """Join the process group the launcher describes (if any) and return this process's device.

    Args:
        timeout: seconds a collective waits for the other ranks before it fails (`engine.timeout`).
    Returns:
        This rank's GPU, else the CPU.
    """
    global _timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"engine.timeout must be a positive number of seconds, got {timeout!r}.")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
        _timeout = float(timeout)
    return device


@contextmanager
def stalls_named(where: Callable[[], str]):
    """A collective inside the block that fails because another rank stopped answering or went away: raised as
    one StalledError sentence naming this rank, the collective and `where()` (e.g. the step).

    Args:
        where: what this rank was doing, asked only when a collective fails.
    """
    try:
        yield
    except StalledError:
        raise
    except RuntimeError as error:
        text = str(error).lower()
        timed_out = any(words in text for words in _TIMED_OUT)
        if not dist.is_initialized() or not (timed_out or any(words in text for words in _CLOSED)):
            raise
        codes = [frame.f_code for frame, _ in traceback.walk_tb(error.__traceback__)][1:]  # [0]: this function
        ours = [code.co_name for code in codes if code.co_filename == __file__]
        names = {code.co_name for code in codes}
        collective = (f"distributed.{ours[-1]}" if ours else "DDP's buffer broadcast" if "_sync_buffers" in names
                      else "DDP's gradient all-reduce" if "backward" in names else "a collective of DDP")
        if timed_out:
            what = f"did not answer within {_timeout:g} s (engine.timeout)" if _timeout else "did not answer in time"
        else:
            what = "closed its connection"
        message = (f"rank {rank()} of {world_size()}: another rank {what} in {collective} during {where()}; it "
                   "stopped or died (its own output says why, if it could), so the job ends here.")
        raise StalledError(message) from error


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


def wait_for_all(name: str, poll: float = 0.5) -> None:
    """Every rank says it reached `name` and waits, with no time limit, until every rank has: the end of work
    shared unevenly (embedding shards), where a rank may finish hours after another, longer than any collective's
    timeout. Through the launcher's key-value store, polled every `poll` seconds; a rank that dies meanwhile ends
    the job through the launcher (torchrun stops every rank when one fails), not through this wait."""
    if not dist.is_initialized():
        return
    import time

    store = dist.distributed_c10d._get_default_store()
    store.set(f"esm_gearnet/{name}/{dist.get_rank()}", "1")
    keys = [f"esm_gearnet/{name}/{r}" for r in range(dist.get_world_size())]
    while not store.check(keys):
        time.sleep(poll)


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on at least one."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def shutdown(wait: bool = True) -> None:
    """Leave the group; with `wait`, together: no rank tears down its connections while a peer may still be in a
    collective with it, and no rank exits while a peer still tears down (`_meet`). After an error, leave at once:
    the other ranks may never come to the end."""
    if not dist.is_initialized():
        return
    if not wait:
        dist.destroy_process_group()
        return
    # the store, rank and size are kept: destroying the group releases them
    store, me, size = dist.distributed_c10d._get_default_store(), dist.get_rank(), dist.get_world_size()
    _meet(store, "done", me, size)  # every rank has finished its last collective: nothing is in flight
    gc.collect()  # a DDP wrapper let go of (`Engine.close`) but kept in a reference cycle still holds the group
    dist.destroy_process_group()  # with the last reference gone, gloo's connections are torn down here, now
    _meet(store, "left", me, size, everyone=False)  # rank 0, which may host the store, leaves last


def _meet(store, name: str, me: int, size: int, everyone: bool = True) -> None:
    """A rendezvous through the launcher's key-value store: rank `me` of `size` says it reached `name` and waits
    until every rank has (with `everyone` False, only rank 0 waits, for the others). Unlike a collective of the
    group, every request to the store is answered, so a rank that returns knows that every other rank has
    arrived, not only that its own messages were handed to the kernel.

    Why: this framework used to leave with barrier() then destroy_process_group(), but that call did not tear
    gloo down while the engine's DDP wrapper still held the group: its connections and threads went only when
    the engine was freed, after the barrier, when the peer might have exited. Once in about 10 runs rank 1 of a
    finished 2-rank run then slept on a futex in that teardown (faulthandler: at the return of run_downstream)
    after rank 0 had exited. Now the wrapper is let go first (`Engine.close`), the group is torn down between
    two meetings, and no rank exits while a peer still tears down its side.
    """
    timeout = timedelta(seconds=_timeout or DEFAULT_TIMEOUT)
    try:
        if me != 0 or everyone:
            store.set(f"esm_gearnet/{name}/{me}", "1")
        if me == 0 or everyone:
            store.wait([f"esm_gearnet/{name}/{r}" for r in range(size) if everyone or r != 0], timeout)
    except Exception as error:  # noqa: BLE001 - a timeout, or the store's host (rank 0) gone: one sentence
        raise StalledError(f"rank {me} of {size}: another rank did not come to the end of the run within "
                           f"{timeout.total_seconds():g} s (engine.timeout) or went away ({type(error).__name__}); "
                           "its own message, on its stderr or in the run's log.txt, says why.") from None
