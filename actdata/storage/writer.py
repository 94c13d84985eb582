"""The store writer: rows of one generator appended to shards on background threads, listed in its manifest.

A shard is written under a temporary name and renamed once complete, then the manifest is rewritten to
list it: after a crash the manifest lists exactly the complete shards (the format is actdata.storage.format).
`StoreWriter` does the writing on its own threads behind a bounded queue: `put` copies the rows into a
reused buffer and returns at once unless `queue_mb` of rows already wait for the disk, in which case the
generator waits (nothing is dropped) and the writer's state says so. Nothing is read back from a shard:
its checksum (CRC-32C) is computed over the bytes as they are written, its statistics from the batches
in memory (or the generator's own reduction of each batch, handed to `put`).
`max_bytes` stops writing (serving goes on); so does a write error
(disk full): the partial shard is removed and the error is kept in the state.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
from collections import deque
from typing import Callable, Optional

import numpy as np
import torch

from ..config import Config
from ..stats import RunningStats, reduce_rows
from ..wire import DTYPES, NUMPY, PROVENANCE, PROVENANCE_BYTES, row_bytes
from .format import (
    CHECKSUM,
    DATA_START,
    VERSION,
    check_compatible,
    checksum,
    describe,
    filesystem,
    manifest_name,
    read_manifest,
    shard_header,
    shard_name,
    stats_to_json,
)

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 256 << 20


def batch_stats(rows: torch.Tensor, shape: tuple) -> RunningStats:
    """Statistics of one batch of rows, reduced as the generators reduce theirs (actdata.stats.reduce_rows:
    float32 chunks merged exactly into float64), so the store's statistics and the server's agree."""
    out = RunningStats(shape)
    out.add(reduce_rows(rows, out.points, out.width))
    return out


class StoreWriter:
    """Appends rows to shards of generator g in `path` on a background thread; see the module docstring.

    Kept: the shard being written (a temporary file, rows streamed into it as they arrive; its origin and
    provenance arrays in memory until it completes), the manifest's shard list and the statistics of the
    complete shards. Four threads: the caller's `put` (copies the rows into a reused buffer of a bounded
    queue), the writer (appends rows to the shard file and extends its CRC-32C over them, completes it:
    extras, header), the statistics thread (reduces each batch that has no reduction of its own, per shard;
    hands complete shards on), the publisher (fsync, rename, manifest), so that reducing and syncing one
    shard overlaps writing the next. A writer continues the shards and statistics of an earlier run of
    the same generator g found in `path` (if they describe the same rows)."""

    def __init__(self, path: str, meta: dict, shard_rows: Optional[int] = None, max_bytes: Optional[int] = None,
                 queue_mb: int = 256, keep_stats: bool = True):
        self.path, self.meta = path, dict(meta)
        self.g = int(meta["generator"])
        self.shape, self.dtype = tuple(meta["sample_shape"]), meta["dtype"]
        self.row_bytes = row_bytes(self.shape, self.dtype)
        self.shard_rows = int(shard_rows or max(1, DEFAULT_SHARD_BYTES // self.row_bytes))
        self.max_bytes, self.queue_bytes, self.keep_stats = max_bytes, queue_mb << 20, keep_stats
        self.fs, self.root, self.local = filesystem(path)
        self.fs.makedirs(self.root, exist_ok=True)
        self.shards: list[dict] = []
        self.stats = RunningStats(self.shape) if keep_stats else None
        name = manifest_name(self.g)
        prev = read_manifest(self.fs, f"{self.root}/{name}", f"store.path: {path}/{name}")
        if prev is not None:
            check_compatible(prev.fields, meta, "store.path", path)
            self.shards = list(prev.fields["shards"])
            if keep_stats and prev.stats is not None:
                self.stats = prev.stats
        for stale in self.fs.glob(f"{self.root}/.shard-g{self.g:05d}-*.tmp"):  # a crashed run's partial shard
            self.fs.rm(stale)
        self._next = 1 + max((int(s["file"].rsplit("-", 1)[1].split(".")[0]) for s in self.shards), default=-1)
        self._items: deque = deque()
        self._pending = 0
        self._cond = threading.Condition()
        self._closing = False
        self._cur = None  # the open shard: dict(file, tmp, local_tmp, f, rows, crc, origin, prov)
        self._spare: dict[int, list[torch.Tensor]] = {}  # copy buffers by row count, back from the writer
        self.st = {"path": path, "state": "writing", "generator": self.g, "shards": len(self.shards),
                   "rows": sum(s["rows"] for s in self.shards), "bytes": sum(s["bytes"] for s in self.shards),
                   "shard_rows": self.shard_rows, "queued_bytes": 0, "generator_wait_s": 0.0, "waiting": False,
                   "rows_not_stored": 0, "error": None}
        self._write_manifest()
        self._inflight = 0  # bytes of complete shards not yet published
        self._publish_q: queue.Queue = queue.Queue(maxsize=2)
        self._stats_q: queue.Queue = queue.Queue()  # bounded by queue_mb: every item in it holds queued bytes
        self._red = threading.Thread(target=self._reducer, name=f"actdata-store-stats-g{self.g}", daemon=True)
        self._red.start()
        self._pub = threading.Thread(target=self._publisher, name=f"actdata-store-publish-g{self.g}", daemon=True)
        self._pub.start()
        self._thread = threading.Thread(target=self._run, name=f"actdata-store-g{self.g}", daemon=True)
        self._thread.start()

    # -- generator side ---------------------------------------------------------------------------------
    def put(self, rows: torch.Tensor, origin: Optional[np.ndarray] = None, provenance: Optional[dict] = None,
            stop: Optional[threading.Event] = None, on_wait: Optional[Callable[[], None]] = None,
            stats: Optional[RunningStats] = None) -> None:
        """Queue rows [k, *shape] (copied) for the disk; waits while `queue_mb` are already queued.
        `stats`: the statistics of exactly these rows when the caller has reduced them already (the
        writer then does not reduce them again)."""
        k = len(rows)
        if k == 0:
            return
        if self.st["state"] != "writing":
            self.st["rows_not_stored"] += k
            return
        with self._cond:
            spare = self._spare.get(k)
            data = spare.pop() if spare else None
        if data is None:
            data = torch.empty(k, self.row_bytes // DTYPES[self.dtype].itemsize, dtype=DTYPES[self.dtype])
        data.copy_(rows.reshape(k, -1))  # converts the dtype too
        item = (data, None if origin is None else np.array(origin[:k], np.int64),
                None if provenance is None
                else {n: np.array(provenance[n][:k], NUMPY[t]) for n, t in PROVENANCE.items()},
                stats if self.keep_stats else None)
        nbytes = k * self.row_bytes
        with self._cond:
            t0 = None
            while self._pending and self._pending + nbytes > self.queue_bytes and self.st["state"] == "writing":
                if t0 is None:
                    t0 = time.perf_counter()
                    self.st["waiting"] = True
                if stop is not None and stop.is_set():
                    break
                self._cond.wait(0.05)
                if on_wait is not None:
                    on_wait()
            if t0 is not None:
                self.st["generator_wait_s"] += time.perf_counter() - t0
                self.st["waiting"] = False
            self._items.append(item)
            self._pending += nbytes
            self.st["queued_bytes"] = self._pending
            self._cond.notify_all()

    def state(self) -> dict:
        return dict(self.st)

    def close(self, timeout: Optional[float] = None) -> None:
        """Write what is queued, complete the shard in progress (a shorter last shard), stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- writer thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_num_threads(1)  # this thread only: the statistics' reductions do not contend with the generator
        while True:
            with self._cond:
                while not self._items and not self._closing:
                    self._cond.wait()
                if not self._items:
                    break
                item = self._items.popleft()
            try:
                if self.st["state"] == "writing":
                    self._append(*item)
                else:
                    self.st["rows_not_stored"] += len(item[0])
                    if self._cur is not None:  # the publisher hit an error meanwhile
                        self._fail(OSError("writing stopped"))
            except Exception as e:  # disk full, quota, lost bucket: stop writing, keep serving
                self._fail(e)
            self._stats_q.put(("release", item[0]))
        try:
            if self._cur is not None and self._cur["rows"] and self.st["state"] == "writing":
                self._finish()
        except Exception as e:
            self._fail(e)
        self._stats_q.put(None)
        self._red.join()
        self._pub.join()
        if self._cur is not None:
            self._fail(OSError("writing stopped"))
        if self.st["state"] == "writing":
            self.st["state"] = "closed"

    def _fail(self, e: Exception, cur: Optional[dict] = None) -> None:
        """Stop writing for good: remove the partial shard (`cur`, or the one being written)."""
        if not self.st["state"].startswith("stopped"):
            self.st["error"] = f"{type(e).__name__}: {e}"
            self.st["state"] = "stopped: write failed"
            log.error("store %s: writing stopped (%s); the partial shard is removed, serving goes on", self.path,
                      self.st["error"])
        if cur is None:
            cur, self._cur = self._cur, None
        self._discard(cur)

    def _discard(self, cur: Optional[dict]) -> None:
        if cur is None:
            return
        self.st["rows_not_stored"] += cur["rows"]
        for closer in (lambda: cur["f"].close(), lambda: os.unlink(cur["local_tmp"]),
                       lambda: self.fs.rm(cur["tmp"]) if not self.local else None):
            try:
                closer()
            except Exception:
                pass

    def _open(self) -> bool:
        shard_bytes = DATA_START + self.shard_rows * (self.row_bytes + 8 + PROVENANCE_BYTES)
        if self.max_bytes is not None and self.st["bytes"] + self._inflight + shard_bytes > self.max_bytes:
            self.st["state"] = "full (store.max_bytes)"
            log.warning("store %s: %d bytes stored; another shard would pass store.max_bytes=%d: writing stops, "
                        "serving goes on", self.path, self.st["bytes"], self.max_bytes)
            return False
        name = shard_name(self.g, self._next)
        self._next += 1
        tmp = f"{self.root}/.{name}.tmp"
        local_tmp = tmp if self.local else tempfile.mkstemp(prefix="actdata-shard-")[1]
        f = open(local_tmp, "wb")
        f.seek(DATA_START)
        self._cur = {"file": name, "tmp": tmp, "local_tmp": local_tmp, "f": f, "rows": 0, "origin": [], "prov": [],
                     "crc": 0}
        return True

    def _append(self, data: torch.Tensor, origin, prov, stats: Optional[RunningStats]) -> None:
        done = 0
        while done < len(data):
            if self._cur is None and not self._open():
                self.st["rows_not_stored"] += len(data) - done
                return
            cur = self._cur
            take = min(len(data) - done, self.shard_rows - cur["rows"])
            part = data[done:done + take]
            buf = part.view(torch.uint8).numpy()
            cur["f"].write(buf)
            cur["crc"] = checksum(CHECKSUM, buf, cur["crc"])
            if self.keep_stats:
                self._stats_q.put(("rows", cur, part, stats if take == len(data) else None))
            cur["origin"].append(origin[done:done + take] if origin is not None else
                                 np.full(take, -1, np.int64))
            cur["prov"].append(None if prov is None else {n: a[done:done + take] for n, a in prov.items()})
            cur["rows"] += take
            done += take
            if cur["rows"] == self.shard_rows:
                self._finish()

    def _finish(self) -> None:
        """Complete the open shard's file and hand it to the publisher (fsync, rename, manifest), so the
        writer goes on with the next shard while the disk catches up."""
        cur, f = self._cur, self._cur["f"]
        self._cur = None
        extras = {"origin": np.concatenate(cur["origin"])}
        if all(p is not None for p in cur["prov"]):
            for n in PROVENANCE:
                extras[n] = np.concatenate([p[n] for p in cur["prov"]])
        try:
            for arr in extras.values():
                f.write(arr)
                cur["crc"] = checksum(CHECKSUM, arr, cur["crc"])
            cur["size"] = f.tell()
            f.seek(0)
            f.write(shard_header(cur["rows"], self.shape, self.dtype, extras))
            f.flush()
        except Exception:
            self._cur = cur  # removed by _fail
            raise
        cur.update(provenance=len(extras) > 1, origin=None, prov=None)
        with self._cond:
            self._inflight += cur["size"]
        self._stats_q.put(("shard", cur))

    def _reducer(self) -> None:
        """The statistics of each shard's rows from the batches in memory, in the order they were written;
        a complete shard goes on to the publisher once its rows are reduced; a copy buffer goes back to
        `put` once the writer and the reduction are done with it."""
        torch.set_num_threads(1)  # this thread only: the reductions do not contend with the generator
        while True:
            msg = self._stats_q.get()
            if msg is None:
                self._publish_q.put(None)
                return
            if msg[0] == "rows":
                cur, part, given = msg[1:]
                if "stats" not in cur:
                    cur["stats"] = RunningStats(self.shape)
                try:
                    cur["stats"].merge(given if given is not None else batch_stats(part, self.shape))
                except Exception as e:  # never expected; the manifest then says it has no statistics
                    log.error("store %s: statistics of a batch failed (%s); the manifest keeps none", self.path, e)
                    cur["stats_failed"] = True
            elif msg[0] == "shard":
                self._publish_q.put(msg[1])
            else:  # "release"
                data = msg[1]
                with self._cond:
                    spare = self._spare.setdefault(len(data), [])
                    if len(spare) < 4:
                        spare.append(data)
                    self._pending -= len(data) * self.row_bytes
                    self.st["queued_bytes"] = self._pending
                    self._cond.notify_all()

    def _publisher(self) -> None:
        """Shards in the order they were completed: fsync, rename to the final name, list in the manifest."""
        while True:
            cur = self._publish_q.get()
            if cur is None:
                return
            f = cur["f"]
            try:
                if self.st["state"].startswith("stopped"):
                    raise OSError("writing stopped")
                crc, stats = cur["crc"], None if cur.get("stats_failed") else cur.get("stats")
                os.fsync(f.fileno())
                f.close()
                size = cur["size"]
                final = f"{self.root}/{cur['file']}"
                if self.local:
                    os.replace(cur["local_tmp"], final)
                else:  # object stores publish an object whole once its upload completes
                    self.fs.put_file(cur["local_tmp"], final)
                    os.unlink(cur["local_tmp"])
            except Exception as e:  # ENOSPC often shows only at fsync
                self._fail(e, cur)
                continue
            finally:
                with self._cond:
                    self._inflight -= cur["size"]
            self.shards.append({"file": cur["file"], "rows": cur["rows"], "bytes": size, CHECKSUM: crc,
                                "provenance": cur["provenance"]})
            if cur.get("stats_failed"):
                self.stats = None  # statistics of only some of the stored rows would mislead
            elif self.stats is not None and stats is not None:
                self.stats.merge(stats)
            self.st.update(shards=len(self.shards), rows=self.st["rows"] + cur["rows"], bytes=self.st["bytes"] + size)
            self._write_manifest()

    def _write_manifest(self) -> None:
        m = {**self.meta, "version": VERSION, "updated_at": time.time(), "rows": self.st["rows"],
             "bytes": self.st["bytes"],
             "stats": stats_to_json(self.stats) if self.stats is not None and self.stats.count else None,
             "shards": self.shards}
        text = json.dumps(m, separators=(",", ":"))
        final = f"{self.root}/{manifest_name(self.g)}"
        if self.local:
            tmp = f"{final}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        else:
            self.fs.pipe_file(final, text.encode())


def open_writer(cfg: Config, shape: tuple, g: int, G: int) -> Optional[StoreWriter]:
    """The store writer of generator g of G, or None when store.write is off."""
    st = cfg.store
    if not st.write:
        return None
    return StoreWriter(st.path, describe(cfg, shape, g, G), st.shard_rows, st.max_bytes, st.queue_mb, st.stats)

