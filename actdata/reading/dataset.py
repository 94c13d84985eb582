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

The fast paths: on the server's own host (its buffer file opens, see actdata.reading.samehost) rows are claimed from
the shared buffer and gathered straight into the batch; `local=False` forces HTTP, and anything unusual
falls back to HTTP with one log line. Over HTTP a keep-alive `http.client` connection
(`actdata.reading.tensor_reader.TensorReader`) reads each response body with `readinto` straight into the batch. Without
DataLoader workers (or with one) the next batches are read ahead by threads while the trainer works on the
current one: two over HTTP, on two connections, so that both of the server's HTTP processes work; one on
the same-host path. Inside a DataLoader worker the batch is read into shared memory that the main process
maps once and the worker reuses once the main process has dropped the batch (actdata.reading.batchslots), so handing
it over costs neither a copy nor fresh memory. Connections and attached buffers are made inside the worker
on first use; the dataset object holds only strings and numbers and pickles cleanly. Batches read ahead
when the loop stops are dropped (their rows count as served), as a DataLoader's prefetched batches are.

Resuming: `state_dict()` / `load_state_dict()` (torchdata's StatefulDataLoader calls them per worker) keep
the rows and batches a shard has delivered, so a resumed run's `max_samples` / `max_batches` budget
continues where it stopped.

A single URL may be a cluster's directory (`python -m actdata.cluster`): each shard then reads its share
of the servers the directory lists and moves to another when one dies (see actdata.reading.directory).

Failures: connection errors, timeouts and 503 (waiting Retry-After) are retried with backoff for up to
`retry_for_s` seconds — long enough to ride out a server restart — then `ServerUnavailable` names the URL.
A 4xx (e.g. a wrong API key) raises `ActivationServerError` at once.
"""
from __future__ import annotations

import itertools
import sys
from typing import Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate_fn_map

try:  # torch's fetcher class, to recognise a DataLoader calling iter(); without it every form gets batches
    from torch.utils.data._utils.fetch import _BaseDatasetFetcher
except ImportError:  # pragma: no cover - a torch that moved it
    _BaseDatasetFetcher = None

from .. import points as pts
from .. import wire
from ..auth import resolve_api_key
from .sharding import distributed_rank_world, share
from .stream import Shard, Stream
from .urls import resolve_urls


class PendingRow:
    """A row of a DataLoader batch not read yet: the collate reads all rows of the batch in one request
    (see `collate_pending`). The same object stands for every row of a stream."""

    __slots__ = ("stream",)

    def __init__(self, stream: Stream):
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
    max_samples, dtype (None = as served; else converted on the client), api_key (else $ACTDATA_API_KEY), timeout
    (seconds per socket operation), retry_for_s (seconds of retrying before an error), rcvbuf (SO_RCVBUF bytes; None =
    kernel autotuning), rank / world_size (None = from torch.distributed or $RANK / $WORLD_SIZE), local
    (False = HTTP even on the server's host), provenance (True = each batch is a `ProvenanceBatch`
    (activations, token_ids, positions, doc_ids), read from the same-host buffer or over HTTP; the server needs
    generator.provenance=true), group (a consumer group name, shared by all workers and ranks of this trainer:
    the trainer receives every row of the stream once, whatever other groups read; the server needs
    buffer.max_groups > 0), points (only these points of each row: indices or names as the server's
    `GET /stats` lists them, e.g. "resid_post@6" or [0, 3]; batches are then `[batch_size, len(points), width]`,
    or `[batch_size, width]` for one index or name given alone; see actdata.points). The last batch of a
    shard is smaller when `max_samples` does not divide evenly.
    """

    def __init__(self, url_or_urls: Union[None, str, Sequence[str]] = None, batch_size: Optional[int] = None,
                 max_batches: Optional[int] = None, max_samples: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None, api_key: Optional[str] = None, timeout: float = 60.0,
                 retry_for_s: float = 120.0, rcvbuf: Optional[int] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None, local: bool = True,
                 provenance: bool = False, group: Optional[str] = None, points: Optional[pts.Selection] = None):
        super().__init__()
        if points is not None:
            pts.parse(points)  # a malformed selection fails here; names are checked against the server's
        self.points = points
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.provenance = bool(provenance)
        self.group = group  # consumer group: every worker and rank of this trainer reads as it
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
        self._stream: Optional[Stream] = None  # the live iteration of this process (not pickled)

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

    def shard(self) -> Shard:
        """The calling worker's / rank's place among the trainer's readers, and its URLs."""
        rank, world = self._rank_world()
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        shards, index = world * workers, rank * workers + worker
        return Shard(index, shards, share(self.urls, index, shards))

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
        stream = self._stream = Stream(self, self._resume)
        self._resume = None
        if fetcher is not None and fetcher.auto_collation:
            if fetcher.collate_fn is torch.utils.data.default_collate:
                stream.drop_last = bool(fetcher.drop_last)
                return self._placeholders(stream)
            return self._rows(stream)  # a custom collate_fn gets rows, as from any dataset
        return self._batches(stream)

    @staticmethod
    def _batches(stream: Stream) -> Iterator[torch.Tensor]:
        try:
            while (x := stream.next_batch(stream.batch_size)) is not None:
                yield x
        finally:
            stream.close()

    @staticmethod
    def _placeholders(stream: Stream) -> Iterator[PendingRow]:
        # The budget moves only when the collate reads a batch, which also ends the stream once it is spent
        # (collate_pending), so the placeholders need no check of their own: a C iterator hands out the
        # fetcher's B placeholders per batch faster than a Python loop would.
        try:
            if not stream.exhausted():
                yield from itertools.repeat(PendingRow(stream))
        finally:
            stream.close()

    @classmethod
    def _rows(cls, stream: Stream) -> Iterator[torch.Tensor]:
        for x in cls._batches(stream):
            yield from x


def make_loader(ds: RemoteActivationDataset, num_workers: int = 2, pin_memory: bool = True,
                prefetch_factor: int = 2, persistent_workers: bool = True) -> DataLoader:
    """The recommended DataLoader around a dataset (batch_size=None; pin_memory only with CUDA)."""
    workers = num_workers > 0
    return DataLoader(ds, batch_size=None, num_workers=num_workers,
                      pin_memory=pin_memory and torch.cuda.is_available(),
                      prefetch_factor=prefetch_factor if workers else None,
                      persistent_workers=persistent_workers and workers)
