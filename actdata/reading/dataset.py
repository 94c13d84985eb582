"""Trainers' side: `RemoteActivationDataset`, a torch IterableDataset over one or more actdata servers.

    ds = RemoteActivationDataset("http://127.0.0.1:8000")           # or a list of URLs; or () = $ACTDATA_URL
    for x in DataLoader(ds):                     # x: [B, *sample_shape], B = the dataset's batch size
        ...
    for x in DataLoader(ds, batch_size=1024, num_workers=4):        # x: [1024, *sample_shape]
        ...
    DataLoader(ds, batch_size=None, num_workers=4)                  # the same batches as the first form

The three forms, and how each is read:
- `batch_size=None`: each item the dataset yields is a batch `[batch_size, *sample_shape]`.
- `DataLoader(ds)` (the DataLoader's default batch_size=1) and `batch_size=B`: the dataset yields one
  placeholder per row; the DataLoader's collate (torch's `default_collate`, which dispatches on the
  placeholder's type) then fetches the whole batch in one request (split into several when B is above the
  server's per-request maximum). A DataLoader batch of one placeholder means one batch of the dataset's
  `batch_size`, so `DataLoader(ds)` yields `[batch_size, *sample_shape]`, never `[1, ...]`. Which form it
  is, the dataset learns from the fetcher that calls `iter()` on it; a custom `collate_fn` gets rows.
- `ds.batch_size`: None (the default) asks the server (`GET /stats`, once per worker) for its per-request
  maximum and capacity and uses min(4096, that maximum, half the buffer). An explicit size above the
  maximum is read in several requests.

How the work is split: each DataLoader worker of each DDP rank is one *shard*
(`shard = rank * num_workers + worker_id` of `rank_count * num_workers`). With at least as many shards as
URLs, shard i reads `urls[i % len(urls)]`; with fewer, shard i reads `urls[i::shards]` in turn, so every
URL is read. `max_batches` / `max_samples` are totals over all shards, split as evenly as possible, so the
rows yielded by all workers of all ranks add up to the number asked for.

The fast paths: on the server's own host (its buffer file opens, see actdata.local) rows are claimed from
the shared buffer and gathered straight into the batch; `local=False` forces HTTP, and anything unusual
falls back to HTTP with one log line. Over HTTP a keep-alive `http.client` connection
(`actdata.client.TensorReader`) reads each response body with `readinto` straight into the batch. Without
DataLoader workers (or with one) the next batches are read ahead by threads while the trainer works on the
current one: two over HTTP, on two connections, so that both of the server's HTTP processes work; one on
the same-host path. Inside a DataLoader worker the batch is read into shared memory that the main process
maps once and the worker reuses once the main process has dropped the batch (actdata.batches), so handing
it over costs neither a copy nor fresh memory. Connections and attached buffers are made inside the worker
on first use; the dataset object holds only strings and numbers and pickles cleanly. Batches read ahead
when the loop stops are dropped (their rows count as served), as a DataLoader's prefetched batches are.

Resuming: `state_dict()` / `load_state_dict()` (torchdata's StatefulDataLoader calls them per worker) keep
the rows and batches a shard has delivered, so a resumed run's `max_samples` / `max_batches` budget
continues where it stopped.

A single URL may be a cluster's directory (`python -m actdata.cluster`): each shard then reads its share
of the servers the directory lists and moves to another when one dies (see actdata.discovery).

Failures: connection errors, timeouts and 503 (waiting Retry-After) are retried with backoff for up to
`retry_for_s` seconds — long enough to ride out a server restart — then `ServerUnavailable` names the URL.
A 4xx (e.g. a wrong API key) raises `ActivationServerError` at once.
"""
from __future__ import annotations

import itertools
import logging
import queue
import sys
import threading
import time
from concurrent.futures import Future
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate_fn_map

try:  # torch's fetcher class, to recognise a DataLoader calling iter(); without it every form gets batches
    from torch.utils.data._utils.fetch import _BaseDatasetFetcher
except ImportError:  # pragma: no cover - a torch that moved it
    _BaseDatasetFetcher = None

from .. import wire
from .batchslots import worker_pool
from ..auth import resolve_api_key
from .sharding import distributed_rank_world, share, split_evenly
from .client import ActivationClient, ProvenanceBatch, RetryPolicy, TensorReader, resolve_url

log = logging.getLogger(__name__)
DEFAULT_RCVBUF = None  # kernel autotuning: a 16 MiB SO_RCVBUF measured no better on loopback
DEFAULT_BATCH = 4096  # rows per batch when batch_size is None, unless the server allows fewer


def resolve_urls(url_or_urls: Union[None, str, Sequence[str]]) -> list[str]:
    """A list of server URLs from one URL, a list, or None ($ACTDATA_URL, else http://localhost:8000)."""
    urls = [url_or_urls] if url_or_urls is None or isinstance(url_or_urls, str) else list(url_or_urls)
    if not urls:
        raise ValueError("RemoteActivationDataset needs at least one URL")
    return [resolve_url(u) for u in urls]


class _Source:
    """One server as seen by one shard: its row format and per-request maximum (from `GET /stats`, asked
    once), its same-host reader when the buffer is reachable, else its HTTP reader."""

    def __init__(self, url: str, ds: "RemoteActivationDataset", retry: RetryPolicy, http=None):
        self.url, self.ds = url, ds
        client = ActivationClient(url, api_key=ds.api_key, timeout=ds.timeout, retry_for_s=ds.retry_for_s)
        try:
            st = client.get_stats()
        finally:
            client.close()
        self.sample_shape = tuple(int(x) for x in st["sample_shape"])
        self.dtype = wire.DTYPES[st["dtype"]]
        server = st.get("server", {})
        self.max_rows = max(1, int(server.get("max_samples_per_request") or st["capacity"]))
        self.half_capacity = max(1, int(st["capacity"]) // 2)
        self.http = http or TensorReader(url, ds.api_key, timeout=ds.timeout, retry=retry, rcvbuf=ds.rcvbuf)
        self.directory = http is not None
        if http is not None:  # a cluster's directory: rows come from whichever of its servers serves
            self.local = None
            return
        self.local = None
        if ds.local:
            from .samehost import open_same_host

            self.local, why = open_same_host(server.get("same_host"))
            if self.local is None:
                (log.debug if "another host" in why else log.warning)(
                    "%s: same-host path not used (%s); reading over HTTP", url, why)

    def read(self, n: int, empty: Callable) -> torch.Tensor:
        """n rows [n, *sample_shape] in the served dtype, in requests of at most max_rows."""
        if n <= self.max_rows and self.local is None:
            return self.http.fetch(n, empty=empty)[0]
        out = empty((n, *self.sample_shape), dtype=self.dtype)
        for a in range(0, n, self.max_rows):
            self._read_into(out[a:a + self.max_rows])
        return out

    def read_provenance(self, n: int) -> ProvenanceBatch:
        """n rows with their provenance, over HTTP (one safetensors body per request of at most max_rows)."""
        parts = [self.http.fetch_provenance(min(self.max_rows, n - a)) for a in range(0, n, self.max_rows)]
        if len(parts) == 1:
            return parts[0]
        return ProvenanceBatch(*(torch.cat(xs) for xs in zip(*parts)))

    def _read_into(self, out: torch.Tensor) -> None:
        if self.local is not None:
            from .samehost import SameHostGone

            try:
                self.local.read(out, wait_s=self.ds.retry_for_s)
                return
            except SameHostGone as e:
                log.warning("%s: same-host path stopped (%s); reading over HTTP", self.url, e)
                self.local.close()
                self.local = None
        self.http.fetch(len(out), out=out)

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


class _Stream:
    """One shard's iteration: its sources, its budget and how much of it was delivered."""

    def __init__(self, ds: "RemoteActivationDataset", resume: Optional[dict]):
        self.index, shards, self.urls = ds.shard()  # this shard's place among the trainer's readers
        index = self.index
        self.ds = ds
        self.max_batches = split_evenly(ds.max_batches, shards, index)
        self.max_samples = split_evenly(ds.max_samples, shards, index)
        resume = resume or {}
        self.rows, self.batches = int(resume.get("rows", 0)), int(resume.get("batches", 0))
        self.in_worker = get_worker_info() is not None
        self.retry = RetryPolicy(ds.retry_for_s, stop=threading.Event())
        self.sources: list[_Source] = []  # opened on the first batch, inside the worker
        self.ahead: Optional[_ReadAhead] = None  # the batches being read ahead (see _ReadAhead)
        self.drop_last = False  # DataLoader(..., batch_size=B, drop_last=True): no batch under B rows

    def open(self) -> None:
        if not self.sources:
            self.sources = self._directory() or self._sources(prefer=None)
            for s in self.sources:  # the shard's first reader (TensorReader.prefer; lanes: _sources)
                if not s.directory:
                    s.http.prefer = self.index * max(1, self._depth())

    def _sources(self, prefer: Optional[int]) -> list["_Source"]:
        """A reader of each of this shard's servers; `prefer`: its place among the trainer's readers."""
        out = [_Source(u, self.ds, self.retry) for u in self.urls]
        for s in out:
            s.http.prefer = prefer
        return out

    def _directory(self) -> Optional[list["_Source"]]:
        """A single URL that is a cluster's directory (actdata.discovery): one source reading from the
        servers it lists for this shard, moving to another when one fails. None for server URLs."""
        if len(self.ds.urls) != 1:
            return None
        from .directory import DirectoryReader, is_directory

        ds = self.ds
        if not is_directory(ds.urls[0], ds.api_key, timeout=min(ds.timeout, 10.0), retry_for_s=ds.retry_for_s):
            return None
        index, shards, _ = ds.shard()
        reader = DirectoryReader(ds.urls[0], index, shards, ds.api_key, timeout=ds.timeout,
                                 retry_for_s=ds.retry_for_s, rcvbuf=ds.rcvbuf)
        return [_Source(reader.first_server(), ds, self.retry, http=reader)]

    @property
    def batch_size(self) -> int:
        """The dataset's batch size, or min(DEFAULT_BATCH, every source's per-request maximum, half its
        buffer): a default batch never waits for a completely full buffer."""
        if self.ds.batch_size is not None:
            return self.ds.batch_size
        self.open()
        return min(DEFAULT_BATCH, *(min(s.max_rows, s.half_capacity) for s in self.sources))

    def exhausted(self) -> bool:
        return ((self.max_batches is not None and self.batches >= self.max_batches)
                or (self.max_samples is not None and self.rows >= self.max_samples))

    def next_batch(self, n: int) -> Optional[torch.Tensor]:
        """The next batch of n rows (fewer when the sample budget ends), or None when the budget is spent.
        The batches after it are read meanwhile (see _ReadAhead), as far as the budget allows."""
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
            self.ahead = _ReadAhead(lanes, self._read)
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

    def _upcoming(self, n: int) -> list[tuple[int, int]]:
        """(index, rows) of the batches after those delivered, as deep as the read-ahead goes and the
        budget allows, each of n rows (the last fewer when max_samples ends within it, none with drop_last)."""
        out, rows = [], self.rows
        for i in range(self.batches, self.batches + len(self.ahead.lanes)):
            k = n if self.max_samples is None else min(n, self.max_samples - rows)
            if k <= 0 or (self.drop_last and k < n) or (self.max_batches is not None and i >= self.max_batches):
                break
            out.append((i, k))
            rows += k
        return out

    def _read(self, sources: list["_Source"], index: int, n: int):
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


class _ReadAhead:
    """Reads the next batches in daemon threads while the caller uses the current one, as DataLoader
    workers do, without processes: in the main process (`num_workers=0`, or the dataset iterated
    directly) or a lone worker, a request otherwise waits for the server's gather and then the transfer
    while the trainer idles. Batch i is read by lane i % lanes; a lane is one thread with its own sources
    (lane 0: the stream's; others: their own connections, opened on first use), so no reader is ever used
    by two threads at once. A batch read ahead and not taken (the loop stopped, or another batch size was
    asked) is dropped: its rows count as served."""

    def __init__(self, lanes: list[Callable[[], list]], read: Callable):
        self.lanes = [_Lane(make) for make in lanes]
        self.read = read
        self.pending: dict[int, tuple[int, Future]] = {}  # batch index -> (rows, its read)

    def _submit(self, i: int, n: int) -> Future:
        return self.lanes[i % len(self.lanes)].submit(lambda sources: self.read(sources, i, n))

    def plan(self, batches: list[tuple[int, int]]) -> None:
        for i, n in batches:
            if i not in self.pending:
                self.pending[i] = (n, self._submit(i, n))

    def take(self, i: int, n: int):
        """Batch i of n rows: the read ahead (its exception, if it failed), else read now."""
        got = self.pending.pop(i, None)
        if got is None or got[0] != n:
            if got is not None:
                got[1].exception()  # another size was asked: wait for the read, drop its batch
            got = (n, self._submit(i, n))
        return got[1].result()

    def idle(self, wait_s: float) -> bool:
        """Whether no read is running, after waiting up to wait_s seconds for them to end."""
        deadline = time.monotonic() + wait_s
        for i, (_, fut) in list(self.pending.items()):
            try:
                fut.exception(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return False
            del self.pending[i]
        return True

    def sources(self) -> list:
        return [s for lane in self.lanes for s in (lane.sources or [])]

    def close(self, join_s: float = 0.0) -> None:
        """End the lanes' threads: each after the read it is running, if any; waits up to join_s seconds
        for them (idle lanes end at once, so a stream closed after its reads leaves no thread behind)."""
        for lane in self.lanes:
            lane.jobs.put(None)
        deadline = time.monotonic() + join_s
        for lane in self.lanes:
            if lane.thread is not threading.current_thread():  # (a close from a finalizer run in a lane)
                lane.thread.join(max(0.0, deadline - time.monotonic()))


class _Lane:
    """One read-ahead thread and the sources it reads with (made by `make` in the thread, on first use)."""

    def __init__(self, make: Callable[[], list]):
        self.make, self.sources = make, None
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="actdata-read-ahead", daemon=True)
        self.thread.start()

    def submit(self, fn: Callable) -> Future:
        fut: Future = Future()
        self.jobs.put((fut, fn))
        return fut

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            fut, fn = job
            try:
                if self.sources is None:
                    self.sources = self.make()
                fut.set_result(fn(self.sources))
            except BaseException as e:  # re-raised where the batch is taken
                fut.set_exception(e)


class PendingRow:
    """A row of a DataLoader batch not read yet: the collate reads all rows of the batch in one request
    (see `collate_pending`). The same object stands for every row of a stream."""

    __slots__ = ("stream",)

    def __init__(self, stream: _Stream):
        self.stream = stream


def collate_pending(batch: list, *, collate_fn_map=None) -> torch.Tensor:
    """default_collate for PendingRow: one batch of len(batch) rows (of the dataset's batch size when the
    DataLoader batch is one placeholder: `DataLoader(ds)`). Ends the stream when its budget is spent."""
    stream = batch[0].stream
    x = stream.next_batch(len(batch) if len(batch) > 1 else stream.batch_size)
    if x is None:
        raise StopIteration  # the fetcher turns this into the end of the shard's stream
    return x


default_collate_fn_map[PendingRow] = collate_pending  # torch's documented way to extend default_collate


def _calling_fetcher(depth: int = 2) -> Optional[_BaseDatasetFetcher]:
    """The DataLoader fetcher calling iter() on the dataset, if that is who calls (torch.utils.data and
    torchdata's StatefulDataLoader both use torch's fetchers); None for any other caller."""
    try:
        caller = sys._getframe(depth).f_locals.get("self")
    except ValueError:
        return None
    return caller if _BaseDatasetFetcher is not None and isinstance(caller, _BaseDatasetFetcher) else None


class RemoteActivationDataset(IterableDataset):
    """Batches `[batch_size, *sample_shape]` read from one or more actdata servers (see the module docstring
    for the DataLoader forms). Keeps only configuration: urls (None = $ACTDATA_URL or localhost:8000),
    batch_size (None = min(4096, the server's per-request maximum, half its buffer)), max_batches,
    max_samples, dtype (None = as served; else converted on the client), api_key (else $ACTDATA_API_KEY), timeout (seconds per
    socket operation), retry_for_s (seconds of retrying before an error), rcvbuf (SO_RCVBUF bytes; None =
    kernel autotuning), rank / world_size (None = from torch.distributed or $RANK / $WORLD_SIZE), local
    (False = HTTP even on the server's host), provenance (True = each batch is a `ProvenanceBatch`
    (activations, token_ids, positions, doc_ids), read over HTTP; the server needs
    generator.provenance=true). The last batch of a shard is smaller when `max_samples` does not divide
    evenly.
    """

    def __init__(self, url_or_urls: Union[None, str, Sequence[str]] = None, batch_size: Optional[int] = None,
                 max_batches: Optional[int] = None, max_samples: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None, api_key: Optional[str] = None, timeout: float = 60.0,
                 retry_for_s: float = 120.0, rcvbuf: Optional[int] = DEFAULT_RCVBUF,
                 rank: Optional[int] = None, world_size: Optional[int] = None, local: bool = True,
                 provenance: bool = False):
        super().__init__()
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.provenance = bool(provenance)
        for name, v in (("max_batches", max_batches), ("max_samples", max_samples)):
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {v}")
        if dtype is not None and dtype not in wire.DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {list(wire.DTYPE_NAMES)} or None, got {dtype}")
        self.urls = resolve_urls(url_or_urls)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.max_batches, self.max_samples = max_batches, max_samples
        self.dtype, self.api_key = dtype, resolve_api_key(api_key)
        self.timeout, self.retry_for_s, self.rcvbuf = float(timeout), float(retry_for_s), rcvbuf
        self.rank, self.world_size, self.local = rank, world_size, bool(local)
        self._dist_at_pickle: Optional[tuple[int, int]] = None
        self._resume: Optional[dict] = None  # from load_state_dict, used by the next iteration
        self._stream: Optional[_Stream] = None  # the live iteration of this process (not pickled)

    def __getstate__(self):
        # Spawned workers do not see the parent's torch.distributed state: take the rank along.
        state = self.__dict__.copy()
        state["_stream"] = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            state["_dist_at_pickle"] = distributed_rank_world()
        return state

    def _rank_world(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        live = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self._dist_at_pickle is not None and not live:
            return self._dist_at_pickle
        return distributed_rank_world()

    def shard(self) -> tuple[int, int, list[str]]:
        """(shard index, shard count, this shard's URLs) for the calling worker / rank."""
        rank, world = self._rank_world()
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        shards, index = world * workers, rank * workers + worker
        return index, shards, share(self.urls, index, shards)

    # -- resuming (torchdata's StatefulDataLoader) -----------------------------------------------------
    def state_dict(self) -> dict:
        """{"rows", "batches"} this shard has delivered in the current iteration (or the loaded state)."""
        if self._stream is not None:
            return {"rows": self._stream.rows, "batches": self._stream.batches}
        return dict(self._resume or {"rows": 0, "batches": 0})

    def load_state_dict(self, state: dict) -> None:
        """The next iteration continues this shard's budget after `state["rows"]` rows / `["batches"]`."""
        self._resume = {"rows": int(state.get("rows", 0)), "batches": int(state.get("batches", 0))}

    # -- iteration ----------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        fetcher = _calling_fetcher()
        stream = self._stream = _Stream(self, self._resume)
        self._resume = None
        if fetcher is not None and fetcher.auto_collation:
            if fetcher.collate_fn is torch.utils.data.default_collate:
                stream.drop_last = bool(fetcher.drop_last)
                return self._placeholders(stream)
            return self._rows(stream)  # a custom collate_fn gets rows, as from any dataset
        return self._batches(stream)

    @staticmethod
    def _batches(stream: _Stream) -> Iterator[torch.Tensor]:
        try:
            while (x := stream.next_batch(stream.batch_size)) is not None:
                yield x
        finally:
            stream.close()

    @staticmethod
    def _placeholders(stream: _Stream) -> Iterator[PendingRow]:
        # The budget moves only when the collate reads a batch, which also ends the stream once it is spent
        # (collate_pending), so the placeholders need no check of their own: a C iterator hands out the
        # fetcher's B placeholders per batch ~5x faster than a Python loop (B = 4096: ~0.6 ms per batch).
        try:
            if not stream.exhausted():
                yield from itertools.repeat(PendingRow(stream))
        finally:
            stream.close()

    @classmethod
    def _rows(cls, stream: _Stream) -> Iterator[torch.Tensor]:
        for x in cls._batches(stream):
            yield from x


def __getattr__(name):  # Lightning is imported only for the DataModule
    if name == "ActivationDataModule":
        from .datamodule import ActivationDataModule

        return ActivationDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_loader(ds: RemoteActivationDataset, num_workers: int = 2, pin_memory: bool = True,
                prefetch_factor: int = 2, persistent_workers: bool = True) -> DataLoader:
    """The recommended DataLoader around a dataset (batch_size=None; pin_memory only with CUDA)."""
    workers = num_workers > 0
    return DataLoader(ds, batch_size=None, num_workers=num_workers,
                      pin_memory=pin_memory and torch.cuda.is_available(),
                      prefetch_factor=prefetch_factor if workers else None,
                      persistent_workers=persistent_workers and workers)
