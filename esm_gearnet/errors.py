"""Which errors end a command with their one sentence instead of a traceback (a run writes that sentence into
its log.txt too): errors a user can act on (bad input: exit code 2) and faults of the machine (a rank that
stopped answering, a worker process killed twice: exit code 1). Anything else is a bug and keeps its traceback."""
from __future__ import annotations

from typing import Tuple, Type


class InputError(ValueError):
    """A data file the user gave that cannot be used (a label CSV, an ATOM3D LMDB): its one sentence names the
    file and the line or key. The registry passes it on as it is: the class built from the config that raises it
    is not blamed for its arguments."""


def user_errors() -> Tuple[Type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .data.datasets.download import DownloadError
    from .writing import OutputError

    # ConfigError, StructureError, InputError and the datasets' other refusals are ValueErrors; OutputError: a full
    # disk, a read-only location, another writer
    return ValueError, FileNotFoundError, ImportError, CheckpointError, DownloadError, OutputError


def fault_errors() -> Tuple[Type[BaseException], ...]:
    from .data.parallel import WorkerDied
    from .distributed import StalledError

    return StalledError, WorkerDied
