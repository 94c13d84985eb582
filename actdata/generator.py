"""The generation loop: a source of rows (a model over text, or synthetic) -> the shared buffer.

`run_supervised` is what a LitServe device worker runs in a background thread: it builds the source on
its device, writes every batch into random free slots of the buffer, publishes its status (state,
rates, counters, last error) in a small JSON file beside the buffer, and restarts the source with
back-off when it fails. A source that fails before producing anything `startup_attempts` times in a
row is reported as failed and not restarted again (a bad model or dataset name will not fix itself).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import threading
import time
import traceback
from typing import Iterable, Optional

import numpy as np
import torch

from .buffer import BufferSpec, SharedActivationBuffer, pid_alive
from . import wire
from .config import Config, synthetic_shape

log = logging.getLogger("actdata.generator")

# Each yielded item: rows [k, *sample_shape] on the CPU, origin ids [k] (context of each row), and
# running counters {"contexts": n, "tokens": n, "corpus_passes": n (optional)} for this item.
Batch = tuple[torch.Tensor, np.ndarray, dict]


def global_generator(cfg: Config, index: int, local_generators: int) -> int:
    """The shared contract: generator g = server.node_rank * local generators + local index."""
    return cfg.server.node_rank * local_generators + index


def make_source(cfg: Config, spec: BufferSpec, device: str, index: int, local_generators: int = 1) -> Iterable[Batch]:
    if cfg.generator.source == "synthetic":
        from .synthetic import SyntheticSource

        g = global_generator(cfg, index, local_generators)  # ids of generator g start at g << 40: disjoint
        return SyntheticSource(spec.sample_shape, wire.DTYPES[spec.dtype], first_id=g << 40,
                               rows_per_second=cfg.generator.rows_per_second)
    from .pipeline import ModelSource

    return ModelSource(cfg, device, index)


def status_path(spec: BufferSpec, name: str) -> str:
    return f"{spec.path}.gen-{name}.json"


def read_statuses(spec: BufferSpec) -> list[dict]:
    """Statuses of every generator of this buffer; a generator whose process is gone shows as 'dead'."""
    out = []
    for path in sorted(glob.glob(f"{glob.escape(spec.path)}.gen-*.json")):
        try:
            with open(path) as f:
                st = json.load(f)
        except (OSError, ValueError):
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
        try:  # a previous process of this worker slot that died: carry its history
            with open(self.path) as f:
                prev = json.load(f)
        except (OSError, ValueError):
            prev = None
        if prev and prev.get("pid") != os.getpid() and prev.get("state") not in ("stopped",):
            self.d["restarts"] = prev.get("restarts", 0) + 1
            self.d["last_error"] = prev.get("last_error") or f"worker process {prev.get('pid')} died"

    def update(self, force: bool = False, **kw) -> None:
        self.d.update(kw)
        now = time.time()
        if force or now - self._last >= self.interval:
            self._rates(now)
            self.d["updated_at"], self._last = now, now
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.d, f)
            os.replace(tmp, self.path)

    def _rates(self, now: float) -> None:
        self._window.append((now, self.d["rows_written"], self.d["tokens"]))
        self._window = [w for w in self._window if now - w[0] <= 10.0] or self._window[-1:]
        t0, r0, k0 = self._window[0]
        if now > t0:
            self.d["rows_per_s"] = (self.d["rows_written"] - r0) / (now - t0)
            self.d["tokens_per_s"] = (self.d["tokens"] - k0) / (now - t0)


def run_supervised(cfg: Config, spec: BufferSpec, device: str, index: int, stop: threading.Event,
                   startup_attempts: int = 3, max_backoff_s: float = 30.0, local_generators: int = 1) -> None:
    """Generate into the buffer until `stop` is set, restarting the source on failure."""
    name = f"{device.replace(':', '')}-w{index}"  # stable across restarts of the worker process
    status = Status(spec, name, device, cfg.generator.source)
    buffer = SharedActivationBuffer.attach(spec)
    failures_before_output, backoff = 0, 1.0
    try:
        while not stop.is_set():
            produced = 0
            try:
                status.update(force=True, state="loading")
                source = make_source(cfg, spec, device, index, local_generators)
                status.update(force=True, state="running")
                for rows, origin, info in source:
                    n = buffer.write(rows, origin, stop, on_wait=status.update)
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
    finally:
        buffer.close()
