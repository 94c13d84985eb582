"""Copying a batch of rows into scattered slots of the buffer, on a few threads when the batch is large.

One thread copies at about half the memory bandwidth of a host (each row is its own small memcpy); numpy's
fancy-index assignment releases the GIL, so a few threads, each copying a contiguous share of the batch's
rows into its share of the slot ids, fill the bandwidth. Small batches stay on the caller's thread, where
handing work to a pool would cost more than the copy.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

MIN_BYTES_PER_THREAD = 4 << 20  # below this share a thread's hand-off costs more than it copies
MAX_THREADS = 4  # memory bandwidth is filled by a few copying threads; more only contend


def default_threads() -> int:
    """Copy threads for this process: the cores it may run on, at most MAX_THREADS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cores))


_pool: Optional[ThreadPoolExecutor] = None
_pool_key = (0, 0)
_pool_lock = threading.Lock()
threads = default_threads()


def _executor() -> ThreadPoolExecutor:
    """The process's copy pool, made on first use (again in a forked child, which has no threads, or when
    `threads` was changed)."""
    global _pool, _pool_key
    with _pool_lock:
        if _pool is None or _pool_key != (os.getpid(), threads):
            if _pool is not None and _pool_key[0] == os.getpid():
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max(1, threads - 1), thread_name_prefix="actdata-scatter")
            _pool_key = (os.getpid(), threads)
        return _pool


def shares(k: int, row_bytes: int, n_threads: Optional[int] = None) -> int:
    """How many threads copy a batch of k rows of row_bytes each (1 = the caller alone)."""
    n = threads if n_threads is None else n_threads
    return max(1, min(n, k * row_bytes // MIN_BYTES_PER_THREAD))


def scatter(dst: np.ndarray, ids: np.ndarray, src: np.ndarray) -> None:
    """dst[ids] = src for a [capacity, row_bytes] uint8 view `dst` and [len(ids), row_bytes] rows `src`."""
    n = shares(len(ids), src.shape[1] if src.ndim > 1 else 1)
    if n == 1:
        dst[ids] = src
        return
    bounds = np.linspace(0, len(ids), n + 1).astype(np.int64)

    def part(i: int) -> None:
        a, b = bounds[i], bounds[i + 1]
        dst[ids[a:b]] = src[a:b]

    futures = [_executor().submit(part, i) for i in range(1, n)]
    part(0)  # the caller copies the first share itself
    for f in futures:
        f.result()
