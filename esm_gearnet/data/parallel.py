"""Map a function over many jobs in worker processes, in order, with a progress bar; a worker that dies (the OOM
killer, a crash in C code) costs the job it held, never the run and never a hang.

A worker ends when its parent dies, however it dies (kill -9 of `embed`, SIGTERM of a dataset build): otherwise it
would go on parsing under PID 1, holding its memory. On Linux every worker asks the kernel for SIGKILL at its
parent's death (prctl PR_SET_PDEATHSIG, through ctypes), then checks that the parent it was forked from is still
its parent (a parent that died before the request would otherwise go unnoticed). Where prctl is unavailable
(macOS, other systems), a daemon thread in the worker polls the parent's pid every PARENT_POLL seconds and ends
the worker when it changes (`_end_with_parent`). The kernel's signal follows the thread that forked the worker,
so `ordered_map` must be iterated in a thread that outlives it (every caller here uses the main thread).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from typing import Any, Callable, Iterator, List, Optional, Sequence

from ..errors import MachineFault

logger = logging.getLogger("esm_gearnet")
PARENT_POLL = 1.0  # seconds between a worker's looks at its parent, where prctl is unavailable
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class WorkerDied(MachineFault, RuntimeError):
    """A job in progress when a worker died, run again alone in a fresh process, killed that one too (and no
    `on_death` was given)."""


def ordered_map(fn: Callable, jobs: Sequence, workers: int = 0, progress: bool = True, description: str = "",
                unit: str = "item", on_death: Optional[Callable[[Any, str], Any]] = None,
                isolated: bool = False) -> Iterator:
    """Yields `fn(job)` for every job, in order; `workers` > 1 runs them in that many processes.

    When a worker process dies, the jobs in progress are run again one at a time, each in a fresh process; a job
    whose process dies again yields `on_death(job, how)` instead of its result, `how` being the signal or exit
    code ("SIGKILL", "exit code 1"). In this process (`workers` <= 1, or a single job) there is nothing to
    survive, unless `isolated`.

    Args:
        fn: a module-level function (it is sent to the workers) that catches its own errors, so that one bad
            input never ends a run of thousands (an exception it raises ends the map).
        jobs: its arguments.
        workers: processes; 0 or 1 runs every job in this process.
        progress, description, unit: the tqdm progress bar.
        on_death: what to yield for a job whose fresh process died too; by default `WorkerDied` is raised.
        isolated: run the jobs in worker processes whatever `workers` (at least one) and their number, so that a
            crash in C code (a library's segmentation fault) costs only its job, never this process.
    Returns:
        An iterator over the results, in the order of `jobs`.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=description, disable=not progress, unit=unit)
    parallel = isolated or (workers and workers > 1 and len(jobs) > 1)
    results = _in_workers(fn, jobs, max(workers or 0, 1), on_death) if parallel else (fn(job) for job in jobs)
    with bar, closing(results):
        for result in results:
            bar.update()
            yield result


def _in_workers(fn: Callable, jobs: Sequence, workers: int, on_death) -> Iterator:
    """`fn` over chunks of jobs in a process pool, at most 2 chunks per worker in flight."""
    context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    size = max(1, min(16, len(jobs) // (4 * workers)))
    chunks = [list(jobs[i:i + size]) for i in range(0, len(jobs), size)]
    in_flight: deque = deque()  # (chunk, future), in order
    submitted, pool = 0, None
    try:
        while in_flight or submitted < len(chunks):
            pool = pool or ProcessPoolExecutor(workers, mp_context=context, initializer=_end_with_parent,
                                               initargs=(os.getpid(),))
            try:
                while submitted < len(chunks) and len(in_flight) < 2 * workers:
                    in_flight.append((chunks[submitted], pool.submit(_run_chunk, fn, chunks[submitted])))
                    submitted += 1
            except BrokenProcessPool:  # a worker died since the last results came back: the chunks below say
                if not in_flight:  # it held none
                    pool.shutdown(wait=True)
                    pool = None
                    continue
            chunk, future = in_flight.popleft()
            results = _results(future)
            if results is not None:
                yield from results
                continue
            # a worker died: every chunk not finished before it may have been its; each of their jobs once more,
            # alone in a fresh process
            pool.shutdown(wait=True, cancel_futures=True)
            pool = None
            held = [(chunk, None)] + [(c, _results(f)) for c, f in in_flight]
            in_flight.clear()
            logger.warning("a worker process died; the %d job(s) in progress run again one at a time, each in a "
                           "fresh process", sum(len(c) for c, r in held if r is None))
            for chunk, results in held:
                if results is not None:
                    yield from results
                else:
                    for job in chunk:
                        yield _alone(fn, job, context, on_death)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _run_chunk(fn: Callable, chunk: List) -> List:
    return [fn(job) for job in chunk]


def _results(future) -> Optional[List]:
    """The chunk's results, or None when its pool broke before it finished (an exception of `fn` is raised)."""
    try:
        return future.result()
    except (BrokenProcessPool, CancelledError):
        return None


def _alone(fn: Callable, job, context, on_death):
    """`fn(job)` computed in a fresh process; `on_death(job, how)` when that process dies too."""
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_send, args=(fn, job, send, os.getpid()), daemon=True)
    process.start()
    send.close()
    try:
        ok, result = receive.recv()
    except EOFError:  # the process ended without sending: it died
        process.join()
        code = process.exitcode
        how = signal.Signals(-code).name if code is not None and code < 0 else f"exit code {code}"
        if on_death is None:
            raise WorkerDied(f"a worker process died ({how}) while working on {job!r}, run again alone in a fresh "
                             "process after a first worker died with it in progress; find what kills it (out of "
                             "memory: fewer workers or more memory) or leave that input out.") from None
        return on_death(job, how)
    finally:
        receive.close()
    process.join()
    if not ok:
        raise result  # fn's own exception, as the pool would raise it
    return result


def _send(fn: Callable, job, send, parent: int) -> None:
    """(True, fn(job)) or (False, the exception it raised) through `send`; ends if `parent` dies."""
    _end_with_parent(parent)
    try:
        reply = True, fn(job)
    except Exception as error:  # noqa: BLE001 - handed to the parent
        reply = False, error
    send.send(reply)
    send.close()


def _end_with_parent(parent: int) -> None:
    """Run in a worker as it starts: this process is killed when `parent` (the pid that started it) dies."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            watched = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            watched = False
        if watched:
            if os.getppid() != parent:  # the parent died before the request: nothing will signal its death
                os._exit(1)
            return
    threading.Thread(target=_watch_parent, args=(parent,), name="watch-parent", daemon=True).start()


def _watch_parent(parent: int) -> None:
    """Where prctl is unavailable: end this process once its parent is no longer `parent` (it died; the
    orphan was adopted by PID 1 or a subreaper)."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL)
    os._exit(1)
