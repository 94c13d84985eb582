"""A generator's status file: `Status` writes it, `read_statuses` reads every generator's of a buffer.

The status (`sidefiles.generator_status`, JSON beside the buffer) says what a generator is doing: its
state (loading, running, paused, restarting, failed, crashed, stopped), rows/s and tokens/s over the last
ten seconds, counters of rows, contexts and tokens, restarts and the last error, and where it runs:
`device` (the device it actually uses, "cuda:<current_device()>" or "cpu"), `gpu_uuid` (that GPU's UUID,
null on the CPU) and its thread shares (`threads`, `tokenizer_threads`: generation.threads). It is published
atomically at most every `interval` seconds (state changes at once), so the HTTP processes and
/stats read it without talking to the generator. A worker process that replaces a dead one carries the
dead one's restart count and error on.
"""
from __future__ import annotations

import logging
import os
import time

from ..host import pid_alive
from ..shm import BufferSpec, sidefiles
from ..shm.sidefiles import publish_json, read_json

log = logging.getLogger(__name__)
RATE_WINDOW_S = 10.0  # rows/s and tokens/s are averaged over this many seconds


class Status:
    """The status of one generator, published atomically as JSON (at most every `interval` seconds)."""

    def __init__(self, spec: BufferSpec, name: str, device: str, source: str, interval: float = 0.5):
        self.path, self.interval, self._last = sidefiles.generator_status(spec.path, name), interval, 0.0
        self.d = {"name": name, "pid": os.getpid(), "device": device, "gpu_uuid": None, "source": source,
                  "state": "loading",
                  "tokens_per_s": 0.0, "rows_per_s": 0.0, "rows_written": 0, "contexts": 0, "tokens": 0,
                  "corpus_passes": 0, "rows_overflowed": 0, "restarts": 0, "last_error": None,
                  "started_at": time.time(), "updated_at": time.time()}
        self._window: list[tuple[float, int, int]] = []
        prev = read_json(self.path)  # a previous process of this worker slot that died: carry its history
        if prev and prev.get("pid") != os.getpid() and prev.get("state") not in ("stopped",):
            self.d["restarts"] = prev.get("restarts", 0) + 1
            self.d["last_error"] = (prev.get("death") or prev.get("last_error")
                                    or f"worker process {prev.get('pid')} died")

    def update(self, force: bool = False, **kw) -> None:
        """Merge `kw` and publish (at most every `interval` s unless forced). Never raises: a status
        that cannot be written (a full disk) is kept in memory and published when it can be; the
        reason is in `status_error`."""
        try:
            self.d.update(kw)
            now = time.time()
            if force or now - self._last >= self.interval:
                self._rates(now)
                self.d["updated_at"], self._last = now, now
                err = publish_json(self.path, self.d)
                if err != self.d.get("status_error"):
                    self.d["status_error"] = err
                    if err:
                        log.error("generator %s: cannot publish its status: %s", self.d["name"], err)
                        publish_json(self.path, self.d)  # in place, with the reason
        except Exception as e:  # noqa: BLE001 - reporting must never end the loop it reports on
            log.error("generator status update failed: %s: %s", type(e).__name__, e)

    def _rates(self, now: float) -> None:
        self._window.append((now, self.d["rows_written"], self.d["tokens"]))
        self._window = [w for w in self._window if now - w[0] <= RATE_WINDOW_S] or self._window[-1:]
        t0, r0, k0 = self._window[0]
        if now > t0:
            self.d["rows_per_s"] = (self.d["rows_written"] - r0) / (now - t0)
            self.d["tokens_per_s"] = (self.d["tokens"] - k0) / (now - t0)


def read_statuses(spec: BufferSpec) -> list[dict]:
    """Statuses of every generator of this buffer; a generator whose process is gone shows as 'dead'."""
    out = []
    for _, path in sidefiles.generator_statuses(spec.path):
        st = read_json(path)
        if not isinstance(st, dict):
            continue
        if st.get("state") not in ("stopped", "failed") and not pid_alive(st.get("pid", -1)):
            st["state"] = "dead"
        out.append(st)
    return out
