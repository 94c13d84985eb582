"""The generation loop: a source of rows (a model over text, or synthetic) -> the shared buffer.

`run_supervised` is what a LitServe device worker runs in a background thread: it builds the source on
its device, writes every batch into random free slots of the buffer, publishes its status (state,
rates, counters, last error) in a small JSON file beside the buffer, and restarts the source with
back-off when it fails. A source that fails before producing anything `startup_attempts` times in a
row is reported as failed and not restarted again (a bad model or dataset name will not fix itself).
"""
from __future__ import annotations

import glob
import logging
import os
import threading
import time
import traceback
from typing import Iterable, Optional

import numpy as np
import torch

from .buffer import BufferSpaceError, BufferSpec, SharedActivationBuffer, pid_alive
from .logs import publish_json, read_json
from . import wire
from .config import Config, synthetic_shape

log = logging.getLogger("actdata.generator")

# Each yielded item: rows [k, *sample_shape] on the CPU, origin ids [k] (context of each row), and
# running counters {"contexts": n, "tokens": n, "corpus_passes": n (optional)} for this item.
Batch = tuple[torch.Tensor, np.ndarray, dict]


def make_source(cfg: Config, spec: BufferSpec, device: str, index: int) -> Iterable[Batch]:
    if cfg.generator.source == "synthetic":
        from .synthetic import SyntheticSource

        return SyntheticSource(spec.sample_shape, wire.DTYPES[spec.dtype], first_id=index << 40,
                               rows_per_second=cfg.generator.rows_per_second)
    from .capture import ModelSource

    return ModelSource(cfg, device, index)


def status_path(spec: BufferSpec, name: str) -> str:
    return f"{spec.path}.gen-{name}.json"


def read_statuses(spec: BufferSpec) -> list[dict]:
    """Statuses of every generator of this buffer; a generator whose process is gone shows as 'dead'."""
    out = []
    for path in sorted(glob.glob(f"{glob.escape(spec.path)}.gen-*.json")):
        st = read_json(path)
        if not isinstance(st, dict):
            continue
        if st.get("state") not in ("stopped", "failed") and not pid_alive(st.get("pid", -1)):
            st["state"] = "dead"
        out.append(st)
    return out


class Status:
    """The status of one generator, published atomically as JSON (at most every `interval` seconds)."""

    def __init__(self, spec: BufferSpec, name: str, device: str, source: str, interval: float = 0.5):
        self.path, self.interval, self._last = status_path(spec, name), interval, 0.0
        self.d = {"name": name, "pid": os.getpid(), "device": device, "source": source, "state": "loading",
                  "tokens_per_s": 0.0, "rows_per_s": 0.0, "rows_written": 0, "contexts": 0, "tokens": 0,
                  "corpus_passes": 0, "restarts": 0, "last_error": None, "started_at": time.time(),
                  "updated_at": time.time()}
        self._window: list[tuple[float, int, int]] = []
        prev = read_json(self.path)  # a previous process of this worker slot that died: carry its history
        if prev and prev.get("pid") != os.getpid() and prev.get("state") not in ("stopped",):
            self.d["restarts"] = prev.get("restarts", 0) + 1
            self.d["last_error"] = prev.get("death") or prev.get("last_error") or f"worker process {prev.get('pid')} died"

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
        self._window = [w for w in self._window if now - w[0] <= 10.0] or self._window[-1:]
        t0, r0, k0 = self._window[0]
        if now > t0:
            self.d["rows_per_s"] = (self.d["rows_written"] - r0) / (now - t0)
            self.d["tokens_per_s"] = (self.d["tokens"] - k0) / (now - t0)


def run_supervised(cfg: Config, spec: BufferSpec, device: str, index: int, stop: threading.Event,
                   startup_attempts: int = 3, max_backoff_s: float = 30.0) -> None:
    """Generate into the buffer until `stop` is set, restarting the source on failure. Every way out
    of this function is published in the status: 'stopped', 'failed' (with the error), or 'crashed'
    for an error outside the restart loop itself (it is logged and re-raised)."""
    name = f"{device.replace(':', '')}-w{index}"  # stable across restarts of the worker process
    status = Status(spec, name, device, cfg.generator.source)
    try:
        buffer = SharedActivationBuffer.attach(spec)
    except BaseException as e:
        status.update(force=True, state="failed", last_error=f"cannot attach the buffer: {type(e).__name__}: {e}")
        raise
    try:
        _loop(cfg, spec, device, index, stop, startup_attempts, max_backoff_s, name, status, buffer)
    except BaseException as e:  # a bug in the loop itself: never silent
        status.update(force=True, state="crashed", last_error=f"{type(e).__name__}: {e}")
        log.critical("generator %s loop crashed: %s\n%s", name, e, traceback.format_exc())
        raise
    finally:
        buffer.close()


def _write_all(buffer: SharedActivationBuffer, rows, origin, stop: threading.Event, status: Status, name: str) -> int:
    """Write every row, pausing while the buffer's filesystem (or memory) is full and resuming when
    space returns; the pause and its reason are in the status. Returns rows written."""
    done, paused = 0, False
    while done < len(rows):
        try:
            done += buffer.write(rows[done:], None if origin is None else origin[done:], stop, on_wait=status.update)
            if stop.is_set():
                break
        except BufferSpaceError as e:
            done += e.done
            if not paused:
                log.error("generator %s: writing paused: %s", name, e)
                paused = True
            status.update(force=True, state="paused", last_error=str(e), paused_since=status.d.get("paused_since") or time.time())
            if stop.wait(1.0):
                break
            continue
    if paused:
        log.info("generator %s: space is back; writing resumed", name)
        status.update(force=True, state="running", paused_since=None)
    return done


def _loop(cfg, spec, device, index, stop, startup_attempts, max_backoff_s, name, status, buffer) -> None:
    failures_before_output, backoff = 0, 1.0
    while not stop.is_set():
        produced = 0
        try:
            status.update(force=True, state="loading")
            source = make_source(cfg, spec, device, index)
            status.update(force=True, state="running")
            for rows, origin, info in source:
                n = _write_all(buffer, rows, origin, stop, status, name)
                produced += n
                buffer.note_contexts(info.get("contexts", 0))
                status.update(force=produced == n,  # publish the first batch at once
                              rows_written=status.d["rows_written"] + n,
                              contexts=status.d["contexts"] + info.get("contexts", 0),
                              tokens=status.d["tokens"] + info.get("tokens", 0),
                              corpus_passes=info.get("corpus_passes", status.d["corpus_passes"]))
                if stop.is_set():
                    break
            else:
                log.warning("generator %s: source ended; restarting it", name)
        except Exception as e:  # a failing source must not take the server down
            err = f"{type(e).__name__}: {e}"
            log.error("generator %s failed: %s\n%s", name, err, traceback.format_exc())
            failures_before_output = 0 if produced else failures_before_output + 1
            if failures_before_output >= startup_attempts:
                status.update(force=True, state="failed", last_error=err)
                log.error("generator %s failed %d times before producing a row; giving up", name,
                          failures_before_output)
                return
            backoff = 1.0 if produced else min(backoff * 2, max_backoff_s)
            status.update(force=True, state="restarting", last_error=err, restarts=status.d["restarts"] + 1)
            stop.wait(backoff)
    status.update(force=True, state="stopped")
