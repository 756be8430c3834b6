"""Map a function over many jobs in worker processes, in order, with a progress bar."""
from __future__ import annotations

import multiprocessing
import os
from typing import Callable, Iterator, Sequence


def ordered_map(fn: Callable, jobs: Sequence, workers: int = 0, progress: bool = True,
                description: str = "", unit: str = "item") -> Iterator:
    """Yields `fn(job)` for every job in order; `workers` > 1 runs them in that many processes.

    `fn` must be a module-level function (it is sent to the workers) and should catch its own errors, so that
    one bad input never ends a run of thousands.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=description, disable=not progress, unit=unit)
    try:
        if workers and workers > 1 and len(jobs) > 1:
            context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
            with context.Pool(workers) as pool:
                chunk = max(1, min(16, len(jobs) // (4 * workers)))
                for result in pool.imap(fn, jobs, chunksize=chunk):
                    bar.update()
                    yield result
        else:
            for job in jobs:
                result = fn(job)
                bar.update()
                yield result
    finally:
        bar.close()
