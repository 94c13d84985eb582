"""Trainers' side: `RemoteActivationDataset` (a torch IterableDataset over one or more servers) and
`ActivationDataModule` (Lightning).

    ds = RemoteActivationDataset("http://127.0.0.1:8000", batch_size=4096)
    loader = DataLoader(ds, batch_size=None, num_workers=4, pin_memory=True, persistent_workers=True)
    for x in loader:          # x: [4096, *sample_shape], endless unless max_batches / max_samples
        ...

How the work is split: each DataLoader worker of each DDP rank is one *shard*
(`shard = rank * num_workers + worker_id` of `rank_count * num_workers`). With at least as many shards as
URLs, shard i reads `urls[i % len(urls)]`; with fewer, shard i reads `urls[i::shards]` in turn, so every
URL is read. `max_batches` / `max_samples` are totals over all shards, split as evenly as possible, so the
rows yielded by all workers of all ranks add up to the number asked for.

The fast path: each shard holds one keep-alive `http.client` connection (`actdata.client.TensorReader`),
opened inside the worker on first use; the dataset object itself holds only strings and numbers and
pickles cleanly. A response body is read with `readinto` straight into the tensor that is yielded. Inside a
DataLoader worker that tensor is allocated in shared memory, so handing it to the main process costs no
further copy (a plain tensor would be copied into shared memory by the worker queue). That is one copy
from socket to the batch the main process receives.

A single URL may be a cluster's directory (`python -m actdata.cluster`): each shard then reads its share
of the servers the directory lists and moves to another when one dies (see actdata.discovery).

Failures: connection errors, timeouts and 503 (waiting Retry-After) are retried with backoff for up to
`retry_for_s` seconds — long enough to ride out a server restart — then `ServerUnavailable` names the URL.
A 4xx (e.g. `batch_size` above the server's per-request maximum, a wrong API key) raises
`ActivationServerError` at once.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import sys
from typing import Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import wire
from .client import RetryPolicy, TensorReader, resolve_api_key

DEFAULT_RCVBUF = None  # kernel autotuning: a 16 MiB SO_RCVBUF measured no better on loopback


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world_size): from torch.distributed when initialised, else $RANK / $WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def split_evenly(total: Optional[int], parts: int, index: int) -> Optional[int]:
    """Part `index` of `total` split into `parts` whole numbers that differ by at most one (None: no limit)."""
    if total is None:
        return None
    return total // parts + (1 if index < total % parts else 0)


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14
_libc = None


def _populate(t: torch.Tensor) -> None:
    """Fault in a fresh shared tensor's pages in one system call (best effort). Touching 12.6 MB of new
    shared memory page by page costs ~8 ms of page faults during the socket read; populated in advance,
    ~3 ms (measured on the 2-core machine)."""
    global _libc
    nbytes = t.numel() * t.element_size()
    if nbytes < (1 << 20) or not sys.platform.startswith("linux"):
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        start = t.data_ptr() & ~4095
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(t.data_ptr() + nbytes - start), _MADV_POPULATE_WRITE)
    except (OSError, AttributeError):  # an older kernel answers EINVAL, which is fine: pages fault in lazily
        pass


def shared_empty(shape: tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor whose storage is in shared memory (populated), so that a DataLoader worker
    hands it to the main process without the copy into shared memory the worker queue would make."""
    nbytes = math.prod(shape) * dtype.itemsize
    t = torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(max(nbytes, 1)), 0, shape)
    _populate(t)
    return t


class RemoteActivationDataset(IterableDataset):
    """Batches `[batch_size, *sample_shape]` read from `GET /activations/tensor` of one or more servers.

    Use with `DataLoader(ds, batch_size=None, ...)` (the dataset batches). Keeps only configuration:
    urls, batch_size, max_batches, max_samples, dtype (None = as served; else converted on the client),
    api_key (else $ACTDATA_API_KEY), timeout (seconds per socket operation), retry_for_s (seconds of
    retrying before an error), rcvbuf (SO_RCVBUF bytes; None = kernel autotuning), rank / world_size
    (None = from torch.distributed or $RANK / $WORLD_SIZE). The last batch of a shard is smaller when
    `max_samples` does not divide evenly.
    """

    def __init__(self, url_or_urls: Union[str, Sequence[str]], batch_size: int = 4096,
                 max_batches: Optional[int] = None, max_samples: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None, api_key: Optional[str] = None, timeout: float = 60.0,
                 retry_for_s: float = 120.0, rcvbuf: Optional[int] = DEFAULT_RCVBUF,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        super().__init__()
        urls = [url_or_urls] if isinstance(url_or_urls, str) else list(url_or_urls)
        if not urls:
            raise ValueError("RemoteActivationDataset needs at least one URL")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for name, v in (("max_batches", max_batches), ("max_samples", max_samples)):
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {v}")
        if dtype is not None and dtype not in wire.DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {list(wire.DTYPE_NAMES)} or None, got {dtype}")
        self.urls = [u.rstrip("/") for u in urls]
        self.batch_size, self.max_batches, self.max_samples = int(batch_size), max_batches, max_samples
        self.dtype, self.api_key = dtype, resolve_api_key(api_key)
        self.timeout, self.retry_for_s, self.rcvbuf = float(timeout), float(retry_for_s), rcvbuf
        self.rank, self.world_size = rank, world_size
        self._dist_at_pickle: Optional[tuple[int, int]] = None

    def __getstate__(self):
        # Spawned workers do not see the parent's torch.distributed state: take the rank along.
        state = self.__dict__.copy()
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
        if shards >= len(self.urls):
            return index, shards, [self.urls[index % len(self.urls)]]
        return index, shards, self.urls[index::shards]

    def __iter__(self) -> Iterator[torch.Tensor]:
        index, shards, urls = self.shard()
        batches = split_evenly(self.max_batches, shards, index)
        samples = split_evenly(self.max_samples, shards, index)
        if batches is None and samples is None:
            n_batches = math.inf
        else:
            n_batches = min(batches if batches is not None else math.inf,
                            math.ceil(samples / self.batch_size) if samples is not None else math.inf)
        in_worker = get_worker_info() is not None
        shared_alloc = functools.partial(wire.empty_for, empty=shared_empty)  # batches born in shared memory
        retry = RetryPolicy(self.retry_for_s)
        readers = self._directory_readers(index, shards) or \
            [TensorReader(u, self.api_key, timeout=self.timeout, retry=retry, rcvbuf=self.rcvbuf) for u in urls]
        try:
            done, left = 0, samples
            while done < n_batches:
                n = self.batch_size if left is None else min(self.batch_size, left)
                if n <= 0:
                    return
                alloc = shared_alloc if in_worker and self.dtype is None else None
                x, _ = readers[done % len(readers)].fetch(n, allocate=alloc)
                if self.dtype is not None and x.dtype != self.dtype:
                    x = self._convert(x, in_worker)
                yield x
                done += 1
                left = None if left is None else left - n
        finally:
            for r in readers:
                r.close()

    def _directory_readers(self, index: int, shards: int) -> Optional[list]:
        """A single URL that is a cluster's directory (actdata.discovery): one reader over the servers it
        lists for this shard, which moves to another server when one fails. None for server URLs."""
        if len(self.urls) != 1:
            return None
        from .discovery import DirectoryReader, is_directory

        if not is_directory(self.urls[0], self.api_key, timeout=min(self.timeout, 10.0), retry_for_s=self.retry_for_s):
            return None
        return [DirectoryReader(self.urls[0], index, shards, self.api_key, timeout=self.timeout,
                                retry_for_s=self.retry_for_s, rcvbuf=self.rcvbuf)]

    def _convert(self, x: torch.Tensor, in_worker: bool) -> torch.Tensor:
        if not in_worker:
            return x.to(self.dtype)
        return shared_empty(tuple(x.shape), self.dtype).copy_(x)


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:  # the standalone package
        import pytorch_lightning as pl
    return pl


class ActivationDataModule(_lightning().LightningDataModule):
    """A LightningDataModule whose `train_dataloader()` streams from actdata server(s).

    The stream is endless (unless `max_batches` / `max_samples`): run the Trainer by `max_steps`. Each
    DDP rank reads its own share (the dataset finds its rank from torch.distributed); Lightning adds no
    sampler to an IterableDataset. Keeps: url(s), batch_size, num_workers, pin_memory, prefetch_factor,
    persistent_workers, and every other keyword for RemoteActivationDataset (dtype, api_key, timeout,
    retry_for_s, max_batches, max_samples, rcvbuf).
    """

    def __init__(self, url: Union[str, Sequence[str]], batch_size: int = 4096, num_workers: int = 2,
                 pin_memory: bool = True, prefetch_factor: int = 2, persistent_workers: bool = True,
                 **dataset_kwargs):
        super().__init__()
        self.url, self.batch_size, self.num_workers = url, batch_size, num_workers
        self.pin_memory, self.prefetch_factor, self.persistent_workers = pin_memory, prefetch_factor, persistent_workers
        self.dataset_kwargs = dataset_kwargs

    def dataset(self) -> RemoteActivationDataset:
        return RemoteActivationDataset(self.url, batch_size=self.batch_size, **self.dataset_kwargs)

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.dataset(), self.num_workers, pin_memory=self.pin_memory,
                           prefetch_factor=self.prefetch_factor, persistent_workers=self.persistent_workers)


def make_loader(ds: RemoteActivationDataset, num_workers: int = 2, pin_memory: bool = True,
                prefetch_factor: int = 2, persistent_workers: bool = True) -> DataLoader:
    """The recommended DataLoader around a dataset (batch_size=None; pin_memory only with CUDA)."""
    workers = num_workers > 0
    return DataLoader(ds, batch_size=None, num_workers=num_workers,
                      pin_memory=pin_memory and torch.cuda.is_available(),
                      prefetch_factor=prefetch_factor if workers else None,
                      persistent_workers=persistent_workers and workers)
