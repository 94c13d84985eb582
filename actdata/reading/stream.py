"""One shard's iteration of a `RemoteActivationDataset`: its servers, its budget, its batches.

`Stream` is what a DataLoader worker (or the main process) iterates: `next_batch(n)` reads the next batch
of this shard within its `max_batches` / `max_samples` share, from its servers in turn, with the batches
after it read ahead (actdata.reading.readahead) where no DataLoader workers do that already. `Source` is one
server as seen by one shard: its row format and per-request maximum (`GET /stats`, asked once) and the
reader it uses: the same-host reader (actdata.reading.samehost) when the server's buffer opens here, else
a `TensorReader` (or a cluster directory's `DirectoryReader`).
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, NamedTuple, Optional

import torch
from torch.utils.data import get_worker_info

from .. import wire
from .batchslots import worker_pool
from .client import ActivationClient
from .failures import RetryPolicy
from .readahead import ReadAhead
from .sharding import split_evenly
from .tensor_reader import ProvenanceBatch, TensorReader

log = logging.getLogger(__name__)
DEFAULT_BATCH = 4096  # rows per batch when batch_size is None, unless the server allows fewer


class Shard(NamedTuple):
    """One reader's place among a trainer's readers (every DataLoader worker of every rank) and its URLs."""

    index: int
    count: int
    urls: list[str]


class Planned(NamedTuple):
    """A batch to read ahead: its index in the stream and its rows."""

    index: int
    rows: int


class Source:
    """One server as seen by one shard: its row format and per-request maximum (from `GET /stats`, asked
    once), its same-host reader when the buffer is reachable, else its HTTP reader."""

    def __init__(self, url: str, ds, retry: RetryPolicy, http=None):
        self.url, self.ds = url, ds
        with ActivationClient(url, api_key=ds.api_key, timeout=ds.timeout, retry_for_s=ds.retry_for_s) as client:
            self.limits = client.limits()
        # with ds.points, only those points of each row (actdata.points): smaller rows, more per request
        self.picked = None if ds.points is None else self.limits.pick(ds.points)
        self.sample_shape = self.limits.sample_shape if self.picked is None else self.picked.shape
        self.dtype, self.max_rows = self.limits.dtype, self.limits.max_rows_for(self.picked)
        self.http = http or TensorReader(url, ds.api_key, timeout=ds.timeout, retry=retry, rcvbuf=ds.rcvbuf,
                                         group=ds.group)
        self.http.points = None if self.picked is None else self.picked.query
        self.directory = http is not None  # a cluster's directory: rows come from whichever of its servers serves
        self.local = None
        if ds.local and not self.directory:
            from .samehost import open_same_host

            self.local, why = open_same_host(self.limits.same_host)
            if self.local is None:
                (log.debug if "another host" in why else log.warning)(
                    "%s: same-host path not used (%s); reading over HTTP", url, why)

    def read(self, n: int, empty: Callable) -> torch.Tensor:
        """n rows [n, *sample_shape] in the served dtype, in requests of at most max_rows."""
        if n <= self.max_rows and self.local is None and self.picked is None:
            return self.http.fetch(n, empty=empty)[0]
        out = empty((n, *self.sample_shape), dtype=self.dtype)
        for a in range(0, n, self.max_rows):
            self._read_into(out[a:a + self.max_rows])
        return out

    def read_provenance(self, n: int) -> ProvenanceBatch:
        """n rows with their provenance, in parts of at most max_rows: from the same-host buffer when it
        keeps provenance, else over HTTP (one safetensors body per part)."""
        if self.local is None or not self.local.spec.provenance:
            parts = [self.http.fetch_provenance(min(self.max_rows, n - a)) for a in range(0, n, self.max_rows)]
            b = parts[0] if len(parts) == 1 else ProvenanceBatch(*(torch.cat(xs) for xs in zip(*parts)))
            return b._replace(activations=b.activations.view(n, *self.sample_shape))
        batch = ProvenanceBatch(torch.empty((n, *self.sample_shape), dtype=self.dtype),
                                **{name: torch.empty(n, dtype=dtype) for name, dtype in wire.PROVENANCE.items()})
        for a in range(0, n, self.max_rows):
            part = slice(a, a + self.max_rows)
            self._read_into(batch.activations[part], {name: getattr(batch, name)[part] for name in wire.PROVENANCE})
        return batch

    def _read_into(self, out: torch.Tensor, provenance: Optional[dict] = None) -> None:
        """Fill `out` (and `provenance`'s tensors, see SameHostReader.read) from one claim or request."""
        points = None if self.picked is None else self.picked.indices
        out = out if self.picked is None else out.view(len(out), *self.picked.wire_shape)  # as answered
        if self.local is not None:
            from .samehost import SameHostGone

            try:
                self.local.read(out, wait_s=self.ds.retry_for_s, provenance=provenance, group=self.ds.group,
                                points=points)
                return
            except SameHostGone as e:
                log.warning("%s: same-host path stopped (%s); reading over HTTP", self.url, e)
                self.local.close()
                self.local = None
        if provenance is None:
            self.http.fetch(len(out), out=out)
            return
        got = self.http.fetch_provenance(len(out))
        out.copy_(got.activations)
        for name, t in provenance.items():
            t.copy_(getattr(got, name))

    def abort(self) -> None:
        """Wake a read blocked on the network (its socket is shut down; close() still follows)."""
        abort = getattr(self.http, "abort", None)
        if abort is not None:
            abort()

    def close(self) -> None:
        self.http.close()
        if self.local is not None:
            self.local.close()
            self.local = None


class Stream:
    """One shard's iteration: its sources, its budget and how much of it was delivered."""

    def __init__(self, ds, resume: Optional[dict]):
        self.index, shards, self.urls = ds.shard()  # this shard's place among the trainer's readers
        index = self.index
        self.ds = ds
        self.max_batches = split_evenly(ds.max_batches, shards, index)
        self.max_samples = split_evenly(ds.max_samples, shards, index)
        resume = resume or {}
        self.rows, self.batches = int(resume.get("rows", 0)), int(resume.get("batches", 0))
        self.in_worker = get_worker_info() is not None
        self.retry = RetryPolicy(ds.retry_for_s, stop=threading.Event())
        self.sources: list[Source] = []  # opened on the first batch, inside the worker
        self.ahead: Optional[ReadAhead] = None  # the batches being read ahead (see ReadAhead)
        self.drop_last = False  # DataLoader(..., batch_size=B, drop_last=True): no batch under B rows

    def open(self) -> None:
        if not self.sources:
            self.sources = self._directory() or self._sources(prefer=None)
            for s in self.sources:  # the shard's first reader (TensorReader.prefer; lanes: _sources)
                if not s.directory:
                    s.http.prefer = self.index * max(1, self._depth())

    def _sources(self, prefer: Optional[int]) -> list["Source"]:
        """A reader of each of this shard's servers; `prefer`: its place among the trainer's readers."""
        out = [Source(u, self.ds, self.retry) for u in self.urls]
        for s in out:
            s.http.prefer = prefer
        return out

    def _directory(self) -> Optional[list["Source"]]:
        """A single URL that is a cluster's directory (actdata.reading.directory): one source reading from the
        servers it lists for this shard, moving to another when one fails. None for server URLs."""
        if len(self.ds.urls) != 1:
            return None
        from .directory import DirectoryReader, is_directory

        ds = self.ds
        if not is_directory(ds.urls[0], ds.api_key, timeout=min(ds.timeout, 10.0), retry_for_s=ds.retry_for_s):
            return None
        shard = ds.shard()
        reader = DirectoryReader(ds.urls[0], shard.index, shard.count, ds.api_key, timeout=ds.timeout,
                                 retry_for_s=ds.retry_for_s, rcvbuf=ds.rcvbuf, group=ds.group)
        return [Source(reader.first_server(), ds, self.retry, http=reader)]

    @property
    def batch_size(self) -> int:
        """The dataset's batch size, or min(DEFAULT_BATCH, every source's per-request maximum, half its
        buffer): a default batch never waits for a completely full buffer."""
        if self.ds.batch_size is not None:
            return self.ds.batch_size
        self.open()
        # the per-request maximum of the points read (more rows when only some points are selected)
        return min(s.limits._replace(max_rows=s.max_rows).batch(DEFAULT_BATCH) for s in self.sources)

    def exhausted(self) -> bool:
        return ((self.max_batches is not None and self.batches >= self.max_batches)
                or (self.max_samples is not None and self.rows >= self.max_samples))

    def next_batch(self, n: int) -> Optional[torch.Tensor]:
        """The next batch of n rows (fewer when the sample budget ends), or None when the budget is spent.
        The batches after it are read meanwhile (see ReadAhead), as far as the budget allows."""
        if self.exhausted():
            return None
        if self.max_samples is not None and self.max_samples - self.rows < n:
            if self.drop_last:
                return None
            n = self.max_samples - self.rows
        self.open()
        if self.ahead is None and (depth := self._depth()):
            lanes = [lambda: self.sources] + [lambda j=j: self._sources(prefer=self.index * depth + j)
                                               for j in range(1, depth)]
            self.ahead = ReadAhead(lanes, self._read)
        if self.ahead is None:
            x = self._read(self.sources, self.batches, n)
        else:
            self.ahead.plan(self._upcoming(n))
            x = self.ahead.take(self.batches, n)
        self.rows += n
        self.batches += 1
        if self.ahead is not None:
            self.ahead.plan(self._upcoming(n))  # read on while the caller works on x
        return x

    def _depth(self) -> int:
        """Batches read ahead: none in one of several DataLoader workers (the workers are the read-ahead);
        two, on two connections, when every source is a plain HTTP server (a connection's requests are
        served one after another by one server process, so one connection keeps one busy); else one."""
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            return 0
        return 2 if all(s.local is None and not s.directory for s in self.sources) else 1

    def _upcoming(self, n: int) -> list[Planned]:
        """The batches after those delivered, as deep as the read-ahead goes and the
        budget allows, each of n rows (the last fewer when max_samples ends within it, none with drop_last)."""
        out, rows = [], self.rows
        for i in range(self.batches, self.batches + len(self.ahead.lanes)):
            k = n if self.max_samples is None else min(n, self.max_samples - rows)
            if k <= 0 or (self.drop_last and k < n) or (self.max_batches is not None and i >= self.max_batches):
                break
            out.append(Planned(i, k))
            rows += k
        return out

    def _read(self, sources: list["Source"], index: int, n: int):
        """Batch `index` of this stream: n rows from source index % len(sources)."""
        source = sources[index % len(sources)]
        convert = self.ds.dtype is not None and self.ds.dtype != source.dtype
        if self.ds.provenance:
            b = source.read_provenance(n)
            return b._replace(activations=b.activations.to(self.ds.dtype)) if convert else b
        empty = worker_pool().empty if self.in_worker and not convert else torch.empty
        x = source.read(n, empty)
        if convert:
            x = worker_pool().empty(tuple(x.shape), self.ds.dtype).copy_(x) if self.in_worker else x.to(self.ds.dtype)
        return x

    def close(self) -> None:
        self.retry.stop.set()  # a read ahead in progress gives up instead of retrying
        sources = list(self.sources)
        if self.ahead is not None:
            ahead, self.ahead = self.ahead, None
            idle = ahead.idle(1.0)
            if not idle:  # a read stuck on a silent server: wake it (its socket shut), then wait again
                for s in ahead.sources():
                    s.abort()
                idle = ahead.idle(5.0)
            ahead.close(join_s=1.0 if idle else 0.0)
            if not idle:  # never unmap or close what a running read uses: left to that thread
                log.warning("a read ahead did not end; its connections are left open")
                self.sources = []
                return
            sources += [s for s in ahead.sources() if s not in sources]
        for s in sources:
            s.close()
        self.sources = []
