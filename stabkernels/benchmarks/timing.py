"""Side-by-side timing: candidates run interleaved, round after round, so drifts in clock speed, cache or
memory state hit all of them alike; the median of the per-call times is reported."""
from __future__ import annotations

import ctypes
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median_s: float
    mean_s: float
    min_s: float
    rounds: int


def keep_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory for reuse (mmap threshold 32 MiB, no trimming), so the
    temporaries of a baseline come from the heap instead of fresh pages. On the VMs here a fresh page costs so
    much (a ``clone`` of 128 MB at 1.5-7 GB/s against 36 GB/s for a copy into existing memory) that
    allocating code was timed slower, by an amount that depended on the machine's mood and on whether the
    heap had grown. Returns whether it applied (glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fns: dict[str, Callable[[], object]], *, device: str = "cpu", min_time: float = 0.4,
            min_rounds: int = 5, max_rounds: int = 200, warmup: int = 1) -> dict[str, Timing]:
    """Times each zero-argument callable; rounds continue until every candidate has run ``min_rounds``
    times and ``min_time`` seconds in total (or ``max_rounds``)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples = {name: [] for name in fns}
    names = list(fns)
    r = 0
    while r < max_rounds:
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            samples[name].append(time.perf_counter() - t0)
        r += 1
        if r >= min_rounds and min(sum(s) for s in samples.values()) >= min_time:
            break
    return {n: Timing(statistics.median(s), statistics.fmean(s), min(s), len(s)) for n, s in samples.items()}
