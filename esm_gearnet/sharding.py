"""`engine.strategy: fsdp`: a task sharded over the ranks with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Under `ddp` (the default) every rank holds the whole model, its gradients and its optimizer state. Under `fsdp`
each rank holds 1/W of them: a unit's parameters are all-gathered just before it runs and freed after it, and its
gradients are reduce-scattered (averaged over the ranks, as DDP's all-reduce does). The units:

==================================  ===============================================================================
unit                                 entered through
==================================  ===============================================================================
each transformer layer of ESM        `call(layer, layer_fn, ...)` (`models.esm.attention` calls layers as functions)
the structure encoder                its `network` (what fusion calls) or `forward`
each module of the task's head       `forward` (kept in fp32: `Task.in_fp32`)
the task (the root: what is left)    `forward` in training; `gathered` around evaluation, which calls `predict`
==================================  ===============================================================================

An encoder names its units itself (`Encoder.shard_units`): the engine knows no model's layout.

Every rank must enter every unit equally often (each entry is a collective): training batches are equally many on
every rank already; evaluation runs a rank out of batches on a filler until every rank is done (`evened`). A frozen
ESM's feature cache would skip the layers on one rank and not on another, so it is off under `fsdp`.

Mixed precision (CUDA): `engine.precision: bf16` gathers parameters in bf16 and reduces gradients in fp32; the
head's units stay fp32; the sharded parameters, gradients and Adam's moments are fp32. fp16 is refused (its loss
scaler does not shard). On the CPU every precision is fp32.

One process: `fsdp` is the plain run (nothing to shard).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import torch
from torch import nn

_CALL = "sharded_call"  # the method `call` enters a unit through


def applies(strategy: str) -> bool:
    """Whether a run under `engine.strategy` `strategy` shards: fsdp with several processes (one is the plain run)."""
    from . import distributed

    return strategy == "fsdp" and distributed.world_size() > 1


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` is a unit of FSDP2 (`fully_shard` was applied to it)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def call(module: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(module, *args)`, with the unit's parameters gathered around it when `module` is sharded (a function that
    reads a module's submodules directly, as ESM's fast paths read a layer's, bypasses its `forward` hooks)."""
    if is_sharded(module):
        return getattr(module, _CALL)(fn, *args)
    return fn(module, *args)


def _enter_through(module: nn.Module, methods: Iterable[str]) -> None:
    """Make FSDP gather `module`'s parameters around `methods` (besides `forward`) and around `call`."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    def sharded_call(self, fn, *args):
        return fn(self, *args)

    setattr(module, _CALL, sharded_call.__get__(module, type(module)))
    for name in (_CALL, *methods):
        register_fsdp_forward_method(module, name)


def head_units(task: nn.Module) -> List[nn.Module]:
    """The modules of the task outside its encoder that hold parameters: its head (each called as a module)."""
    return [module for name, module in task.named_children()
            if name != "encoder" and any(True for _ in module.parameters())]


def shard(task: nn.Module, device: torch.device, precision: str = "fp32") -> nn.Module:
    """Shard `task` in place over the ranks of the process group (see the module docstring) and return it.

    Args:
        task: a `tasks.Task` (on the CPU: each unit is moved to `device` as it is sharded), its parameters as built
            (the optimizer is pointed at the sharded ones after: `rebind`).
        device: this rank's device; precision: "fp32" or "bf16" (the engine refuses "fp16").
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    low = torch.bfloat16 if precision == "bf16" and device.type == "cuda" else None
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None)
    fp32 = MixedPrecisionPolicy()
    # unit by unit: cast to fp32 (a model built in `checkpoint.keeping_dtypes` holds its file's fp16), then moved
    # to the device and sharded: one unit at a time exists whole
    for unit, methods in task.encoder.shard_units():
        _to_fp32(unit)
        fully_shard(unit, mesh=mesh, mp_policy=policy)
        _enter_through(unit, methods)
    for head in head_units(task):
        _to_fp32(head)
        fully_shard(head, mesh=mesh, mp_policy=fp32)
    _to_fp32(task)
    fully_shard(task, mesh=mesh, mp_policy=policy)
    return task


def _to_fp32(module: nn.Module) -> None:
    """The module's fp16 and bf16 parameters not sharded yet (the parameter objects kept) and buffers (fair-esm's
    rotary `inv_freq`), as fp32: what building the model outside `checkpoint.keeping_dtypes` gives."""
    from torch.distributed.tensor import DTensor

    low = (torch.float16, torch.bfloat16)
    for parameter in module.parameters():
        if parameter.dtype in low and not isinstance(parameter, DTensor):
            parameter.data = parameter.data.float()
    for owner in module.modules():
        for name, buffer in owner.named_buffers(recurse=False):
            if buffer.dtype in low:
                setattr(owner, name, buffer.float())


def rebind(optimizer: torch.optim.Optimizer, names: Dict[int, str], task: nn.Module) -> None:
    """Point `optimizer`'s parameter groups at `task`'s sharded parameters (`shard` replaces each parameter by a
    sharded one of the same name); the groups' options (learning rates) stay. Before any step: no state is moved.

    Args:
        names: {id(parameter before sharding): its name in task}.
    """
    now = dict(task.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [now[names[id(p)]] for p in group["params"]]
    optimizer.state.clear()


def parameter_names(task: nn.Module) -> Dict[int, str]:
    """{id(parameter): name} of `task`'s parameters, for `rebind` after `shard`."""
    return {id(p): name for name, p in task.named_parameters()}


def gradient_sync(task: nn.Module, sync: bool) -> None:
    """Whether the next backward pass reduce-scatters gradients (False while accumulating: they add up locally)."""
    task.set_requires_gradient_sync(sync)


@contextmanager
def gathered(task: nn.Module):
    """The root unit's own parameters gathered in the block (evaluation calls the task's `predict`, not its
    `forward`); the other units gather theirs as they run."""
    task.unshard()
    try:
        yield
    finally:
        task.reshard()


def evened(batches: Iterable[Any], filler: Callable[[], Any], device: torch.device) -> Iterator[Any]:
    """This rank's batches, then `filler()` until every rank has run out: every rank runs equally many forward
    passes (each a collective under `fsdp`); the caller keeps the outputs of its own batches only (the first ones).
    One all-reduce per batch.

    Args:
        filler: a batch to run and throw away (called when this rank has no batch left).
    """
    from . import distributed

    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        if not distributed.any_true(batch is not None, device):
            return
        yield batch if batch is not None else filler()


def state_dicts(task: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Dict[str, Any]:
    """{"model": task's sharded state_dict, "optimizer": the optimizer's (keyed by parameter names)}: what every rank
    writes of a sharded checkpoint (`checkpoint.save_folder`) and what `load_state_dicts` fills."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(task)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(task, optimizer)
    return state


def load_state_dicts(task: nn.Module, optimizer: Optional[torch.optim.Optimizer], state: Dict[str, Any]) -> None:
    """Put what `state_dicts` returned (filled from a checkpoint) into the task and the optimizer."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(task, state["model"])
    if optimizer is not None and "optimizer" in state:
        set_optimizer_state_dict(task, optimizer, state["optimizer"])


def full_state_dict(task: nn.Module) -> Dict[str, torch.Tensor]:
    """The task's whole state_dict on every rank's CPU (gathered unit by unit): for `Engine.save_weights`-like
    outputs a single process reads."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(task, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


__all__ = ["applies", "call", "evened", "full_state_dict", "gathered", "gradient_sync", "head_units", "is_sharded",
           "load_state_dicts", "parameter_names", "rebind", "shard", "state_dicts"]
