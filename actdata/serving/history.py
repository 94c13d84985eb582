"""The rate history behind `GET /stats/history`: rows/s in and out and the fill, one sample a second for
the last 15 minutes, so that a status page opened late still draws the curve.

The server's main process samples the buffer's shared counters (`RateHistory.sample`, from its watch
loop) and publishes the samples as a side file beside the buffer (`sidefiles.rate_history`); every HTTP
process answers from that file (`read_history`), so all of them give the same curve.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Optional

from ..shm import sidefiles
from ..shm.sidefiles import publish_json, read_json

WINDOW_S = 900.0
INTERVAL_S = 1.0
COLUMNS = ("t", "rows_in_per_s", "rows_out_per_s", "fill")  # t: unix time of the sample's end


class RateHistory:
    """Samples of the buffer's counters, kept for `window_s`, taken at most every `interval_s`."""

    def __init__(self, buffer, window_s: float = WINDOW_S, interval_s: float = INTERVAL_S):
        self.buffer, self.window_s, self.interval_s = buffer, window_s, interval_s
        self.path = sidefiles.rate_history(buffer.spec.path)
        self.samples: deque = deque(maxlen=int(window_s / interval_s) + 1)
        self._prev: Optional[tuple[float, int, int]] = None

    def sample(self) -> None:
        """Add a sample if `interval_s` has passed since the last one, and publish the history."""
        now = time.time()
        if self._prev is not None and now - self._prev[0] < 0.9 * self.interval_s:  # the caller ticks unevenly
            return
        st = self.buffer.stats()
        written, read = st["rows_written"], st["rows_read"]
        if self._prev is not None:  # rates over this interval from the counters every process shares
            t0, w0, r0 = self._prev
            self.samples.append([round(now, 3), round((written - w0) / (now - t0), 1),
                                 round((read - r0) / (now - t0), 1), round(st["fill"], 5)])
        self._prev = (now, written, read)
        publish_json(self.path, self.as_dict())

    def as_dict(self) -> dict:
        return {"interval_s": self.interval_s, "window_s": self.window_s, "columns": list(COLUMNS),
                "samples": list(self.samples)}


def read_history(buffer_path: str, since: Optional[float] = None) -> dict:
    """The published history (empty before the first sample); only samples after `since` if given."""
    h = read_json(sidefiles.rate_history(buffer_path)) or {}
    samples = h.get("samples") or []
    if since is not None:
        samples = [s for s in samples if s[0] > since]
    return {"interval_s": h.get("interval_s", INTERVAL_S), "window_s": h.get("window_s", WINDOW_S),
            "columns": list(COLUMNS), "samples": samples}
