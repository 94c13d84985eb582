"""The generation loop: one generator writes the rows of its source into the shared buffer until stopped.

`run_supervised` is what a LitServe device worker runs in a background thread. Its `Generator` builds
the source (generation.source: a model over text, synthetic rows, or a store replayed) on its device,
writes every batch into free slots of the buffer, pausing while the buffer's filesystem or memory is
full, copies the rows to a store too when `store.write`, and publishes its status (generation.status)
beside the buffer. The failure policy:

- a failed source is freed (its model, hooks and staging buffers, then the CUDA cache, so two models
  never sit on the device at once) and rebuilt after a back-off that doubles while no row comes out;
- a source that fails `startup_attempts` times in a row before producing a row is reported 'failed' and
  not rebuilt, since a bad model or dataset name will not fix itself;
- an error that leaves the process's CUDA context unusable (placement.poisons_context) is not retried in
  this process: the worker exits with POISONED_EXIT and LitServe (restart_workers) starts a fresh one,
  whose Status carries the restart count and the error on.

Numbering. The generator is g of G (g = node_rank * local generators + local index, G = num_nodes *
local generators): it reads only its share of the corpus (generation.text) and its context ids are
(g << 40) | counter. Its totals, saved position and statistics are kept by generation.progress, which
saves the position after each batch BEFORE the batch is committed to the buffer.
"""
from __future__ import annotations

import gc
import logging
import os
import threading
import time
import traceback
from typing import Callable, Optional

import numpy as np
import torch

from .. import wire
from ..config import Config
from ..shm import BufferSpaceError, BufferSpec, SharedActivationBuffer
from .placement import device_identity, poisons_context
from .progress import Progress
from .source import BatchInfo, RowSource
from .status import Status
from .threads import tokenizer_threads

log = logging.getLogger(__name__)
POISONED_EXIT = 75  # exit code of a worker process whose CUDA context a failure has made unusable


def make_source(cfg: Config, spec: BufferSpec, device: str, index: int, count: int = 1,
                start: Optional[dict] = None) -> RowSource:
    """The source of generator `index` (g) of `count` (G), continuing from a saved state `start` if given."""
    if cfg.generator.source == "store":  # replay: no model, no tokenizer
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


def release_source(source: Optional[RowSource]) -> None:
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


class Generator:
    """Generator `index` (g) of `count` (G) on `device`: its source's rows into the buffer of `spec`
    until `stop` is set, with the failure policy of the module docstring."""

    def __init__(self, cfg: Config, spec: BufferSpec, device: str, index: int, count: int,
                 stop: threading.Event, startup_attempts: int = 3, max_backoff_s: float = 30.0,
                 on_poisoned: Callable[[int], None] = exit_process):
        self.cfg, self.spec, self.device, self.index, self.count, self.stop = cfg, spec, device, index, count, stop
        self.startup_attempts, self.max_backoff_s, self.on_poisoned = startup_attempts, max_backoff_s, on_poisoned
        self.name = f"{device.replace(':', '')}-w{index}"  # stable across restarts of the worker process
        self.status = Status(spec, self.name, device, cfg.generator.source)
        self.buffer: Optional[SharedActivationBuffer] = None
        self.progress: Optional[Progress] = None
        self.store = None  # the store writer, when store.write
        self.produced = 0  # rows the current source has written
        self.failures = 0  # sources in a row that failed before producing a row
        self.backoff = 1.0  # seconds to wait before the next source is built

    def run(self) -> None:
        """Generate until `stop`. Every way out is published in the status: 'stopped', 'failed' (with the
        error), or 'crashed' for an error outside the restart loop itself (logged and re-raised)."""
        self._open()
        try:
            self._supervise()
        except BaseException as e:  # a bug in the loop itself: never silent
            self.status.update(force=True, state="crashed", last_error=f"{type(e).__name__}: {e}")
            log.critical("generator %s loop crashed: %s\n%s", self.name, e, traceback.format_exc())
            raise
        finally:
            self._close()

    def _open(self) -> None:
        """Attach the buffer, load the saved progress, open the store writer (None unless store.write)."""
        try:
            self.buffer = SharedActivationBuffer.attach(self.spec)
            self.progress = Progress(self.cfg, self.spec, self.name, self.index, self.count)
        except BaseException as e:
            self.status.update(force=True, state="failed", last_error=f"cannot start: {type(e).__name__}: {e}")
            raise
        self.status.update(force=True, position=self.progress.position(), threads=torch.get_num_threads(),
                           tokenizer_threads=tokenizer_threads(), **device_identity(self.device))
        if self.buffer.reserved:  # map the rows ahead of this writer while the model loads; a sparse buffer
            self.buffer.populate_in_background(self.stop)  # (buffer.reserve=false) allocates slot by slot as it writes
        self.store = _open_store_writer(self.cfg, self.spec, self.index, self.count, self.status)

    def _close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.status.update(force=True, store_writer=self.store.state())
        try:
            self.progress.close()  # the statistics thread folds what it holds; the totals are saved
        except Exception as e:  # noqa: BLE001 - stopping must not fail on a full disk
            log.warning("generator %s: could not save its statistics: %s", self.name, e)
        self.buffer.close()

    def _supervise(self) -> None:
        """Build and drain one source after another until `stop`, or until the failure policy gives up."""
        source = None
        while not self.stop.is_set():
            self.produced = 0
            try:
                self.status.update(force=True, state="loading")
                source = make_source(self.cfg, self.spec, self.device, self.index, self.count, self.progress.start())
                self.status.update(force=True, state="running")
                self._drain(source)
            except Exception as e:  # a failing source must not take the server down
                if not self._recover(e):
                    return
            finally:
                release_source(source)  # the old model goes before a new one is built
                source = None
            if self.status.d["state"] == "restarting":
                self.stop.wait(self.backoff)
        self.status.update(force=True, state="stopped")

    def _drain(self, source: RowSource) -> None:
        """Write every batch of `source` until it ends (then it is rebuilt) or `stop` is set."""
        fresh = getattr(source, "fresh_rows", False)  # each batch in new memory: nothing to wait for
        for rows, origin, info in source:
            self.progress.before_commit(rows, info)
            n = self._write(rows, origin, info.get("provenance"))
            if self.store is not None:
                self._copy_to_store(rows, origin, info, n)
            if "store" in info:  # replaying a store: pass, shard, bad shards
                self.status.d["store_replay"] = info["store"]
            self.produced += n
            self._count(n, info)
            if not fresh:  # the statistics thread is done with these rows before the source reuses them
                self.progress.settle()
            if self.stop.is_set():
                return
        log.warning("generator %s: source ended; restarting it", self.name)

    def _write(self, rows: torch.Tensor, origin: Optional[np.ndarray], provenance: Optional[dict]) -> int:
        """Write every row, pausing while the buffer's filesystem (or memory) is full and resuming when
        space returns; the pause and its reason are in the status. Returns rows written."""
        done, paused = 0, False
        while done < len(rows):
            try:
                done += self.buffer.write(rows[done:], None if origin is None else origin[done:], self.stop,
                                          on_wait=self._waiting, provenance=_tail(provenance, done))
                if self.stop.is_set():
                    break
            except BufferSpaceError as e:
                done += e.done
                if not paused:
                    log.error("generator %s: writing paused: %s", self.name, e)
                    paused = True
                self.status.update(force=True, state="paused", last_error=str(e),
                                   paused_since=self.status.d.get("paused_since") or time.time())
                if self.stop.wait(1.0):
                    break
        if paused:
            log.info("generator %s: space is back; writing resumed", self.name)
            self.status.update(force=True, state="running", paused_since=None)
        return done

    def _waiting(self) -> None:
        """While the buffer is full: keep the status and the statistics fresh."""
        self.status.update()
        self.progress.publish_stats()

    def _copy_to_store(self, rows: torch.Tensor, origin: np.ndarray, info: BatchInfo, n: int) -> None:
        """The `n` rows just written to the buffer, once, to the store."""
        self.store.put(rows[:n], origin[:n], _head(info.get("provenance"), n), self.stop,
                       on_wait=lambda: self.status.update(store_writer=self.store.state()))
        self.status.d["store_writer"] = self.store.state()

    def _count(self, n: int, info: BatchInfo) -> None:
        """Add a written batch to the buffer's context count and to the status (the first batch at once)."""
        d = self.status.d
        self.buffer.note_contexts(info.get("contexts", 0))
        self.status.update(force=self.produced == n,
                           rows_written=d["rows_written"] + n,
                           contexts=d["contexts"] + info.get("contexts", 0),
                           tokens=d["tokens"] + info.get("tokens", 0),
                           corpus_passes=info.get("corpus_passes", d["corpus_passes"]),
                           rows_overflowed=d["rows_overflowed"] + info.get("rows_overflowed", 0),
                           position=self.progress.position())

    def _recover(self, e: Exception) -> bool:
        """The failure policy after source failure `e` (called while it is handled): True to build a new
        source after `backoff` seconds, False when this generator gives up."""
        err = f"{type(e).__name__}: {e}"
        log.error("generator %s failed: %s\n%s", self.name, err, traceback.format_exc())
        if poisons_context(e):  # every later CUDA call of this process would fail: a fresh process
            self.status.update(force=True, state="restarting", last_error=err)
            log.error("generator %s: the CUDA context is unusable; ending worker process %d so that "
                      "a fresh one is started", self.name, os.getpid())
            self.on_poisoned(POISONED_EXIT)
            return False
        self.failures = 0 if self.produced else self.failures + 1
        if self.failures >= self.startup_attempts:
            self.status.update(force=True, state="failed", last_error=err)
            log.error("generator %s failed %d times before producing a row; giving up", self.name, self.failures)
            return False
        self.backoff = 1.0 if self.produced else min(self.backoff * 2, self.max_backoff_s)
        self.status.update(force=True, state="restarting", last_error=err, restarts=self.status.d["restarts"] + 1)
        return True


def run_supervised(cfg: Config, spec: BufferSpec, device: str, index: int, stop: threading.Event,
                   startup_attempts: int = 3, max_backoff_s: float = 30.0, count: int = 1,
                   on_poisoned: Callable[[int], None] = exit_process) -> None:
    """Generate into the buffer until `stop` is set, restarting the source on failure (see `Generator`).
    `index` is this generator's global number g of `count` = G."""
    Generator(cfg, spec, device, index, count, stop, startup_attempts, max_backoff_s, on_poisoned).run()


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
