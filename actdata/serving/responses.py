"""Response memory of one HTTP process: reusable bodies (`ResponseBodies`), the bytes in flight
(`MemoryBudget`), and the two response classes that give their bytes back once sent."""
from __future__ import annotations

import asyncio
import math
import threading
import time
import weakref
from contextlib import contextmanager

import torch
from fastapi.responses import Response, StreamingResponse


class ResponseBodies:
    """Reusable response memory for one HTTP process, as uint8 tensors that both tensor answers (rows, and
    the safetensors body with provenance) are built in, so that a request does not pay the page faults of
    a fresh body. A tensor is lent out with the body made from it, and reused only once
    nothing refers to that body any more: the transport may still be sending it after the response has
    'completed', so this is tracked with a weak reference to the exported array, not with a callback. At
    most `keep` tensors and `keep_bytes` bytes are retained (by default one request's maximum); larger or
    older ones are left to be freed."""

    def __init__(self, keep: int = 8, keep_bytes: int = 64 << 20):
        self.keep, self.keep_bytes = keep, keep_bytes
        self.lent: list[tuple[torch.Tensor, weakref.ref]] = []

    def get(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of at least nbytes (the smallest free one, else a new one of nbytes)."""
        free = [i for i, (t, ref) in enumerate(self.lent) if ref() is None and t.numel() >= nbytes]
        if free:
            return self.lent.pop(min(free, key=lambda i: self.lent[i][0].numel()))[0]
        return torch.empty(nbytes, dtype=torch.uint8)

    def rows(self, k: int, sample_shape: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(memory to lend, a [k, *sample_shape] tensor of dtype over its start)."""
        nbytes = k * math.prod(sample_shape) * dtype.itemsize
        t = self.get(nbytes)
        return t, t[:nbytes].view(dtype).view(k, *sample_shape)

    def lend(self, t: torch.Tensor, body: memoryview) -> None:
        """`t` is in use for as long as `body` (or any view of its array) is alive."""
        if t.nbytes > self.keep_bytes:  # too big to keep: freed with its last view
            return
        try:
            self.lent.append((t, weakref.ref(body.obj)))
        except TypeError:  # an empty body (no array behind it): nothing to track
            return
        while len(self.lent) > self.keep or sum(x.nbytes for x, _ in self.lent) > self.keep_bytes:
            self.lent.pop(0)  # forget the oldest: it is freed when its last view goes

    def retained_bytes(self) -> int:
        return sum(t.nbytes for t, _ in self.lent)


class MemoryBudget:
    """Bytes of response memory one HTTP process holds at once (bodies being built or sent). A request
    takes its share before it reads rows and gives it back when its response is done (sent, or aborted
    by the send timeout); a request that does not fit gets 503 + Retry-After instead of memory. The tensor
    route first waits for it, up to the Retry-After it would send (`wait_take`): a request at the
    per-request maximum takes the whole budget while it is sent, so a second one to the same process
    would otherwise stall its client for a full Retry-After where a few tens of ms suffice."""

    def __init__(self, limit: int):
        self.limit, self.used, self._lock = int(limit), 0, threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    async def wait_take(self, n: int, wait_s: float) -> bool:
        """take(n), polling while the event loop sends the answers holding the budget, for up to wait_s."""
        deadline, pause = time.monotonic() + wait_s, 0.001
        while not self.take(n):
            if n > self.limit or time.monotonic() + pause > deadline:
                return False
            await asyncio.sleep(pause)
            pause = min(0.02, pause * 2)
        return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n
            idle = self.used == 0
        if idle and n >= 8 << 20:
            _trim_heap()

    @contextmanager
    def held(self, n: int):
        """The n bytes taken for an answer being built: given back here if building it fails; the
        response built gives them back once it is sent."""
        try:
            yield
        except BaseException:
            self.give(n)
            raise


def _trim_heap() -> None:
    """Hand freed heap back to the kernel (glibc malloc_trim) once no response is in flight. The JSON
    route's Python objects are made in the thread pool's per-thread malloc arenas, which otherwise keep
    their pages after a flood."""
    global _LIBC
    try:
        if _LIBC is None:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        _LIBC = False


_LIBC = None


class BudgetedResponse(Response):
    """A Response that gives its bytes back to the budget once sent (or once sending failed). The body
    goes out in chunks of `CHUNK` bytes: uvicorn copies what the socket does not take at once into the
    transport's buffer and returns, and waits for the client only before the next write, so in a single
    write a client that never reads would pin a full copy of the body after the response had 'completed'
    and its budget was given back. In chunks, at most
    one chunk is copied, and the response completes only when the client has taken the rest (or the
    send timeout has aborted the connection)."""

    CHUNK = 4 << 20

    def __init__(self, *a, budget: MemoryBudget, cost: int, **kw):
        super().__init__(*a, **kw)
        self._budget, self._cost = budget, cost

    async def __call__(self, scope, receive, send):
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            body = memoryview(self.body).cast("B") if len(self.body) else memoryview(b"")
            for i in range(0, max(len(body), 1), self.CHUNK):
                last = i + self.CHUNK >= len(body)
                await send({"type": "http.response.body", "body": body[i:i + self.CHUNK], "more_body": not last})
        finally:
            cost, self._cost = self._cost, 0
            self._budget.give(cost)
            self.body = b""


# Longest JSON text of one value (a float32 widened to float64 and printed by repr, e.g.
class BudgetedStream(StreamingResponse):
    """A StreamingResponse that gives its bytes back to the budget once done (or aborted)."""

    def __init__(self, *a, budget: MemoryBudget, cost: int, **kw):
        super().__init__(*a, **kw)
        self._budget, self._cost = budget, cost

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            cost, self._cost = self._cost, 0
            self._budget.give(cost)


