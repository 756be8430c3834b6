"""Which errors a user can act on: the commands end them with their one sentence and exit code 2, and a run
writes that sentence (not a traceback) into its log.txt. Anything else is a bug and keeps its traceback."""
from __future__ import annotations

from typing import Tuple, Type


def user_errors() -> Tuple[Type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .data.datasets.download import DownloadError

    # ConfigError, StructureError and the datasets' refusals are ValueErrors
    return ValueError, FileNotFoundError, ImportError, CheckpointError, DownloadError
