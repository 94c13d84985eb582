"""The statistics thread of one generator: batch reductions and their merge, beside the writer.

`StatsWorker` owns a RunningStats. The writer hands it each batch in one of two forms:

- `reduce(rows)`: rows on the CPU (synthetic, replay, a CPU model). The thread reduces them in float32
  chunks (stats.reduce_rows, torch ops that release the GIL, on one core) while the writer copies the
  same rows into the buffer, so the two overlap on two cores; no copy of the rows is made. Rows in memory
  the source reuses must stay valid until `settle()` returns, which the writer calls before it asks such
  a source for the next batch; a source whose rows are fresh tensors (`fresh_rows`) is not waited for,
  and the thread may run a few batches behind (the queue's depth).
- `add(moments)`: a batch already reduced where its rows were (on the GPU, before the copy to the host):
  only the small `[points, width]` sums travel, and the thread merges them.

The merge into the float64 totals (Chan's formula) and the publishing of the totals beside the buffer
run in the thread too; the queue is bounded, so a thread that falls behind slows the writer rather than
holding an unbounded backlog. An error in the thread is raised in the writer at its next call.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Optional

import torch

from ..stats import Moments, RunningStats, reduce_rows
from .threads import one_thread_here

log = logging.getLogger(__name__)
QUEUE_DEPTH = 4  # batches (rows to reduce, or small sums) waiting for the thread


class StatsWorker:
    """A thread that folds batches into `stats` and calls `publish(stats, forced)` at most every `every_s` seconds."""

    def __init__(self, stats: RunningStats, publish: Callable[[RunningStats, bool], None], every_s: float):
        self.stats, self._publish, self.every_s = stats, publish, every_s
        self.lock = threading.Lock()  # held while the totals change or are written out
        self._q: queue.Queue = queue.Queue(QUEUE_DEPTH)
        self._error: Optional[BaseException] = None
        self._published = 0.0
        self._share = torch.get_num_threads()  # the creator's: what threads started after this one begin with
        self._thread = threading.Thread(target=self._run, name="actdata-stats", daemon=True)
        self._thread.start()

    def reduce(self, rows: torch.Tensor) -> None:
        """Reduce and fold rows in the thread; they must stay valid until `settle()`."""
        self._raise()
        if len(rows):
            self._q.put(rows)

    def add(self, moments: Moments) -> None:
        """Fold a batch reduced elsewhere (its sums on the CPU)."""
        self._raise()
        if moments.count:
            self._q.put(moments)

    def settle(self) -> None:
        """Wait until every batch handed in is folded (the rows handed to `reduce` are no longer read)."""
        self._q.join()
        self._raise()

    def publish(self, force: bool = False) -> None:
        """Write the totals out now (force) or when `every_s` passed since the last time."""
        if not force and time.monotonic() - self._published < self.every_s:
            return
        with self.lock:
            self._published = time.monotonic()
            self._publish(self.stats, force)

    def close(self) -> None:
        """Fold what is queued, stop the thread."""
        self._q.put(None)
        self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"the statistics thread failed: {type(err).__name__}: {err}") from err

    def _run(self) -> None:
        one_thread_here(self._share)  # beside the writer, on a core of its own: no team of every core per op
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                m = item if isinstance(item, Moments) else reduce_rows(item, self.stats.points, self.stats.width)
                with self.lock:
                    self.stats.add(m)
                self.publish()
            except BaseException as e:  # noqa: BLE001 - handed to the writer at its next call
                log.exception("statistics thread")
                self._error = e
            finally:
                self._q.task_done()
