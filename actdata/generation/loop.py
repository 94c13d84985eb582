"""The generation loop: a source of rows (a model over text, or synthetic) -> the shared buffer.

`run_supervised` is what a LitServe device worker runs in a background thread: it builds the source on
its device, writes every batch into random free slots of the buffer, publishes its status (state,
rates, counters, last error) in a small JSON file beside the buffer, and restarts the source with
back-off when it fails. A source that fails before producing anything `startup_attempts` times in a
row is reported as failed and not restarted again (a bad model or dataset name will not fix itself).
Before a restart the old source (its model, hooks, staging buffers) is freed, and the CUDA cache
emptied, so two models never sit on the device at once. A CUDA error that leaves the process's context
unusable (device-side assert, illegal memory access: see placement.poisons_context) is not retried in
this process: the worker process exits with POISONED_EXIT and LitServe (restart_workers) starts a fresh
one, whose Status carries the restart count and the error on.

Numbering, state and statistics. The generator is g of G (g = node_rank * local generators + local
index, G = num_nodes * local generators): it reads only its share of the corpus (actdata.text) and its
context ids are (g << 40) | counter. With a `generator.state_dir` it resumes from its saved state
(actdata.position) and saves the position after each batch BEFORE committing the batch to the buffer.
With `generator.statistics` it folds every batch it writes (the rows as written, buffer.dtype, reduced in
float64) into a RunningStats, published every few seconds beside the buffer
(`<buffer>.stats-<name>.safetensors`, merged by GET /statistics) and saved with the state.
"""
from __future__ import annotations

import gc
import logging
import os
import threading
import time
import traceback
from typing import TYPE_CHECKING, Iterable, Optional

import numpy as np
import torch

from ..host import pid_alive
from ..shm import BufferSpaceError, BufferSpec, SharedActivationBuffer, sidefiles
from ..shm.sidefiles import publish_json, read_json
from .. import wire
from ..config import Config

if TYPE_CHECKING:
    from ..stats import RunningStats

log = logging.getLogger(__name__)
POISONED_EXIT = 75  # exit code of a worker process whose CUDA context a failure has made unusable

# Each yielded item: rows [k, *sample_shape] on the CPU, origin ids [k] (context of each row), and
# running counters {"contexts": n, "tokens": n, "corpus_passes": n (optional)} for this item.
Batch = tuple[torch.Tensor, np.ndarray, dict]


def make_source(cfg: Config, spec: BufferSpec, device: str, index: int, count: int = 1,
                start: Optional[dict] = None) -> Iterable[Batch]:
    """The source of generator `index` (g) of `count` (G), continuing from a saved state `start` if given."""
    if cfg.generator.source == "store":  # replay: no model, no tokenizer (actdata/replay.py)
        from ..storage.replay import make_store_source

        return make_store_source(cfg, index, count, start)
    if cfg.generator.source == "synthetic":
        from .synthetic import SyntheticSource

        first = (start or {}).get("next_id")
        return SyntheticSource(spec.sample_shape, wire.DTYPES[spec.dtype],
                               first_id=int(first) if first is not None else index << 40,
                               rows_per_second=cfg.generator.rows_per_second, provenance=cfg.generator.provenance)
    from .model_source import ModelSource

    return ModelSource(cfg, device, index, count=count, start=start)


def statistics_enabled(cfg: Config) -> bool:
    """generator.statistics, where null means: on for the model source, off for the synthetic one."""
    s = cfg.generator.statistics
    return cfg.generator.source == "model" if s is None else bool(s)


def read_statistics(spec: BufferSpec) -> list[tuple[str, "RunningStats"]]:
    """(generator name, RunningStats) of every generator of this buffer that published statistics."""
    from safetensors.torch import load_file

    from ..stats import RunningStats

    out = []
    for name, path in sidefiles.generator_stats_files(spec.path):
        try:
            out.append((name, RunningStats.from_tensors(load_file(path))))
        except Exception:  # noqa: BLE001 - being replaced right now, or torn by a crash: skip it
            continue
    return out


RESERVE_IDS = 1 << 16  # synthetic ids saved ahead of use (a restart skips at most this many)


class Progress:
    """Numbering, saved state and running statistics of one generator (see the module docstring)."""

    def __init__(self, cfg: Config, spec: BufferSpec, name: str, index: int, count: int):
        from .state import GeneratorState
        from ..stats import RunningStats

        self.g, self.G, self.spec, self.name = index, count, spec, name
        self.state = GeneratorState.for_config(cfg, index, count)
        self.saved = (self.state.load() if self.state else None) or {}
        self.totals = {k: int(self.saved.get(k, 0)) for k in ("contexts", "tokens", "rows")}
        self.stats = None
        if statistics_enabled(cfg):
            self.stats = (self.state.load_stats(spec.sample_shape) if self.state else None) or RunningStats(spec.sample_shape)
        self._published = 0.0
        self.publish_stats(force=True)

    def start(self) -> dict:
        """The state a (re)started source continues from: the latest saved (kept in memory too)."""
        return self.saved

    def before_commit(self, rows: torch.Tensor, info: dict) -> None:
        """Called with each batch before it is written: save the position after it, fold it into the statistics."""
        for k, n in (("contexts", info.get("contexts", 0)), ("tokens", info.get("tokens", 0)), ("rows", len(rows))):
            self.totals[k] += int(n)
        if "next_id" in info and self.state and info["next_id"] <= self.saved.get("next_id", -1):
            pass  # synthetic: ids up to the reserved one are already covered by the saved state
        else:
            self.saved = {k: info[k] for k in ("position", "next_context", "next_id") if k in info}
            if "next_id" in info:  # reserve ids ahead: a restart skips them instead of saving every batch
                self.saved["next_id"] = int(info["next_id"]) + RESERVE_IDS
            self.saved.update(self.totals)
            if self.state:
                self.state.save(**self.saved)
        if self.stats is not None:
            self.stats.update(rows)
            self.publish_stats()

    def waiting(self, status: "Status"):
        """What to do while the buffer is full: publish the status and the statistics."""
        def on_wait():
            status.update()
            self.publish_stats()
        return on_wait

    def publish_stats(self, force: bool = False) -> None:
        from .state import STATS_EVERY_S, write_stats

        if self.stats is None or not (force or time.monotonic() - self._published >= min(2.0, STATS_EVERY_S)):
            return
        self._published = time.monotonic()
        write_stats(sidefiles.generator_stats(self.spec.path, self.name), self.stats)
        if self.state:
            self.state.save_stats(self.stats, force=force)

    def position(self) -> dict:
        """For /stats: where this generator is (pass, documents, offset or next_id; totals done)."""
        pos = dict(self.saved.get("position") or {})
        if "next_id" in self.saved:
            pos["next_id"] = self.saved["next_id"]
        return {"g": self.g, "G": self.G, **pos, "contexts_done": self.totals["contexts"],
                "tokens_done": self.totals["tokens"], "rows_done": self.totals["rows"],
                "state_file": self.state.path if self.state else None}


def release_source(source) -> None:
    """Free a source before the next one is built: its model and buffers, then the CUDA cache."""
    close = getattr(source, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # noqa: BLE001 - freeing must not mask the failure being handled
            log.exception("closing the failed source")
    del source, close
    gc.collect()  # frames of the failure's traceback may still hold the model
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def exit_process(code: int) -> None:
    """End this worker process at once (LitServe starts a fresh one)."""
    logging.shutdown()
    os._exit(code)


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


class Status:
    """The status of one generator, published atomically as JSON (at most every `interval` seconds)."""

    def __init__(self, spec: BufferSpec, name: str, device: str, source: str, interval: float = 0.5):
        self.path, self.interval, self._last = sidefiles.generator_status(spec.path, name), interval, 0.0
        self.d = {"name": name, "pid": os.getpid(), "device": device, "source": source, "state": "loading",
                  "tokens_per_s": 0.0, "rows_per_s": 0.0, "rows_written": 0, "contexts": 0, "tokens": 0,
                  "corpus_passes": 0, "rows_overflowed": 0, "restarts": 0, "last_error": None, "started_at": time.time(),
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
                   startup_attempts: int = 3, max_backoff_s: float = 30.0, count: int = 1,
                   on_poisoned=exit_process) -> None:
    """Generate into the buffer until `stop` is set, restarting the source on failure. `index` is this
    generator's global number g of `count` = G. Every way out of this function is published in the
    status: 'stopped', 'failed' (with the error), or 'crashed' for an error outside the restart loop
    itself (it is logged and re-raised)."""
    name = f"{device.replace(':', '')}-w{index}"  # stable across restarts of the worker process
    status = Status(spec, name, device, cfg.generator.source)
    try:
        buffer = SharedActivationBuffer.attach(spec)
        progress = Progress(cfg, spec, name, index, count)
    except BaseException as e:
        status.update(force=True, state="failed", last_error=f"cannot start: {type(e).__name__}: {e}")
        raise
    status.update(force=True, position=progress.position())
    if buffer.reserved:  # map the rows ahead of this writer while the model loads; a sparse buffer
        buffer.populate_in_background(stop)  # (buffer.reserve=false) allocates slot by slot as it writes
    store = _open_store_writer(cfg, spec, index, count, status)  # None unless store.write
    try:
        _loop(cfg, spec, device, index, count, stop, startup_attempts, max_backoff_s, name, status, buffer,
              progress, store, on_poisoned)
    except BaseException as e:  # a bug in the loop itself: never silent
        status.update(force=True, state="crashed", last_error=f"{type(e).__name__}: {e}")
        log.critical("generator %s loop crashed: %s\n%s", name, e, traceback.format_exc())
        raise
    finally:
        if store is not None:
            store.close()
            status.update(force=True, store_writer=store.state())
        try:
            progress.publish_stats(force=True)
        except Exception as e:  # noqa: BLE001 - stopping must not fail on a full disk
            log.warning("generator %s: could not save its statistics: %s", name, e)
        buffer.close()


def _loop(cfg, spec, device, index, count, stop, startup_attempts, max_backoff_s, name, status, buffer,
          progress, store, on_poisoned) -> None:
    from .placement import poisons_context

    failures_before_output, backoff = 0, 1.0
    source = None
    while not stop.is_set():
        produced = 0
        try:
            status.update(force=True, state="loading")
            source = make_source(cfg, spec, device, index, count, progress.start())
            status.update(force=True, state="running")
            for rows, origin, info in source:
                progress.before_commit(rows, info)
                n = _write_all(buffer, rows, origin, info.get("provenance"), stop, status, name,
                               on_wait=progress.waiting(status))
                if store is not None:  # the same rows, once, to the store (actdata/store.py)
                    store.put(rows[:n], origin[:n], _head(info.get("provenance"), n), stop,
                              on_wait=lambda: status.update(store_writer=store.state()))
                    status.d["store_writer"] = store.state()
                if "store" in info:  # replaying a store: pass, shard, bad shards
                    status.d["store_replay"] = info["store"]
                produced += n
                buffer.note_contexts(info.get("contexts", 0))
                status.update(force=produced == n,  # publish the first batch at once
                              rows_written=status.d["rows_written"] + n,
                              contexts=status.d["contexts"] + info.get("contexts", 0),
                              tokens=status.d["tokens"] + info.get("tokens", 0),
                              corpus_passes=info.get("corpus_passes", status.d["corpus_passes"]),
                              rows_overflowed=status.d["rows_overflowed"] + info.get("rows_overflowed", 0),
                              position=progress.position())
                if stop.is_set():
                    break
            else:
                log.warning("generator %s: source ended; restarting it", name)
        except Exception as e:  # a failing source must not take the server down
            err = f"{type(e).__name__}: {e}"
            log.error("generator %s failed: %s\n%s", name, err, traceback.format_exc())
            if poisons_context(e):  # every later CUDA call of this process would fail: a fresh process
                status.update(force=True, state="restarting", last_error=err)
                log.error("generator %s: the CUDA context is unusable; ending worker process %d so that "
                          "a fresh one is started", name, os.getpid())
                on_poisoned(POISONED_EXIT)
                return
            failures_before_output = 0 if produced else failures_before_output + 1
            if failures_before_output >= startup_attempts:
                status.update(force=True, state="failed", last_error=err)
                log.error("generator %s failed %d times before producing a row; giving up", name,
                          failures_before_output)
                return
            backoff = 1.0 if produced else min(backoff * 2, max_backoff_s)
            status.update(force=True, state="restarting", last_error=err, restarts=status.d["restarts"] + 1)
        finally:
            source = release_source(source)  # the old model goes before a new one is built
        if status.d["state"] == "restarting":
            stop.wait(backoff)
    status.update(force=True, state="stopped")


def _write_all(buffer: SharedActivationBuffer, rows, origin, provenance, stop: threading.Event, status: Status,
               name: str, on_wait=None) -> int:
    """Write every row, pausing while the buffer's filesystem (or memory) is full and resuming when
    space returns; the pause and its reason are in the status. Returns rows written."""
    done, paused = 0, False
    while done < len(rows):
        try:
            done += buffer.write(rows[done:], None if origin is None else origin[done:], stop,
                                 on_wait=on_wait or status.update, provenance=_tail(provenance, done))
            if stop.is_set():
                break
        except BufferSpaceError as e:
            done += e.done
            if not paused:
                log.error("generator %s: writing paused: %s", name, e)
                paused = True
            status.update(force=True, state="paused", last_error=str(e),
                          paused_since=status.d.get("paused_since") or time.time())
            if stop.wait(1.0):
                break
            continue
    if paused:
        log.info("generator %s: space is back; writing resumed", name)
        status.update(force=True, state="running", paused_since=None)
    return done


def _head(provenance: Optional[dict], n: int) -> Optional[dict]:
    return None if provenance is None else {k: v[:n] for k, v in provenance.items()}


def _tail(provenance: Optional[dict], n: int) -> Optional[dict]:
    return provenance if provenance is None or n == 0 else {k: v[n:] for k, v in provenance.items()}


def _open_store_writer(cfg: Config, spec: BufferSpec, index: int, count: int, status: Status):
    if not cfg.store.write:
        return None
    from ..storage.writer import open_writer

    try:
        return open_writer(cfg, spec.sample_shape, index, count)
    except Exception as e:  # the store is an extra: a store that cannot be opened does not stop serving
        log.error("store %s cannot be written: %s; serving without it", cfg.store.path, e)
        status.update(force=True, store_writer={"path": cfg.store.path, "state": "stopped: cannot open",
                                                "error": f"{type(e).__name__}: {e}"})
        return None
