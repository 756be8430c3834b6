"""Which errors end a command with their one sentence instead of a traceback (a run writes that sentence into
its log.txt too): errors a user can act on (bad input, a run that cannot learn: exit code 2), faults of the
machine (a rank that stopped answering, a worker process killed twice: exit code 1) and an interrupted run
(Ctrl-C: exit code 130, the shell's 128 + SIGINT). Anything else is a bug and keeps its traceback."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Tuple, Type

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a command ended by Ctrl-C


class Interrupted(Exception):
    """A run ended by Ctrl-C (SIGINT); its sentence says how to continue it."""


@contextmanager
def ignoring_ctrl_c():
    """SIGINT ignored inside the block, then handled as before: the clean-up after a first Ctrl-C is not broken
    off by a second (the terminal's and torchrun's both reach a rank). Only the main thread can set signals;
    elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def deferring_ctrl_c():
    """Ctrl-C (SIGINT) held back inside the block and raised as KeyboardInterrupt when it ends: a write that must
    not be broken off (torch.save of a checkpoint: interrupted inside its zip writer it raised a RuntimeError of
    its own, and the command a traceback instead of its one line) finishes first. Only the main thread can set
    signals; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


class UserError(Exception):
    """Base of the errors a user can act on that are not ValueErrors (a checkpoint, a download, an output, a run
    that cannot learn): each module's own class derives from it, so this module needs none of them."""


class MachineFault(Exception):
    """Base of the faults of the machine (a rank that stopped answering, a worker process killed twice)."""


class InputError(ValueError):
    """A data file the user gave that cannot be used (a label CSV, an ATOM3D LMDB): its one sentence names the
    file and the line or key. The registry passes it on as it is: the class built from the config that raises it
    is not blamed for its arguments."""


def user_errors() -> Tuple[Type[BaseException], ...]:
    # ConfigError, StructureError, InputError and the datasets' other refusals are ValueErrors; UserError:
    # checkpoint.CheckpointError, download.DownloadError, writing.OutputError (a full disk, a read-only location,
    # another writer), stepper.CannotLearn (a non-finite loss)
    return ValueError, FileNotFoundError, ImportError, UserError


def fault_errors() -> Tuple[Type[BaseException], ...]:
    return (MachineFault,)  # distributed.StalledError, parallel.WorkerDied
