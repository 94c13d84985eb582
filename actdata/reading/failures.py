"""How a request to an actdata server fails: the errors a caller sees and the retry policy.

Connection errors, timeouts and 502/503/504 are `Transient`: `RetryPolicy` retries them with exponential
backoff (503's `Retry-After` is honoured) until `retry_for_s` seconds have passed since the first failure,
then raises `ServerUnavailable` naming the URL and the last error. A 4xx (the caller's mistake: bad
`num_samples`, missing API key) raises `ActivationServerError` with the server's `detail` at once.
"""
from __future__ import annotations

import json
import random
import threading
import time
from typing import Callable, Optional

RETRY_STATUSES = (502, 503, 504)


class ActivationServerError(RuntimeError):
    """The server refused a request (4xx: the caller's mistake) or could not be reached in time.

    `url`, `status` (None for connection errors) and `detail` (the server's `detail` string or the
    connection error) are kept as attributes. Constructible from the message alone, so the type survives
    a DataLoader worker re-raising it in the main process.
    """

    def __init__(self, message: str, url: Optional[str] = None, status: Optional[int] = None,
                 detail: Optional[str] = None):
        super().__init__(message)
        self.url, self.status, self.detail = url, status, detail


class ServerUnavailable(ActivationServerError):
    """Connection errors, timeouts or 502/503/504 for longer than the retry budget (`retry_for_s`)."""


class Transient(Exception):
    """A failure worth retrying, with the server's Retry-After (seconds) when it sent one."""

    def __init__(self, reason: str, retry_after: Optional[float] = None, status: Optional[int] = None):
        super().__init__(reason)
        self.reason, self.retry_after, self.status = reason, retry_after, status


def error_detail(body: bytes) -> str:
    """The server's `detail` from a JSON error body, or the body's start as text."""
    try:
        d = json.loads(body)
        if isinstance(d, dict) and "detail" in d:
            return d["detail"] if isinstance(d["detail"], str) else json.dumps(d["detail"])
    except ValueError:
        pass
    return body[:300].decode(errors="replace") or "(empty body)"


def retry_after(value: Optional[str]) -> Optional[float]:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class RetryPolicy:
    """Exponential backoff bounded by a total time.

    `run(attempt_fn)` calls `attempt_fn()` until it returns. `_Transient` failures are retried after
    `min(max_backoff, backoff * 2**n)` seconds (with +-20% jitter) or the server's Retry-After, whichever
    the server asked for, never sleeping past `retry_for_s` seconds after the first failure; after that
    `ServerUnavailable` is raised. Other exceptions pass through at once.
    """

    def __init__(self, retry_for_s: float = 60.0, backoff: float = 0.1, max_backoff: float = 5.0,
                 stop: Optional[threading.Event] = None):
        self.retry_for_s, self.backoff, self.max_backoff = float(retry_for_s), float(backoff), float(max_backoff)
        self.stop = stop  # once set, a failure is final (the reader is being closed)

    def run(self, attempt_fn: Callable, url: str, what: str):
        first_failure, n = None, 0
        while True:
            try:
                return attempt_fn()
            except Transient as e:
                now = time.monotonic()
                first_failure = first_failure if first_failure is not None else now
                left = self.retry_for_s - (now - first_failure)
                if self.stop is not None and self.stop.is_set():
                    left = 0
                if left <= 0:
                    raise ServerUnavailable(
                        f"{what} {url}: gave up after {now - first_failure:.1f} s of retries "
                        f"(retry_for_s={self.retry_for_s:g}); last error: {e.reason}",
                        url=url, status=e.status, detail=e.reason) from None
                wait = e.retry_after if e.retry_after is not None else \
                    min(self.max_backoff, self.backoff * 2 ** n) * random.uniform(0.8, 1.2)
                if self.stop is not None:
                    self.stop.wait(min(wait, left))
                else:
                    time.sleep(min(wait, left))
                n += 1
