"""Independent runs spread over the cores (the demo's scenarios, the paper proxies)."""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator

import torch


def map_on_cores(fn: Callable, jobs: list, workers: int | None = None) -> Iterator:
    """``fn(job)`` for every job, in spawned worker processes (one per core, at most one per job), each on one
    thread: small models gain nothing from more, and a fixed thread count keeps every run reproducible however
    the runs are spread over the workers. Yields the results in job order as they arrive. ``fn`` must be a
    module-level function."""
    workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(1,)) as pool:
        yield from pool.map(fn, jobs)
