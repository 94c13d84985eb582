"""Read-ahead without processes: the next batches are read by threads while the trainer uses this one.

Used in the main process (`num_workers=0`, or the dataset iterated directly) and in a lone DataLoader
worker, where a request would otherwise wait for the server's gather and then the transfer while the
trainer idles.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, NamedTuple


class Pending(NamedTuple):
    """A batch being read ahead: its rows and its read."""

    rows: int
    read: Future


class ReadAhead:
    """Reads the next batches in daemon threads while the caller uses the current one, as DataLoader
    workers do, without processes: in the main process (`num_workers=0`, or the dataset iterated
    directly) or a lone worker, a request otherwise waits for the server's gather and then the transfer
    while the trainer idles. Batch i is read by lane i % lanes; a lane is one thread with its own sources
    (lane 0: the stream's; others: their own connections, opened on first use), so no reader is ever used
    by two threads at once. A batch read ahead and not taken (the loop stopped, or another batch size was
    asked) is dropped: its rows count as served."""

    def __init__(self, lanes: list[Callable[[], list]], read: Callable):
        self.lanes = [Lane(make) for make in lanes]
        self.read = read
        self.pending: dict[int, Pending] = {}  # by batch index

    def _submit(self, i: int, n: int) -> Future:
        return self.lanes[i % len(self.lanes)].submit(lambda sources: self.read(sources, i, n))

    def plan(self, batches: list[tuple[int, int]]) -> None:
        for i, n in batches:
            if i not in self.pending:
                self.pending[i] = Pending(n, self._submit(i, n))

    def take(self, i: int, n: int):
        """Batch i of n rows: the read ahead (its exception, if it failed), else read now."""
        got = self.pending.pop(i, None)
        if got is None or got.rows != n:
            if got is not None:
                got.read.exception()  # another size was asked: wait for the read, drop its batch
            got = Pending(n, self._submit(i, n))
        return got.read.result()

    def idle(self, wait_s: float) -> bool:
        """Whether no read is running, after waiting up to wait_s seconds for them to end."""
        deadline = time.monotonic() + wait_s
        for i, got in list(self.pending.items()):
            try:
                got.read.exception(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return False
            del self.pending[i]
        return True

    def sources(self) -> list:
        return [s for lane in self.lanes for s in (lane.sources or [])]

    def close(self, join_s: float = 0.0) -> None:
        """End the lanes' threads: each after the read it is running, if any; waits up to join_s seconds
        for them (idle lanes end at once, so a stream closed after its reads leaves no thread behind)."""
        for lane in self.lanes:
            lane.jobs.put(None)
        deadline = time.monotonic() + join_s
        for lane in self.lanes:
            if lane.thread is not threading.current_thread():  # (a close from a finalizer run in a lane)
                lane.thread.join(max(0.0, deadline - time.monotonic()))


class Lane:
    """One read-ahead thread and the sources it reads with (made by `make` in the thread, on first use)."""

    def __init__(self, make: Callable[[], list]):
        self.make, self.sources = make, None
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="actdata-read-ahead", daemon=True)
        self.thread.start()

    def submit(self, fn: Callable) -> Future:
        fut: Future = Future()
        self.jobs.put((fut, fn))
        return fut

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            fut, fn = job
            try:
                if self.sources is None:
                    self.sources = self.make()
                fut.set_result(fn(self.sources))
            except BaseException as e:  # re-raised where the batch is taken
                fut.set_exception(e)
