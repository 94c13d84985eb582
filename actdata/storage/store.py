"""The store: generated rows persisted to append-only shards, so one generation feeds many trainings.

Layout of a store directory (local, or any fsspec URL such as s3://bucket/dir):

    manifest-g00003.json          one per generator g (written only by g, rewritten atomically)
    shard-g00003-000017.safetensors   complete shards of generator g, never modified once renamed
    .shard-g00003-000018.safetensors.tmp   the shard g is writing now (removed when g starts again)

A shard is a safetensors file: `rows` [n, *sample_shape] in the buffer dtype, `origin` int64 [n] and,
when the source gave provenance, `token_ids` int32, `positions` int32, `doc_ids` int64 [n]. Its header
is padded to DATA_START bytes so the rows start on a page boundary (a memory map reads them in place).
A manifest names the model, revision, dataset, sites, layers, dtype, sample shape, the generator
partition (g of G), the running statistics of exactly the rows in its shards, and the shard list with
rows, bytes and the CRC-32 of each shard's data region. A shard is written under a temporary name and
renamed once complete, then the manifest is rewritten to list it: after a crash the manifest lists
exactly the complete shards. Readers merge every manifest of the directory (`open_store`).

`StoreWriter` does the writing on its own threads behind a bounded queue: `put` returns at once unless
`queue_mb` of rows already wait for the disk, in which case the generator waits (nothing is dropped)
and the writer's state says so. `max_bytes` stops writing (serving goes on); so does a write error
(disk full): the partial shard is removed and the error is kept in the state.

Replaying a store is in actdata/replay.py. `python -m actdata.store DIR [--verify]` inspects one.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import re
import sys
import tempfile
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from ..config import Config, ConfigError
from ..wire import row_bytes
from ..stats import RunningStats

log = logging.getLogger(__name__)

FORMAT = "actdata-store"
VERSION = 1
DATA_START = 4096  # bytes of header (8-byte length + JSON padded with spaces): rows start page-aligned
DEFAULT_SHARD_BYTES = 256 << 20
PROVENANCE = {"token_ids": np.int32, "positions": np.int32, "doc_ids": np.int64}
ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int32": "I32", "int64": "I64"}
NP_WORDS = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}  # bf16 is read as raw words
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MANIFEST_RE = re.compile(r"manifest-g(\d+)\.json$")


class StoreError(ConfigError):
    """A store that cannot be used; the message starts with the config key that named it."""


def manifest_name(g: int) -> str:
    return f"manifest-g{g:05d}.json"


def shard_name(g: int, n: int) -> str:
    return f"shard-g{g:05d}-{n:06d}.safetensors"


def filesystem(path: str):
    """(fsspec filesystem, path inside it, is_local)."""
    from fsspec.core import url_to_fs
    from fsspec.implementations.local import LocalFileSystem

    fs, root = url_to_fs(path)
    return fs, root.rstrip("/") or "/", isinstance(fs, LocalFileSystem)


def shard_header(n: int, shape: tuple, dtype: str, extras: dict[str, np.ndarray]) -> bytes:
    """The safetensors header (length + JSON, space-padded to DATA_START) for n rows followed by extras."""
    rb = row_bytes(tuple(shape), dtype)
    meta = {"__metadata__": {"format": FORMAT, "version": str(VERSION)},
            "rows": {"dtype": ST_DTYPES[dtype], "shape": [n, *shape], "data_offsets": [0, n * rb]}}
    off = n * rb
    for name, arr in extras.items():
        meta[name] = {"dtype": ST_DTYPES[str(arr.dtype)], "shape": [len(arr)], "data_offsets": [off, off + arr.nbytes]}
        off += arr.nbytes
    text = json.dumps(meta, separators=(",", ":")).encode()
    if len(text) > DATA_START - 8:
        raise ValueError("shard header does not fit in DATA_START")
    return len(text.ljust(DATA_START - 8)).to_bytes(8, "little") + text.ljust(DATA_START - 8)


def read_header(f) -> dict:
    n = int.from_bytes(f.read(8), "little")
    if not 2 <= n <= 100 << 20:
        raise ValueError(f"not a safetensors file (header length {n})")
    return json.loads(f.read(n))


def stats_to_json(stats: Optional[RunningStats]) -> Optional[dict]:
    if stats is None:
        return None
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in stats.state_dict().items()}


def stats_from_json(d: Optional[dict]) -> Optional[RunningStats]:
    return None if not d else RunningStats.from_state_dict(d)


def describe(cfg: Config, shape: tuple, g: int, G: int) -> dict:
    """What a manifest says about where its rows come from."""
    gen = cfg.generator
    return {"format": FORMAT, "version": VERSION, "source": gen.source,
            "model": {"name": cfg.model.name, "revision": cfg.model.revision, "dtype": cfg.model.dtype}
            if gen.source == "model" else None,
            "dataset": {"name": cfg.dataset.name, "config": cfg.dataset.config, "split": cfg.dataset.split}
            if gen.source == "model" else None,
            "sites": list(gen.sites) if gen.source == "model" else None,
            "layers": (gen.layers if isinstance(gen.layers, str) else list(gen.layers)) if gen.source == "model" else None,
            "context_length": gen.context_length if gen.source == "model" else None,
            "dtype": cfg.buffer.dtype, "sample_shape": list(shape), "row_bytes": row_bytes(shape, cfg.buffer.dtype),
            "generator": g, "generators": G}


# -- writing ------------------------------------------------------------------------------------------------
def batch_stats(rows: torch.Tensor, shape: tuple) -> RunningStats:
    """Statistics of one batch of rows, reduced in float32 (mean, centred sum of squares, norms) and
    returned as float64 RunningStats to be merged: 3-8x cheaper than reducing in float64, which kept the
    writer thread below the disk's speed."""
    ref = RunningStats(shape)
    x = rows.reshape(len(rows), ref.points, ref.width).float()
    mean = x.mean(dim=0)
    m2 = (x - mean).square_().sum(dim=0)
    norms = torch.linalg.vector_norm(x, dim=-1).double()  # [k, P]
    return RunningStats(shape, len(rows), mean.double().numpy(), m2.double().numpy(),
                        (norms * norms).sum(dim=0).numpy(), norms.sum(dim=0).numpy())


class StoreWriter:
    """Appends rows to shards of generator g in `path` on a background thread; see the module docstring.

    Kept: the shard being written (a temporary file, rows streamed into it as they arrive; its origin and
    provenance arrays in memory until it completes), the manifest's shard list and the statistics of the
    complete shards. Three threads: the caller's `put` (copies the rows into a bounded queue), the writer
    (appends rows to the shard file, completes it: extras, header), the publisher (CRC-32 and statistics
    of the complete shard read back from the page cache, fsync, rename, manifest) so that computing and
    syncing one shard overlaps writing the next. A writer continues the shards and statistics of an earlier run of
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
        prev = _load_json(self.fs, f"{self.root}/{manifest_name(self.g)}")
        if prev is not None:
            check_compatible(prev, meta, "store.path", path)
            self.shards = list(prev.get("shards", []))
            if keep_stats and prev.get("stats"):
                self.stats = stats_from_json(prev["stats"])
        for stale in self.fs.glob(f"{self.root}/.shard-g{self.g:05d}-*.tmp"):  # a crashed run's partial shard
            self.fs.rm(stale)
        self._next = 1 + max((int(s["file"].rsplit("-", 1)[1].split(".")[0]) for s in self.shards), default=-1)
        self._items: deque = deque()
        self._pending = 0
        self._cond = threading.Condition()
        self._closing = False
        self._cur = None  # the open shard: dict(file, tmp, local_tmp, f, rows, crc, extras, stats)
        self.st = {"path": path, "state": "writing", "generator": self.g, "shards": len(self.shards),
                   "rows": sum(s["rows"] for s in self.shards), "bytes": sum(s["bytes"] for s in self.shards),
                   "shard_rows": self.shard_rows, "queued_bytes": 0, "generator_wait_s": 0.0, "waiting": False,
                   "rows_not_stored": 0, "error": None}
        self._write_manifest()
        self._inflight = 0  # bytes of complete shards not yet published
        self._publish_q: queue.Queue = queue.Queue(maxsize=2)
        self._pub = threading.Thread(target=self._publisher, name=f"actdata-store-publish-g{self.g}", daemon=True)
        self._pub.start()
        self._thread = threading.Thread(target=self._run, name=f"actdata-store-g{self.g}", daemon=True)
        self._thread.start()

    # -- generator side ---------------------------------------------------------------------------------
    def put(self, rows: torch.Tensor, origin: Optional[np.ndarray] = None, provenance: Optional[dict] = None,
            stop: Optional[threading.Event] = None, on_wait: Optional[Callable[[], None]] = None) -> None:
        """Queue rows [k, *shape] (copied) for the disk; waits while `queue_mb` are already queued."""
        k = len(rows)
        if k == 0:
            return
        if self.st["state"] != "writing":
            self.st["rows_not_stored"] += k
            return
        data = rows.reshape(k, -1).to(TORCH_DTYPES[self.dtype])
        data = (data.clone() if data.data_ptr() == rows.data_ptr() else data).contiguous()
        item = (data, None if origin is None else np.array(origin[:k], np.int64),
                None if provenance is None else {n: np.array(provenance[n][:k], t) for n, t in PROVENANCE.items()})
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
            with self._cond:
                self._pending -= len(item[0]) * self.row_bytes
                self.st["queued_bytes"] = self._pending
                self._cond.notify_all()
        try:
            if self._cur is not None and self._cur["rows"] and self.st["state"] == "writing":
                self._finish()
        except Exception as e:
            self._fail(e)
        self._publish_q.put(None)
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
        shard_bytes = DATA_START + self.shard_rows * (self.row_bytes + 8 + 16)
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
        self._cur = {"file": name, "tmp": tmp, "local_tmp": local_tmp, "f": f, "rows": 0, "origin": [], "prov": []}
        return True

    def _append(self, data: torch.Tensor, origin, prov) -> None:
        done = 0
        while done < len(data):
            if self._cur is None and not self._open():
                self.st["rows_not_stored"] += len(data) - done
                return
            cur = self._cur
            take = min(len(data) - done, self.shard_rows - cur["rows"])
            part = data[done:done + take]
            buf = part.view(torch.uint8).numpy() if part.dtype != torch.bfloat16 else part.view(torch.int16).numpy()
            cur["f"].write(memoryview(buf).cast("B"))
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
                f.write(arr.tobytes())
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
        self._publish_q.put(cur)

    def _digest(self, cur: dict, chunk_rows: int = 4096) -> tuple[int, Optional[RunningStats]]:
        """CRC-32 of the shard's data region and statistics of its rows, read back from the page cache
        (the file was just written): this work overlaps the writer's next shard instead of delaying it."""
        mm = np.memmap(cur["local_tmp"], np.uint8, mode="c", offset=DATA_START, shape=(cur["size"] - DATA_START,))
        crc = 0
        for a in range(0, len(mm), 64 << 20):
            crc = zlib.crc32(mm[a:a + (64 << 20)], crc)
        stats = None
        if self.keep_stats:
            stats = RunningStats(self.shape)
            words = torch.from_numpy(mm[:cur["rows"] * self.row_bytes].view(NP_WORDS[self.dtype]))
            rows = (words.view(torch.bfloat16) if self.dtype == "bfloat16" else words).view(cur["rows"], *self.shape)
            for a in range(0, cur["rows"], chunk_rows):
                stats.merge(batch_stats(rows[a:a + chunk_rows], self.shape))
        del mm
        return crc, stats

    def _publisher(self) -> None:
        """Shards in the order they were completed: CRC-32 and statistics, fsync, rename to the final name,
        list in the manifest."""
        torch.set_num_threads(1)
        while True:
            cur = self._publish_q.get()
            if cur is None:
                return
            f = cur["f"]
            try:
                if self.st["state"].startswith("stopped"):
                    raise OSError("writing stopped")
                crc, stats = self._digest(cur)
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
            self.shards.append({"file": cur["file"], "rows": cur["rows"], "bytes": size, "crc32": crc,
                                "provenance": cur["provenance"]})
            if self.stats is not None and stats is not None:
                self.stats.merge(stats)
            self.st.update(shards=len(self.shards), rows=self.st["rows"] + cur["rows"], bytes=self.st["bytes"] + size)
            self._write_manifest()

    def _write_manifest(self) -> None:
        m = {**self.meta, "updated_at": time.time(), "rows": self.st["rows"], "bytes": self.st["bytes"],
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


# -- reading the layout -----------------------------------------------------------------------------------
@dataclass
class Shard:
    file: str  # full path (fsspec path inside the store's filesystem)
    rows: int
    bytes: int
    crc32: Optional[int]
    provenance: bool
    g: int = 0


@dataclass
class Store:
    """What a store holds, from its manifests: rows of `sample_shape` in `dtype`, in `shards`."""
    path: str
    kind: str  # "actdata" (shards + manifests) | "datasets" (a datasets.save_to_disk directory)
    sample_shape: tuple
    dtype: str
    shards: list
    manifests: list = field(default_factory=list)
    stats: Optional[RunningStats] = None
    column: Optional[str] = None

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


def _load_json(fs, path: str) -> Optional[dict]:
    try:
        with fs.open(path, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def check_compatible(m: dict, want: dict, key: str, path: str) -> None:
    """Raise StoreError when manifest `m` does not describe the same rows as `want`."""
    for k in ("sample_shape", "dtype", "source", "model", "dataset", "sites", "layers"):
        a, b = m.get(k), want.get(k)
        if k == "model" and a and b:
            a, b = a.get("name"), b.get("name")
        if k == "dataset" and a and b:
            a, b = a.get("name"), b.get("name")
        if a != b:
            raise StoreError(f"{key}: the store at {path} holds rows with {k}={a!r}, this config makes {k}={b!r}")


def open_store(path: Optional[str], key: str = "store.path", column: Optional[str] = None) -> Store:
    """Read a store's manifests (or a datasets directory's metadata). Raises StoreError naming `key` for a
    missing, empty or half-written store. Reads no rows."""
    if not path:
        raise StoreError(f"{key}: no store given")
    try:
        fs, root, _ = filesystem(path)
        if not fs.isdir(root):
            raise StoreError(f"{key}: {path} is not a directory")
        names = [os.path.basename(p) for p in fs.ls(root, detail=False)]
    except StoreError:
        raise
    except Exception as e:  # a bucket that does not exist, a filesystem package not installed...
        raise StoreError(f"{key}: cannot read {path}: {type(e).__name__}: {e}") from None
    manifests = sorted(n for n in names if _MANIFEST_RE.match(n))
    if not manifests:
        if "state.json" in names and "dataset_info.json" in names:
            from .replay import open_dataset_store

            return open_dataset_store(path, key, column)
        half = [n for n in names if n.endswith(".tmp")]
        raise StoreError(f"{key}: {path} holds no store manifest" +
                         (f" (only a shard being written: {half[0]})" if half else
                          " (neither manifest-g*.json nor a datasets.save_to_disk directory)"))
    ms, shards, sizes = [], [], {}
    try:
        for info in fs.ls(root, detail=True):
            sizes[os.path.basename(info["name"])] = info.get("size")
    except Exception:
        pass
    for name in manifests:
        m = _load_json(fs, f"{root}/{name}")
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise StoreError(f"{key}: {path}/{name} is not an actdata store manifest")
        if ms:
            for k in ("sample_shape", "dtype"):
                if m.get(k) != ms[0].get(k):
                    raise StoreError(f"{key}: {name} holds {k}={m.get(k)} but {manifests[0]} holds {ms[0].get(k)}")
        ms.append(m)
        for s in m.get("shards", []):
            if sizes.get(s["file"]) is None:
                raise StoreError(f"{key}: {path}: shard {s['file']} listed in {name} is missing")
            if sizes[s["file"]] != s["bytes"]:
                raise StoreError(f"{key}: {path}: shard {s['file']} is {sizes[s['file']]} bytes, {name} says {s['bytes']}")
            shards.append(Shard(f"{root}/{s['file']}", int(s["rows"]), int(s["bytes"]), s.get("crc32"),
                                bool(s.get("provenance")), int(m.get("generator", 0))))
    if not shards or not sum(s.rows for s in shards):
        raise StoreError(f"{key}: {path} holds no complete shard yet")
    stats = [stats_from_json(m.get("stats")) for m in ms]
    stats = [s for s in stats if s is not None]
    from ..stats import merged

    return Store(path, "actdata", tuple(ms[0]["sample_shape"]), ms[0]["dtype"],
                 sorted(shards, key=lambda s: s.file), ms, merged(stats) if stats else None)


def verify_shard(store: Store, shard: Shard, chunk: int = 64 << 20) -> Optional[str]:
    """None when the shard's header matches the manifest and its data CRC-32 matches; else what is wrong."""
    fs, _, _ = filesystem(store.path)
    try:
        with fs.open(shard.file, "rb") as f:
            head = read_header(f)
            if head.get("rows", {}).get("shape", [None])[0] != shard.rows:
                return f"header says {head.get('rows', {}).get('shape')} rows, manifest says {shard.rows}"
            f.seek(DATA_START)
            crc = 0
            while True:
                b = f.read(chunk)
                if not b:
                    break
                crc = zlib.crc32(b, crc)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    if shard.crc32 is not None and crc != shard.crc32:
        return f"CRC-32 {crc:08x}, manifest says {shard.crc32:08x}"
    return None


def check_store_config(cfg: Config) -> Optional[tuple]:
    """Before anything is allocated: for generator.source=store, the row shape from the store (raising
    ConfigError naming the key the config contradicts); for store.write, that an existing store in
    store.path describes the same rows. Returns the store's sample shape for source=store, else None."""
    st, b = cfg.store, cfg.buffer
    if cfg.generator.source == "store":
        s = open_store(st.path, "store.path", st.column)
        if b.dtype != s.dtype:
            raise StoreError(f"buffer.dtype: the store at {st.path} holds {s.dtype} rows, got buffer.dtype={b.dtype}")
        if b.sample_shape and tuple(int(x) for x in b.sample_shape) != s.sample_shape:
            raise StoreError(f"buffer.sample_shape: the store at {st.path} holds rows of {list(s.sample_shape)}, "
                             f"got {list(b.sample_shape)}")
        if b.activation_dim and int(b.activation_dim) != s.sample_shape[-1]:
            raise StoreError(f"buffer.activation_dim: the store at {st.path} holds rows of width "
                             f"{s.sample_shape[-1]}, got {b.activation_dim}")
        return s.sample_shape
    return None


def check_store_matches(cfg: Config, shape: tuple) -> None:
    """store.write into a directory holding rows of another kind, or buffer.warm_start from a store of other
    rows: a ConfigError naming the key (before anything is allocated)."""
    want = describe(cfg, shape, 0, 1)
    if cfg.store.write:
        try:
            fs, root, _ = filesystem(cfg.store.path)
            names = [os.path.basename(p) for p in fs.ls(root, detail=False)] if fs.isdir(root) else []
        except Exception as e:
            raise StoreError(f"store.path: cannot use {cfg.store.path}: {type(e).__name__}: {e}") from None
        for name in sorted(n for n in names if _MANIFEST_RE.match(n)):
            m = _load_json(fs, f"{root}/{name}")
            if isinstance(m, dict):
                check_compatible(m, want, "store.path", cfg.store.path)
    if cfg.buffer.warm_start:
        s = open_store(cfg.buffer.warm_start, "buffer.warm_start", cfg.store.column)
        if s.kind == "actdata":
            check_compatible(s.manifests[0], want, "buffer.warm_start", cfg.buffer.warm_start)
        elif (s.sample_shape, s.dtype) != (tuple(shape), cfg.buffer.dtype):
            raise StoreError(f"buffer.warm_start: {cfg.buffer.warm_start} holds {s.dtype} rows of "
                             f"{list(s.sample_shape)}, the buffer holds {cfg.buffer.dtype} rows of {list(shape)}")


# -- inspection -------------------------------------------------------------------------------------------
def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m actdata.store", description="Inspect an actdata store.")
    p.add_argument("path", help="the store directory (or URL)")
    p.add_argument("--verify", action="store_true", help="read every shard and check its CRC-32")
    a = p.parse_args(argv)
    try:
        s = open_store(a.path, "path")
    except StoreError as e:
        print(f"actdata.store: {e}", file=sys.stderr)
        return 2
    print(f"store {s.path} ({s.kind})")
    print(f"  rows: {s.rows:,} of {list(s.sample_shape)} {s.dtype}   shards: {len(s.shards)}   bytes: {s.bytes:,}")
    for m in s.manifests:
        print(f"  generator {m.get('generator')} of {m.get('generators')}: {len(m.get('shards', []))} shards, "
              f"{m.get('rows', 0):,} rows | source {m.get('source')} | model {m.get('model')} | "
              f"dataset {m.get('dataset')} | sites {m.get('sites')} layers {m.get('layers')}")
    if s.stats is not None:
        print("  statistics: " + json.dumps(s.stats.summary()))
    if not a.verify:
        return 0
    if s.kind != "actdata":
        print("  --verify: a datasets directory carries no shard checksums")
        return 0
    bad = 0
    t0 = time.perf_counter()
    for sh in s.shards:
        err = verify_shard(s, sh)
        if err:
            bad += 1
            print(f"  BAD {os.path.basename(sh.file)}: {err}")
    dt = time.perf_counter() - t0
    print(f"  verified {len(s.shards)} shards ({s.bytes / 1e9:.2f} GB in {dt:.1f} s): "
          + ("all match" if not bad else f"{bad} failed"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
