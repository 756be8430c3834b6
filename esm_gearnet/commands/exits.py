"""How a command ends: an error a user can act on is its one sentence and exit code 2, a fault of the machine
its sentence and exit code 1, Ctrl-C one line and exit code 130, a reader of its output that left early
(`... --help | head`) nothing more and exit code 0 (`one_sentence`)."""
from __future__ import annotations

import functools
import sys
from typing import List, Optional


def one_sentence(main):
    """Errors a user can act on (a bad path, config or checkpoint, a run that cannot learn) end the command with
    their one sentence and exit code 2, faults of the machine (`errors.fault_errors`) with theirs and exit code 1,
    Ctrl-C with one line ("interrupted; resume with --resume RUN" for a run) and exit code 130."""
    @functools.wraps(main)
    def wrapper(argv: Optional[List[str]] = None) -> int:
        from ..errors import INTERRUPTED_EXIT_CODE, Interrupted, fault_errors, ignoring_ctrl_c, user_errors

        try:
            return main(argv)
        except BrokenPipeError:  # `script/pretrain.py --help | head`: the reader left; say nothing more
            return reader_left()
        except user_errors() as error:
            _tell(error)
            return 2
        except fault_errors() as error:
            _tell(error, every_rank=True)
            from ..distributed import StalledError

            if isinstance(error, StalledError):
                # a rank that stopped answering still belongs to the process group, and tearing the group down
                # (also at interpreter exit) can wait for it forever: end this process now
                _end_process(1)
            return 1
        except (Interrupted, KeyboardInterrupt) as error:
            with ignoring_ctrl_c():
                print(str(error) if isinstance(error, Interrupted) else "interrupted", file=sys.stderr)
                # a peer rank may be inside a collective this one left: end now rather than tear the group down
                _end_process(INTERRUPTED_EXIT_CODE, only_in_a_group=True)
            return INTERRUPTED_EXIT_CODE
    return wrapper


def reader_left() -> int:
    """Exit code 0 after the reader of stdout left (a closed pipe), with stdout pointed at /dev/null so that
    Python's flush at exit raises no second BrokenPipeError (Python's own advice)."""
    import os

    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _tell(error: BaseException, every_rank: bool = False) -> None:
    """The error's one sentence on stderr, and under torchrun into its error file, so that its failure summary
    names it as the root cause. Under torchrun only rank 0 prints (every rank meets a config's or a file's error
    alike: one sentence, not one per process) unless `every_rank`; a rank that alone fails is still named by the
    summary."""
    import json
    import os
    import time

    if every_rank or int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {error}", file=sys.stderr)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        record = {"message": {"message": f"{type(error).__name__}: {error}",
                              "extraInfo": {"py_callstack": f"error: {error}", "timestamp": str(int(time.time()))}}}
        try:
            with open(path, "w") as handle:
                json.dump(record, handle)
        except OSError:
            pass


def _end_process(code: int, only_in_a_group: bool = False) -> None:
    """End this process at once with `code` (logs flushed, no interpreter clean-up that could wait for a peer);
    with `only_in_a_group`, only when a process group is joined (a single process returns normally)."""
    import logging
    import os

    dist = sys.modules.get("torch.distributed")  # not imported: no group joined (and no torch import to end)
    if only_in_a_group and (dist is None or not dist.is_initialized()):
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
