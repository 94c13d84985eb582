"""How many threads one generator uses: its share of the host's cores.

A generator process runs a forward (torch's intra-op threads), a pool of tokenizer threads and a
statistics thread. Left to their defaults, each of G generators on one host sizes every pool to all of
its cores, and G x cores busy threads preempt each other (an OpenMP worker that loses its core stalls the
whole forward at the next barrier). `limit_threads(local_generators)`, called once per generator process
before anything starts, gives each generator cores / local_generators threads (at least one): torch's
intra-op pool, the tokenizer pool (generation.text) and the native libraries that read OMP_NUM_THREADS,
MKL_NUM_THREADS or RAYON_NUM_THREADS when they start later.
"""
from __future__ import annotations

import os
import threading
from typing import Optional

import torch

_share: Optional[int] = None  # this process's share, once limit_threads has set it


def cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def share_of_cores(local_generators: int) -> int:
    """Threads per generator when `local_generators` generators share this host: cores // generators, >= 1."""
    return max(1, cores() // max(1, int(local_generators)))


def limit_threads(local_generators: int) -> int:
    """Size this generator process's thread pools to its share of the cores; returns the share."""
    global _share
    n = share_of_cores(local_generators)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)
    _share = n
    return n


def tokenizer_threads() -> int:
    """Threads of a generator's tokenizer pool: its share when set, else every core."""
    return _share or cores()


_set_lock = threading.Lock()  # torch keeps one process-wide default: set and put back as one step


def one_thread_here(default: int) -> None:
    """Run the calling thread's torch ops on one core; threads started later begin with `default`.

    OpenMP's team size is per thread, so a helper thread (statistics) whose ops each started a team of
    every core would oversubscribe the cores that the writer's copies and the forward use (measured: a
    reduction 25x slower on a busy 2-core host). `torch.set_num_threads` sets the calling thread's team
    size and also the default that threads started later begin with; that default is put back to
    `default` (the share of the thread that started the helper, read there: a new thread's own first
    reading is whatever default another thread left) from a short-lived thread whose own size does not
    matter."""
    with _set_lock:
        torch.get_num_threads()  # torch's once-per-thread set-up, which would otherwise reset the size at the first op
        torch.set_num_threads(1)
        restore = threading.Thread(target=torch.set_num_threads, args=(max(1, default),), name="actdata-threads")
        restore.start()
        restore.join()
