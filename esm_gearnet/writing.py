"""Writing outputs: every whole file through one atomic writer, logs a flushed record at a time, one lock per
output, and the output's location checked before any work.

==================  ===========================================================================================
function            what it does
==================  ===========================================================================================
`replacing(path)`   a temporary file `.NAME.PID@HOST.xxxxxxxx` beside `path`; when the block ends it is flushed
                    to the disk (fsync), given the mode a new file gets under the umask, and renamed over `path`
                    (then the folder is synced). A killed or failed writer leaves the previous file whole; a
                    killed one leaves its temporary file, which `remove_leftovers` removes later.
`write_atomic`      `replacing` for bytes or text already in memory; `write_skipped`, the `OUT.skipped.tsv` of
                    the inputs a command reported and skipped (its rows: `skipped_rows`)
`append_line`       one record appended to a log (`metrics.jsonl`, `log.txt`) and flushed; a crash tears at most
                    the last record, which the readers skip, naming it
`writable(path)`    a test write where `path` goes (and, given a size, the free space): the location is refused
                    before the work, not after it. On this project's machines the tests run as root, where permission
                    bits stop nothing: only a real write says whether a location takes files
`output_lock(path)` `filelock` on `.NAME.lock` beside a file, `.lock` inside a folder: a second command writing
                    the same output is refused in one sentence; `wait=True` waits for the first instead (a dataset cache that two runs build). The locks are
                    advisory: processes of this framework respect them, and on network file systems (NFS, SMB)
                    they hold only where the file system implements `flock`
==================  ===========================================================================================

A write that the machine refuses (a full disk, a read-only file system, a quota) ends in `OutputError`: one
sentence naming the path and what to do, exit code 2; the file that was there before is left as it was.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Union

from .errors import UserError

logger = logging.getLogger("esm_gearnet")


class OutputError(UserError, RuntimeError):
    """An output that cannot be written (full disk, read-only location, another writer): one sentence naming
    the path and what to do."""


# ---- what the machine said, as one sentence ------------------------------------------------------------------
_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def refusal(path, error: OSError) -> OutputError:
    """The sentence for an `OSError` raised while writing `path` (the previous file there is intact)."""
    if error.errno in _FULL:
        what = "quota" if error.errno == errno.EDQUOT else "disk"
        return OutputError(f"cannot write {path}: the {what} holding it is full ({error.strerror}); free space in "
                           f"{Path(path).parent} (or choose another location) and run the command again; the "
                           "files already there are intact.")
    if error.errno in _READ_ONLY:
        return OutputError(f"cannot write {path}: its location is read-only or not writable ({error.strerror}); "
                           "choose a writable location for the output.")
    return OutputError(f"cannot write {path} ({error.strerror or error}); check the location and run the command "
                       "again; the files already there are intact.")


def _mode() -> int:
    """The mode a new file gets under this process's umask (mkstemp's files are 0600 whatever the umask). Read
    from /proc where it can be: setting the umask to ask for it would change it for every thread meanwhile."""
    try:
        with open("/proc/self/status") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):  # not Linux: ask, at the cost of a moment under umask 077
        umask = os.umask(0o077)
        os.umask(umask)
    return 0o666 & ~umask


def _machine_refused(error: BaseException) -> Optional[OSError]:
    """The OSError of a full disk or read-only location that `error` is, or was raised from (torch.save reports
    a full disk as a RuntimeError of its zip writer, raised while handling the ENOSPC of the file it writes)."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError) and error.errno in _FULL + _READ_ONLY:
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def _sync(handle) -> None:
    """Flush a file handle to the disk (a fault test injects ENOSPC here)."""
    handle.flush()
    os.fsync(handle.fileno())


def _sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform allows opening a folder)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# ---- temporary files and their leftovers ---------------------------------------------------------------------
def _temporary_prefix(path: Path) -> str:
    """`.NAME.PID@HOST.`: a temporary file beside NAME, named after its writer (see `remove_leftovers`)."""
    return f".{path.name}.{os.getpid()}@{socket.gethostname()}."


# `.NAME.PID@HOST.xxxxxxxx` (mkstemp's 8 characters); `.NAME.xxxxxxxx` from versions without PID@HOST
_TEMPORARY = re.compile(r"\.(?P<name>.+?)\.(?:(?P<pid>\d+)@(?P<host>.+)\.)?[a-z0-9_]{8}")


def _writer_is_gone(pid: Optional[str], host: Optional[str]) -> bool:
    if pid is None:  # an older version's temporary file
        return True
    if host != socket.gethostname():
        return False  # a process of another machine sharing this folder: it cannot be asked
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, another user's
        pass
    return False


def remove_leftovers(path) -> List[Path]:
    """Removes the temporary files that `replacing` left when its process was killed: those beside the file
    `path`, or every one in the folder `path`, whose writer no longer runs (`.NAME.PID@HOST.xxxxxxxx`; of the
    older `.NAME.xxxxxxxx`, without a writer's name, those of checkpoints: `.pth`, `.pt`).

    Returns:
        the files removed.
    """
    path = Path(path)
    folder, name = (path, None) if path.is_dir() else (path.parent, path.name)
    removed = []
    for candidate in folder.glob(f".{name or '*'}.*"):
        match = _TEMPORARY.fullmatch(candidate.name)
        ours = match and (match["name"] == name if name else
                          match["pid"] is not None or match["name"].endswith((".pth", ".pt")))
        if ours and candidate.is_file() and _writer_is_gone(match["pid"], match["host"]):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    if removed:
        logger.info("removed %d temporary file(s) left by a killed writer: %s", len(removed),
                    ", ".join(str(p) for p in removed))
    return removed


# ---- whole files ---------------------------------------------------------------------------------------------
@contextmanager
def replacing(path) -> Iterator[Path]:
    """A temporary file beside `path` for the block to write; when the block ends it is synced to the disk,
    given the umask's mode and renamed over `path`. If the block or the write raises, the temporary file is
    removed and `path` is left as it was.

    Raises:
        OutputError: the machine refused the write (full disk, read-only location), naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=_temporary_prefix(path), dir=path.parent)
        os.close(handle)
    except OSError as error:
        raise refusal(path, error) from None
    temporary = Path(temporary)
    try:
        yield temporary
    except BaseException as error:  # the block's own errors pass as they are, but for a refused write
        temporary.unlink(missing_ok=True)
        refused = _machine_refused(error)
        if refused is not None:
            raise refusal(path, refused) from None
        raise
    try:
        with open(temporary, "rb+") as written:
            _sync(written)
        os.chmod(temporary, _mode())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise refusal(path, error) from None
    _sync_folder(path.parent)


def write_atomic(path, content: Union[bytes, str]) -> None:
    """`content` (text is written as UTF-8) as the whole of `path`, atomically (see `replacing`)."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    with replacing(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(data)
            _sync(handle)


def skipped_rows(skipped) -> bytes:
    """The content of a skipped report: one `input<TAB>reason` row per skipped input. A tab or line break in a
    name or reason becomes a space (it would split the row); a file name that is not UTF-8 keeps its bytes."""
    def cell(text) -> str:
        return re.sub(r"[\t\r\n]", " ", str(text))

    rows = "".join(f"{cell(name)}\t{cell(reason)}\n" for name, reason in skipped)
    return rows.encode("utf-8", "surrogateescape")


def write_skipped(output, skipped) -> Path:
    """`OUTPUT.skipped.tsv`: `skipped_rows` (an empty file when none was). Returns the report's path."""
    report = Path(output).with_name(Path(output).name + ".skipped.tsv")
    write_atomic(report, skipped_rows(skipped))
    return report


# ---- logs ----------------------------------------------------------------------------------------------------
def append_line(path, line: str) -> None:
    """`line` (a newline is added) appended to the log `path` and flushed to the disk: a crash tears at most
    this record.

    Raises:
        OutputError: the machine refused the write, naming `path`.
    """
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line.rstrip("\n") + "\n")
            _sync(handle)
    except OSError as error:
        raise refusal(path, error) from None


# ---- before the work -----------------------------------------------------------------------------------------
def writable(path, need_bytes: int = 0) -> Path:
    """`path` if a file can be written there: a test file is written and removed in its folder (or, where that
    does not exist yet, in the nearest folder above it that does: nothing is made), and the free space there is
    compared with `need_bytes` (an estimate of the output's size).

    Raises:
        OutputError: one sentence naming `path` and what to do.
    """
    path = Path(os.path.expanduser(str(path)))
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        handle, probe = tempfile.mkstemp(prefix=_temporary_prefix(path), dir=folder)
        try:
            with open(handle, "wb") as written:
                written.write(b"0")
                _sync(written)
        finally:
            os.unlink(probe)
    except OSError as error:
        raise refusal(path, error) from None
    free = shutil.disk_usage(folder).free
    if need_bytes > free:
        raise OutputError(f"cannot write {path}: it needs about {need_bytes / 2**20:.0f} MiB and the disk holding "
                          f"it has {free / 2**20:.0f} MiB free; free space in {folder} or choose another location.")
    return path


@contextmanager
def output_lock(path, wait: bool = False, what: str = "output") -> Iterator[None]:
    """Holds the advisory lock `.NAME.lock` beside the file `path` (in a folder: `FOLDER/.lock`) while the block
    runs. The empty lock file stays when the block ends: removing it would let a process that opened it meanwhile
    hold a lock on a file that no longer exists, beside a newcomer holding one on a new file.

    Args:
        wait: wait for another holder (saying so) instead of refusing.
    Raises:
        OutputError: `wait=False` and another process holds the lock.
    """
    import filelock

    path = Path(os.path.expanduser(str(path)))
    lock_file = path / ".lock" if path.is_dir() else path.with_name(f".{path.name}.lock")
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise refusal(lock_file, error) from None
    lock = filelock.FileLock(str(lock_file), mode=_mode())
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        if not wait:
            raise OutputError(f"another command is writing the {what} {path} (it holds {lock_file}); wait for it to "
                              f"finish, or write elsewhere.") from None
        logger.info("another process is writing %s; waiting for it to finish", path)
        lock.acquire()
    except OSError as error:
        raise refusal(lock_file, error) from None
    try:
        yield
    finally:
        lock.release()


__all__ = ["OutputError", "append_line", "output_lock", "refusal", "remove_leftovers", "replacing", "writable",
           "skipped_rows", "write_atomic", "write_skipped"]
