"""Replay: rows of a store (actdata.storage.format) served again, without a model or tokenizer.

`StoreSource` is the generator's source for `generator.source=store`: generator g of G takes every G-th
shard (sorted by name), shuffles its shards per pass with (store.seed, pass), and yields each shard's
rows in batches straight from a memory map of the file (no copy until the buffer's own write), with
origin and, when the shard has them, provenance arrays in info["provenance"]. Each batch carries its
position (pass, shard index in the pass's order, row after it), which the generator saves like a model
source's (actdata.generation.state): a restarted server continues the replay pass where it stopped. Each shard's
data is read by a read-ahead thread while the previous shard is served (so a cold shard comes from disk
ahead of use), its checksum checked the first time this process uses it (shards are immutable, so later
passes trust it and only read ahead): a shard that fails is logged, skipped for good, counted in the
status, and none of its rows is served. After `store.passes` passes (null = endless) the source idles.

A `datasets.Dataset.save_to_disk` directory is replayed the same way, block by block
(actdata.storage.datasets_dir).

`warm_start` fills a fresh buffer from a store before the generators start.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Iterator, Optional

import numpy as np
import torch

from ..wire import DTYPES, NUMPY, PROVENANCE, row_bytes
from .catalog import open_store
from .datasets_dir import DatasetBlocks
from .format import DATA_START, Shard, Store, StoreError, check_header, filesystem, read_header, verify_shard

log = logging.getLogger(__name__)
BATCH_BYTES = 4 << 20  # rows yielded at a time
READ_AHEAD_CHUNK = 16 << 20  # what the read-ahead thread reads at a time (one buffer, reused)


class ShardReader:
    """Rows of one shard: memory-mapped when local, read whole otherwise (`rows`, `origin`, `provenance`)."""

    def __init__(self, store: Store, shard: Shard):
        fs, _, local = filesystem(store.path)
        with fs.open(shard.file, "rb") as f:
            head = read_header(f)
        check_header(head, shard, store.sample_shape, store.dtype)
        if local:
            base = np.memmap(shard.file, np.uint8, mode="c")
        else:
            with fs.open(shard.file, "rb") as f:
                base = np.frombuffer(f.read(), np.uint8)

        def arr(e):
            return base[DATA_START + e.begin:DATA_START + e.end].view(NUMPY[e.dtype])

        words = arr(head["rows"]).reshape(shard.rows, *store.sample_shape)
        t = torch.from_numpy(words)
        self.rows = t.view(torch.bfloat16) if store.dtype == "bfloat16" else t
        self.origin = arr(head["origin"]) if "origin" in head else None
        self.provenance = {k: arr(head[k]) for k in PROVENANCE} if shard.provenance else None


class StoreSource:
    """Generator g of G replaying its share of a store; see the module docstring."""

    def __init__(self, store: Store, g: int = 0, G: int = 1, seed: int = 0, passes: Optional[int] = None,
                 batch_rows: Optional[int] = None, idle: bool = True, start: Optional[dict] = None):
        self.idle = idle
        self.start = _start_position(start)
        self.store, self.g, self.G, self.seed, self.passes = store, g, G, seed, passes
        rb = row_bytes(store.sample_shape, store.dtype)
        self.batch_rows = batch_rows or max(1, BATCH_BYTES // rb)
        self.mine = store.shards[g::G]
        self.verified: set[str] = set()
        self.bad: dict[str, str] = {}
        self._chunk: Optional[bytearray] = None
        self.blocks = DatasetBlocks(store) if store.kind == "datasets" else None
        self.st = {"path": store.path, "kind": store.kind, "generator": g, "generators": G,
                   "shards": len(self.mine), "rows_per_pass": sum(s.rows for s in self.mine), "pass": 0,
                   "shard_in_pass": 0, "rows_replayed": 0, "shards_bad": 0, "bad": {}, "state": "replaying",
                   "verify_s": 0.0, "read_ahead_s": 0.0}
        if not self.mine:
            log.warning("replay: generator %d of %d has no shard of %s (%d shards); it idles", g, G, store.path,
                        len(store.shards))

    def _check(self, shard: Shard) -> Optional[str]:
        """Runs a shard ahead of use (on the read-ahead thread): reads its data region once, so a cold shard
        is in the page cache before it is served, checking its checksum the first time this process uses
        it. Memory is bounded: one reused chunk, plus the page cache of the shard being served and the next.
        None when it may be served."""
        if self.blocks is not None:
            return None
        if self._chunk is None:
            self._chunk = bytearray(READ_AHEAD_CHUNK)
        t0 = time.perf_counter()
        if shard.file in self.verified:
            try:
                fs, _, _ = filesystem(self.store.path)
                with fs.open(shard.file, "rb") as f:
                    while f.readinto(self._chunk):
                        pass
            except Exception:  # a read error shows when the shard is opened, with its name
                pass
            self.st["read_ahead_s"] += time.perf_counter() - t0
            return None
        err = verify_shard(self.store, shard, self._chunk)
        self.st["verify_s"] += time.perf_counter() - t0
        if not err:
            self.verified.add(shard.file)
        return err

    def _open(self, shard: Shard):
        if self.blocks is not None:
            return self.blocks.read(shard)
        r = ShardReader(self.store, shard)
        return r.rows, r.origin, r.provenance

    def __iter__(self) -> Iterator[tuple[torch.Tensor, np.ndarray, dict]]:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1, thread_name_prefix="actdata-replay-ahead")
        p0, i0, r0 = self.start
        p = p0 - 1
        while self.mine and (self.passes is None or p < self.passes):
            p += 1
            self.st["pass"] = p
            order = [self.mine[j] for j in np.random.default_rng([self.seed, p, self.g]).permutation(len(self.mine))]
            todo = [(i, sh) for i, sh in enumerate(order) if sh.file not in self.bad and (p > p0 or i >= i0)]
            ahead = pool.submit(self._check, todo[0][1]) if todo else None
            for t, (i, shard) in enumerate(todo):
                self.st["shard_in_pass"] = i + 1
                err = ahead.result()
                ahead = pool.submit(self._check, todo[t + 1][1]) if t + 1 < len(todo) else None
                try:
                    if err:
                        raise StoreError(err)
                    rows, origin, prov = self._open(shard)
                except Exception as e:
                    self.bad[shard.file] = f"{type(e).__name__}: {e}" if not isinstance(e, StoreError) else str(e)
                    self.st.update(shards_bad=len(self.bad), bad={os.path.basename(k): v for k, v in self.bad.items()})
                    log.error("replay: shard %s skipped, never served: %s", shard.file, self.bad[shard.file])
                    continue
                if origin is None:
                    origin = np.full(len(rows), -1, np.int64)
                for a in range(r0 if (p, i) == (p0, i0) else 0, len(rows), self.batch_rows):
                    b = min(a + self.batch_rows, len(rows))
                    info = {"contexts": 0, "tokens": 0, "corpus_passes": p - 1, "store": self.status(b - a),
                            "position": {"pass": p, "shard": i, "row": b}}  # right after this batch
                    if prov is not None:
                        info["provenance"] = {k: v[a:b] for k, v in prov.items()}
                    yield rows[a:b], origin[a:b], info
        pool.shutdown(wait=False)
        self.st["state"] = "done" if self.mine else "idle (no shard for this generator)"
        if not self.idle:
            return
        empty = torch.empty(0, *self.store.sample_shape, dtype=DTYPES[self.store.dtype])
        while True:  # nothing more to serve; keep the loop responsive to its stop event
            time.sleep(0.5)
            yield empty, np.empty(0, np.int64), {"contexts": 0, "tokens": 0, "store": self.status(0)}

    def status(self, n: int) -> dict:
        self.st["rows_replayed"] += n
        return dict(self.st)


def _start_position(start: Optional[dict]) -> tuple[int, int, int]:
    """(pass, shard index in that pass's order, row in that shard) to continue from: a saved position
    (generator.state_dir, actdata.generation.state) or the beginning (1, 0, 0)."""
    pos = (start or {}).get("position")
    try:
        p, i, r = int(pos["pass"]), int(pos["shard"]), int(pos["row"])
    except (TypeError, KeyError, ValueError):
        return 1, 0, 0
    if min(p - 1, i, r) < 0:
        return 1, 0, 0
    log.info("replay: continuing at pass %d, shard %d of the pass, row %d", p, i + 1, r)
    return p, i, r


def make_store_source(cfg, g: int, G: int, start: Optional[dict] = None) -> StoreSource:
    """The replay source of generator g of G (the global numbering): it reads shards i % G == g, from the
    saved position `start` when there is one."""
    store = open_store(cfg.store.path, "store.path", cfg.store.column)
    return StoreSource(store, g, G, cfg.store.seed, cfg.store.passes, start=start)


def warm_start(buffer, path: str, seed: int = 0, column: Optional[str] = None) -> int:
    """Fill the buffer's free slots from the store at `path` (shards in an order shuffled by `seed`) before
    any generator runs; returns the rows written. Bad shards are skipped like in replay."""
    store = open_store(path, "buffer.warm_start", column)
    src = StoreSource(store, 0, 1, seed, passes=1, idle=False)
    free = int(buffer.stats()["free"])
    kw = {}
    import inspect

    takes_prov = "provenance" in inspect.signature(buffer.write).parameters  # rows that know their origin
    written = 0
    for rows, origin, info in src:
        if written >= free:
            break
        k = min(len(rows), free - written)
        if takes_prov and info.get("provenance") is not None:
            kw = {"provenance": {n: a[:k] for n, a in info["provenance"].items()}}
        written += buffer.write(rows[:k], origin[:k], **kw)
    return written
