"""Checkpoint files: one layout for everything this framework writes, one reader for the original's files.

Every file this framework writes (`last.pth`, `best.pth`, pre-training's `model_epoch_N.pth`) is a dict:

==============  ==================================================================================================
key             meaning
==============  ==================================================================================================
format          `FORMAT`, the layout's name and version
encoder         the encoder's state_dict (what `--ckpt` and `embed` read)
head            the rest of the task's state_dict (prediction heads, normalisation buffers)
config          the rendered config the run was built from (a plain dict): loading never renders a template again
task_names      the dataset's target names (EC numbers, GO terms, ...) in the head's output order; [] if none
epoch           epochs trained when the file was written
training        None, or the state `--resume` needs: optimizer, scheduler, scaler, step, best, metrics, rng,
                world_size and `position` (where a loop other than the epoch count stands, e.g. pre-training)
digest          `digest` of all the other keys, added by `save_atomic`
==============  ==================================================================================================

An ESM with LoRA adapters (`models.esm.lora`) leaves its base weights out of its state_dict, and so out of `encoder`:
the encoder holds the adapters, everything outside the base language model, and (`...lora._extra_state`) the
base weight file's name, size and digest of its first and last MiB, checked when the file is loaded.

Under `engine.strategy: fsdp` the same layout is a folder of every rank's shards (`save_folder`, `load_folder`,
`read_folder`: the section at the end); `load` reads one whole, `locate` finds one in a run directory.

The original wrote bare state_dicts of its model (FusionNetwork, GearNet, GVP-GNN, CDConv); `encoder_state`
reads those too. Files are loaded with `weights_only=True` (no pickled code) and written atomically.

**Digests.** `save_atomic` stores in every dict it writes (checkpoints, the preprocessing caches) a sha256 of
its content: the tensors' dtypes, shapes and bytes and every other value, in order. `load` recomputes it and
refuses a file whose content changed since it was written (flipped bits, a damaged copy). Files without a
digest: the original's bare state_dicts load as before (they never had one); checkpoints of this framework
written before digests (`esm_gearnet.checkpoint/1`) load with a warning that they cannot be verified; any other
file whose `format` names this framework but has no digest is refused (its digest key was damaged).

**Bombs.** Before torch.load, the zip entries of a file (torch's format since 1.6) are read from its central
directory: entries declaring more than `MAX_INFLATION` times the file's size are refused unread (torch stores
tensors uncompressed, so only a crafted file declares more). Files in torch's older pickle format are not zips
and are read as before.

**Building from a file.** A model whose weights come from a file is built inside `skipping_init()` (its
parameters' random fills are skipped: ESM-2 650M spent about 20 s in `uniform_` on 2 cores) and takes the file's
tensors with `load_state_dict_checked(..., assign=True)`, which keeps them instead of copying (memory-mapped
where the file allows), so nothing is initialised twice and the weights exist once at the peak.
"""
from __future__ import annotations

import contextvars
import hashlib
import logging
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import UserError
from .writing import replacing

logger = logging.getLogger("esm_gearnet")
FORMAT = "esm_gearnet.checkpoint/2"  # /2: a digest in every file
LEGACY_FORMATS = ("esm_gearnet.checkpoint/1",)  # this framework's checkpoints before digests: still read
ENCODER_PREFIX = "encoder."


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or cache file that cannot be read, does not fit the model, or cannot be written."""


# ---- digests ------------------------------------------------------------------------------------------------
DIGEST = "digest"
CHUNK = 1 << 20  # a larger tensor is hashed in 1 MiB chunks by parallel threads (hashlib releases the GIL)


def _sha256(data: memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def _outline(value: Any, hasher, pool: ThreadPoolExecutor) -> None:
    """Feeds `hasher` a canonical description of `value`: types, lengths and every non-tensor value, and for a
    tensor its dtype, shape and bytes (for one over `CHUNK` bytes, the sha256 of each chunk instead)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)  # one tensor at a time on the CPU
        data = memoryview(tensor.view(torch.uint8).numpy())
        hasher.update(f"T{tensor.dtype}{tuple(value.shape)};".encode())
        if len(data) <= CHUNK:
            hasher.update(data)
        else:
            for part in pool.map(_sha256, [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]):
                hasher.update(part)
    elif isinstance(value, dict):
        hasher.update(f"D{len(value)};".encode())
        for key, item in value.items():
            _outline(key, hasher, pool)
            _outline(item, hasher, pool)
    elif isinstance(value, (list, tuple)):
        hasher.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)};".encode())
        for item in value:
            _outline(item, hasher, pool)
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        hasher.update(f"S{len(data)};".encode() + data)
    elif isinstance(value, float):
        hasher.update(f"F{value.hex()};".encode())
    else:  # None, bool, int and the few other values weights_only loading admits (torch.dtype, ...)
        hasher.update(f"{type(value).__name__}:{value!r};".encode())


def digest(content: Dict[str, Any]) -> str:
    """The digest of a dict's content (its `digest` key left out): sha256 over a canonical outline of every
    value and the tensors' bytes (see `_outline`). About 0.35 s per GiB of tensors with 2 cores.

    Args:
        content: a dict of tensors, numbers, strings, None and lists, tuples and dicts of them.
    Returns:
        "sha256:<64 hex digits>".
    """
    hasher = hashlib.sha256()
    with ThreadPoolExecutor(min(os.cpu_count() or 1, 16)) as pool:
        _outline({k: v for k, v in content.items() if k != DIGEST}, hasher, pool)
    return "sha256:" + hasher.hexdigest()


# ---- files ----------------------------------------------------------------------------------------------------
def save_atomic(content: Dict[str, Any], path) -> None:
    """torch.save of `content` with its `digest` added, written atomically (`writing.replacing`: a full disk is one
    sentence, and the previous file stays whole); a Ctrl-C meanwhile is raised when the file is in place."""
    from .errors import deferring_ctrl_c

    # a Ctrl-C while the file is made is raised once it is in place (the run resumes from it)
    with deferring_ctrl_c():
        sealed = {k: v for k, v in content.items() if k != DIGEST}
        sealed[DIGEST] = digest(sealed)
        with replacing(path) as temporary, open(temporary, "wb") as handle:
            torch.save(sealed, handle)  # through a file of ours: a full disk is its OSError, not torch's message


CHECKPOINT_ADVICE = ("use another checkpoint of the run (best.pth, last.pth, model_epoch_N.pth) or a fresh copy of "
                     "this one")


def first_line(error: BaseException) -> str:
    """"TypeName: the first line of the message" (at most 200 characters), or the type's name alone."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def present(path, what: str = "checkpoint", advice: str = CHECKPOINT_ADVICE) -> Path:
    """`path`, which must be a file that is not empty (checked without reading it: before a run builds anything).

    Raises:
        CheckpointError: one sentence naming the file and what is wrong with it.
    """
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist; check the path given to --ckpt / --resume.")
    if path.is_dir() and not is_folder(path):
        raise CheckpointError(f"{what} {path} is a directory, not a file or a sharded checkpoint (it holds no "
                              f"{FOLDER_META}); {advice}.")
    if path.is_dir():
        return path
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): it was never written completely; {advice}.")
    return path


# torch.save writes a zip whose entries are stored uncompressed: what they declare adds up to less than the file.
# Past this multiple of the file's size a zip is refused unread (a DEFLATE entry of 1 GiB of zeros takes 1 MiB).
MAX_INFLATION = 4


def _zip_bomb(path: Path) -> str:
    """"" for a file that is not a zip (torch's old pickle format; torch.load judges it) or whose entries declare
    at most `MAX_INFLATION` times the file's size; else what they declare, naming the largest entry."""
    if not zipfile.is_zipfile(path):
        return ""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):  # damaged: torch.load says how, in its sentence
        return ""
    declared = sum(entry.file_size for entry in entries)
    if not entries or declared <= MAX_INFLATION * path.stat().st_size:
        return ""
    largest = max(entries, key=lambda entry: entry.file_size)
    how = "stored" if largest.compress_type == zipfile.ZIP_STORED else "compressed"
    return (f"declares {declared} bytes in its {len(entries)} zip entries ({largest.filename}: {largest.file_size} "
            f"bytes, {how} in {largest.compress_size})")


def load(path, mmap: bool = False, what: str = "checkpoint", advice: str = CHECKPOINT_ADVICE,
         verify: bool = True) -> Dict[str, Any]:
    """A dict saved with torch.save, loaded with `weights_only=True` (tensors, numbers, strings and containers
    only) and checked against its digest (see the module docstring for files without one).

    Args:
        mmap: map the tensors' storage instead of reading it (the preprocessing caches).
        verify: check the digest (`check_resumable` reads only metadata and leaves that to the real load). A
            sharded checkpoint (a folder) is read whole and every shard checked (`read_folder`); with `verify`
            False only its FOLDER_META is read.
        what, advice: the file's kind and what to do, for the error's sentence.
    Raises:
        CheckpointError: one sentence naming the file and what is wrong with it.
    """
    path = present(path, what, advice)
    if path.is_dir():
        return read_folder(path, tensors=verify)

    def refuse(problem: str):
        raise CheckpointError(f"{what} {path} {problem}; {advice}.")

    inflated = _zip_bomb(path)
    if inflated:
        refuse(f"{inflated}, far beyond the file's {path.stat().st_size} bytes (torch stores tensors uncompressed): "
               "a decompression bomb, refused before anything was inflated")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - one sentence for any unreadable file
        refuse(f"cannot be read safely ({first_line(error)}); it may be truncated or damaged, or hold pickled "
               "objects")
    if not isinstance(state, dict):
        refuse(f"holds a {type(state).__name__}, not a dict: neither a checkpoint of this framework nor a "
               "state_dict")
    form = state.get("format")
    if not verify:
        return state
    if isinstance(state.get(DIGEST), str):
        if digest(state) != state[DIGEST]:
            refuse("does not match the digest it was written with: its content changed since (flipped bits, a "
                   "damaged copy)")
    elif form in LEGACY_FORMATS:
        logger.warning("%s %s was written before checkpoints carried a digest (%s): its content cannot be "
                       "verified", what, path, form)
    elif isinstance(form, str) and form.startswith("esm_gearnet."):
        refuse(f"has no digest, which every {form} file carries: the file was altered since it was written")
    return state


def resumable_training(state: Any, path, world_size: int) -> Dict[str, Any]:
    """The `training` state of a loaded checkpoint, if a run of `world_size` processes can continue from it: the
    one rule for which files and which runs can be resumed (`check_resumable` before a run builds anything,
    `Engine.resume` when it loads the file).

    Raises:
        CheckpointError: a file that is not a training checkpoint of this framework, one holding weights only,
            or one written by another number of processes (the RNG streams and data order are per rank), unless
            it trained on streamed data, whose position is a sample of the epoch's order.
    """
    if not is_packed(state):
        raise CheckpointError(f"{path} is not a training checkpoint of this framework; resume needs the last.pth a "
                              "run of this version wrote during training.")
    training = state["training"]
    if training is None:
        raise CheckpointError(f"{path} holds model weights only; resume needs a last.pth written during training "
                              "(use --ckpt to start from weights).")
    # streamed data continues at its sample with any number of processes (`engine.stream`)
    if state.get("sharded") and world_size == 1:
        raise CheckpointError(f"{path} is a sharded checkpoint of {training['world_size']} processes "
                              "(engine.strategy: fsdp); resume it with several processes under torchrun, or start "
                              "from its weights with --ckpt (esm-gearnet consolidate makes one file of it).")
    # a sharded checkpoint (engine.strategy: fsdp) is resharded for any number of processes at an epoch's end
    if training["world_size"] != world_size and not training.get("streamed") and not (
            state.get("sharded") and not training.get("within")):
        inside = " inside an epoch" if state.get("sharded") else ""
        raise CheckpointError(f"{path} was written{inside} by {training['world_size']} process(es) but {world_size} "
                              "run now; resume with the same number.")
    return training


def check_resumable(path, world_size: int) -> None:
    """Refuse, before a run builds its dataset and model, a --resume file that `resumable_training` refuses. The
    file is memory-mapped: its metadata is read, its tensors are not (nor its digest checked: `load` does that
    when the run resumes).

    Raises:
        CheckpointError: see `resumable_training`, and `load`'s sentences for a file that cannot be read.
    """
    path = present(path)
    try:
        state = load(path, mmap=True, verify=False)
    except CheckpointError:  # not a zip (torch's old format cannot be mapped), or refused: load says which
        state = load(path)
    resumable_training(state, path, world_size)


def locate(path, names: Sequence[str] = ("best.pth", "last.pth")) -> Path:
    """The checkpoint a path names: the file itself, or the first of `names` in a run directory.

    Raises:
        CheckpointError: a directory holding none of `names`, naming what it lacks (and the .pth it holds).
    """
    path = Path(os.path.expanduser(str(path)))
    if not path.is_dir() or is_folder(path):
        return path
    for name in names:
        if (path / name).is_file() or is_folder(path / name):
            return path / name
        if is_folder(path / f".{name}.old"):  # a run killed while it put a new sharded checkpoint in place
            return path / f".{name}.old"
    files = sorted(p.name for p in path.glob("*.pth"))
    held = f" (it holds {', '.join(files[:6])}{' ...' if len(files) > 6 else ''})" if files else ""
    raise CheckpointError(f"the directory {path} holds no {' or '.join(names)}{held}; pass a run directory that "
                          "has one (a run writes them after its first epoch) or a checkpoint file.")


def pack(task: Optional[nn.Module], config: Dict[str, Any], task_names: Sequence[str] = (), epoch: int = 0,
         training: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The checkpoint of a task (its `encoder` and the rest, the head) in this framework's layout; with `task`
    None, the layout without them (a sharded checkpoint's FOLDER_META)."""
    state = task.state_dict() if task is not None else {}
    return {"format": FORMAT,
            "encoder": {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)},
            "head": {k: v for k, v in state.items() if not k.startswith(ENCODER_PREFIX)},
            "config": config, "task_names": [str(t) for t in task_names], "epoch": epoch, "training": training}


def is_packed(checkpoint: Any) -> bool:
    """A checkpoint in this framework's layout (this version's or an earlier one's)."""
    return isinstance(checkpoint, dict) and checkpoint.get("format") in (FORMAT, *LEGACY_FORMATS)


def task_state(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The task's state_dict of a packed checkpoint (encoder entries under `encoder.`, then the head)."""
    return {**{ENCODER_PREFIX + k: v for k, v in checkpoint["encoder"].items()}, **checkpoint["head"]}


def _describe(checkpoint: Any) -> str:
    if not isinstance(checkpoint, dict):
        return f"a {type(checkpoint).__name__}"
    keys = list(checkpoint)
    shown = ", ".join(map(str, keys[:8])) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
    return f"the keys {shown}" if keys else "an empty dict"


# The original's GVP vector dropout owned `dummy_param = nn.Parameter(torch.empty(0))` (to find its device), so
# every GVP-GNN state_dict it wrote holds `layers.{i}.dropout.{0,1}.vdropout.dummy_param`.
LEGACY_DROPPED_SUFFIXES = ("vdropout.dummy_param",)


def encoder_state(checkpoint: Any, source: str) -> Dict[str, torch.Tensor]:
    """The encoder's state_dict in a checkpoint: this framework's layout, or the original's bare state_dict of
    its model (FusionNetwork, GearNet, GVP-GNN, CDConv).

    DEVIATION: the original's GVP-GNN state_dicts carry empty `...vdropout.dummy_param` tensors (a device probe of
    its dropout, no weight); they are accepted and dropped here, since this GVP dropout needs no such parameter.

    Raises:
        CheckpointError: the file holds neither, naming what it holds.
    """
    if is_packed(checkpoint):
        return checkpoint["encoder"]
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return {k: v for k, v in checkpoint.items()
                if not (k.endswith(LEGACY_DROPPED_SUFFIXES) and v.numel() == 0)}
    raise CheckpointError(f"{source} holds {_describe(checkpoint)}, which is neither a checkpoint of this "
                          "framework nor a bare state_dict of an encoder (the original's released .pth files); "
                          "pass a run directory, its best.pth/last.pth, a model_epoch_N.pth or such a state_dict.")


# the in-place random and constant fills of `torch.nn.init` and the modules' `reset_parameters`
_INIT_FILLS = frozenset({"uniform_", "normal_", "zero_", "fill_", "random_", "exponential_", "bernoulli_",
                         "log_normal_", "cauchy_", "geometric_"})


class _SkippingInit(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes its tensor by name
        if isinstance(target, nn.Parameter) and getattr(func, "__name__", "").endswith("_") and (
                func.__name__ in _INIT_FILLS or getattr(func, "__module__", None) == "torch.nn.init"):
            return target
        return func(*args, **kwargs)


@contextmanager
def skipping_init():
    """Modules built inside start with uninitialised parameters: their random and constant fills are skipped
    (buffers are filled as usual). For parameters a state dict then replaces (`load_state_dict_checked(...,
    assign=True)`, whose strict check makes sure none is left uninitialised); no random number is drawn for them."""
    with _SkippingInit():
        yield


def _tied(module: nn.Module):
    """[[names of one shared parameter], ...] for parameters the module holds under several names."""
    names: Dict[int, list] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return [group for group in names.values() if len(group) > 1]


_KEEP_DTYPES = contextvars.ContextVar("keep_dtypes", default=False)


@contextmanager
def keeping_dtypes():
    """Modules that take a state's tensors inside (`load_state_dict_checked(..., assign=True)`) keep the tensors'
    own dtypes (fair-esm's 3B and 15B files hold fp16) instead of casting them all at once: under
    `engine.strategy: fsdp` each unit is cast to fp32 just before it is sharded (`sharding.shard`), so a model
    larger than a process's memory never exists whole in fp32."""
    token = _KEEP_DTYPES.set(True)
    try:
        yield
    finally:
        _KEEP_DTYPES.reset(token)


def load_state_dict_checked(module: nn.Module, state: Dict[str, torch.Tensor], source: str,
                            assign: bool = False) -> None:
    """`module.load_state_dict(state)` that lists missing, unexpected and mis-shaped keys in its error.

    With `assign`, the module takes the state's tensors themselves (cast to its own dtypes where they differ, as a
    copy would be; on the state's device) instead of copying them into its parameters: for a module built in
    `skipping_init`. Parameters shared under several names (fair-esm's `lm_head.weight` is the token embedding)
    stay shared. The module's parameter objects change: build optimizers after."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                 if k in state and torch.is_tensor(own[k]) and tuple(state[k].shape) != tuple(own[k].shape)]
    # the ESM wrapper checks and drops the original's `mapping` buffer itself
    unexpected = [k for k in unexpected if not k.endswith("sequence_model.mapping") and k != "mapping"]
    if missing or unexpected or misshaped:
        for name, part in module.named_modules():  # a part that can say in one sentence why the state is not its
            mismatch = getattr(part, "checkpoint_mismatch", None)
            sentence = mismatch(state, name + "." if name else "") if mismatch is not None else None
            if sentence:
                raise CheckpointError(f"{source} {sentence}")

        def show(keys):
            return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "") if keys else "none"
        vocabulary = [f" The language models' vocabularies differ: {state[k].shape[0]} tokens in the checkpoint, "
                      f"{own[k].shape[0]} in the model (ESM-2 has 33, SaProt 446)." for k in own
                      if k.endswith("embed_tokens.weight") and k in state and state[k].shape[0] != own[k].shape[0]]
        raise CheckpointError(f"{source} does not fit {type(module).__name__}: missing keys: {show(missing)}; "
                              f"unexpected keys: {show(unexpected)}; mis-shaped keys (checkpoint vs model): "
                              f"{show(misshaped)}.{''.join(vocabulary[:1])} Check that the config builds the model "
                              "the checkpoint was saved from.")
    if not assign:
        module.load_state_dict(state)
        return
    own = module.state_dict()
    if not _KEEP_DTYPES.get():  # (LoRA's extra state is no tensor)
        state = {k: v.to(own[k].dtype) if k in own and torch.is_tensor(v) and v.dtype != own[k].dtype
                 and v.is_floating_point() else v for k, v in state.items()}
    tied = _tied(module)
    module.load_state_dict(state, assign=True)
    for first, *others in tied:
        shared = module.get_parameter(first)
        for name in others:
            owner, _, attribute = name.rpartition(".")
            setattr(module.get_submodule(owner), attribute, shared)


# ---- sharded checkpoints (engine.strategy: fsdp) -------------------------------------------------------------
# A folder in place of the file: every rank's shards of the task's and the optimizer's tensors
# (`torch.distributed.checkpoint`: `.metadata` and `__RANK_0.distcp`), and FOLDER_META, the rest of the layout above
# (config, task_names, epoch, training without the optimizer) with `sharded` = {"world_size", "files": {name:
# [size, sha256]}} and its own digest. Every file is checked against its size and sha256 before anything is loaded.
FOLDER_META = "meta.pth"


def is_folder(path) -> bool:
    """Whether `path` is a sharded checkpoint (a folder holding FOLDER_META)."""
    return Path(path).is_dir() and (Path(path) / FOLDER_META).is_file()


def file_hexdigest(path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes (`hashlib`'s `algorithm`), read in CHUNK blocks: the shards of a sharded
    checkpoint here, downloaded archives' md5 (`data.datasets.download`)."""
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            hasher.update(block)
    return hasher.hexdigest()


def save_folder(tensors: Dict[str, Any], content: Dict[str, Any], path) -> None:
    """Every rank writes its shards of `tensors` (`sharding.state_dicts`) into a temporary folder beside `path`, in
    parallel, and hashes them; after a barrier rank 0 writes FOLDER_META (`content` and every file's size and
    sha256) and puts the folder in place of `path`. A Ctrl-C meanwhile is raised once the folder is in place.

    Args:
        content: the checkpoint's layout without its tensors (`encoder`, `head` and the optimizer's state are in the
            shards).
    """
    import shutil

    import torch.distributed.checkpoint as dcp

    from . import distributed
    from .errors import deferring_ctrl_c

    path = Path(path)
    temporary, old = path.parent / f".{path.name}.writing", path.parent / f".{path.name}.old"
    rank = distributed.rank()
    with deferring_ctrl_c():
        if rank == 0:
            shutil.rmtree(temporary, ignore_errors=True)
        distributed.barrier()
        try:
            dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(temporary), sync_files=True))
        except dcp.api.CheckpointException as error:  # the rank's own failure (a full disk: its OSError)
            raise rank_failure(error) from None
        own = [f for f in temporary.iterdir() if f.name.startswith(f"__{rank}_")] + (
            [temporary / ".metadata"] if rank == 0 else [])
        files = {}
        for part in distributed.gather_objects({f.name: [f.stat().st_size, file_hexdigest(f)] for f in own}):
            files.update(part)
        if rank == 0:
            save_atomic({**content, "sharded": {"world_size": distributed.world_size(), "files": files}},
                        temporary / FOLDER_META)
            if path.exists():  # the previous checkpoint stays readable (`locate`) until the new one is in place
                shutil.rmtree(old, ignore_errors=True)
                path.rename(old)
            temporary.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()


def rank_failure(error: BaseException) -> BaseException:
    """The exception of the first rank that failed inside a `torch.distributed.checkpoint` call (which gathers
    them into one `CheckpointException`, a BaseException); any other error as it is."""
    failures = getattr(error, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return error
    first = next(iter(failures.values()))  # (the exception, its traceback)
    return first[0] if isinstance(first, tuple) else first


def folder_problem(path, share: Optional[Sequence[int]] = None) -> str:
    """"" when every shard file of the sharded checkpoint `path` that FOLDER_META lists is there with its size and
    sha256, else what is wrong with the first that is not (missing, truncated, or of another checkpoint).

    Args:
        share: (rank, world size): check only every world-size-th file from the rank-th (ranks share the hashing).
    """
    meta = load(Path(path) / FOLDER_META)
    files = sorted(meta["sharded"]["files"].items())
    rank, size = share or (0, 1)
    for name, (expected_size, expected_sha) in files[rank::size]:
        file = Path(path) / name
        if not file.is_file():
            return (f"lacks {name}, written by one of the {meta['sharded']['world_size']} ranks that saved it (a "
                    "rank's shard is missing)")
        if file.stat().st_size != expected_size:
            return f"holds {name} of {file.stat().st_size} bytes where {expected_size} were written (truncated)"
        if file_hexdigest(file) != expected_sha:
            return f"holds {name} whose content differs from what was written (a shard of another checkpoint?)"
    return ""


def _refuse_damaged(path: Path, problems: Sequence[str]) -> None:
    problems = [problem for problem in problems if problem]
    if problems:
        raise CheckpointError(f"sharded checkpoint {path} {problems[0]}; nothing was loaded: {CHECKPOINT_ADVICE}.")


def load_folder(tensors: Dict[str, Any], path) -> None:
    """Every rank fills `tensors` (`sharding.state_dicts` of its sharded task) from the sharded checkpoint `path`,
    resharded for this number of processes, after every file was checked (the ranks share the hashing).

    Raises:
        CheckpointError: one sentence on every rank: a missing, truncated or foreign shard (nothing loaded), or a
            checkpoint of another model (keys or shapes differ).
    """
    import torch.distributed.checkpoint as dcp

    from . import distributed

    path = Path(path)
    share = (distributed.rank(), distributed.world_size())
    _refuse_damaged(path, distributed.gather_objects(folder_problem(path, share)))
    try:
        dcp.load(tensors, storage_reader=dcp.FileSystemReader(str(path)))
    except (Exception, dcp.api.CheckpointException) as error:  # noqa: BLE001 - another model's: keys, shapes
        raise CheckpointError(f"sharded checkpoint {path} does not fit this run's model "
                              f"({first_line(rank_failure(error))}); check that the config builds the model the "
                              "checkpoint was saved from.") from None


def read_folder(path, tensors: bool = True) -> Dict[str, Any]:
    """A sharded checkpoint as one checkpoint of this framework's layout, in this process (no process group): what
    `embed`, `predict`, `--ckpt` and `consolidate` read. Every shard is checked first (`folder_problem`).

    Args:
        tensors: read the weights (`encoder`, `head`); False reads FOLDER_META only (for `check_resumable`).
    Raises:
        CheckpointError: one sentence naming the folder and the file that is wrong; nothing is loaded.
    """
    path = Path(path)
    state = load(path / FOLDER_META)
    if not tensors:
        return state
    _refuse_damaged(path, [folder_problem(path)])
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    whole: Dict[str, Any] = {}
    _load_state_dict(whole, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    model = whole["model"]
    return {**state, "encoder": {k[len(ENCODER_PREFIX):]: v for k, v in model.items() if k.startswith(ENCODER_PREFIX)},
            "head": {k: v for k, v in model.items() if not k.startswith(ENCODER_PREFIX)}}
