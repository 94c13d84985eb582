"""Batch memory of DataLoader workers: shared memory the main process maps once and a worker reuses.

A DataLoader worker hands each batch to the main process through shared memory. Torch's own way makes a
fresh shared segment per batch, and creating, faulting in and freeing megabytes of new shared memory
costs a worker more than reading the batch off the socket. `BatchPool` keeps a few segments ("slots")
per worker instead and reuses a slot once both processes are done with the batch in it:

    worker                                          main process
    pool.empty(shape, dtype) -> a free slot as a    _rebuild: the first time a slot arrives its fd comes
      SlotBatch tensor; the reader fills it           along and is mapped once; every batch is a fresh
    the worker queue pickles it (__reduce_ex__):      tensor over the mapping, whose death (the training
      slot id, shape, dtype; sent += 1                loop and every view of it dropped) sets freed += 1

A slot is free when the worker has dropped its own tensor (a finalizer on the array under it) and
`freed == sent` (two counters in the slot's header, each written by one process only). A batch the main
process keeps (a list of batches, an unread prefetch) keeps its slot; the worker then makes another slot,
up to `max_slots` and `max_bytes`, and beyond that falls back to torch's fresh segment per batch
(`shared_empty`). Outside a DataLoader worker (num_workers=0) none of this is used. Slots are memfd
segments (Linux): nothing is left in /dev/shm when a process dies; elsewhere every batch is `shared_empty`.

A batch is a plain tensor in the main process. In the worker it is a `SlotBatch` (a tensor subclass whose
operations return plain tensors); a view or result of it pickled by user code in the worker is shared by
torch as usual, and its slot is then simply not reused until it comes back free.
"""
from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys
import threading
import weakref
from multiprocessing.reduction import DupFd
from typing import Optional

import numpy as np
import torch

from ..host import pid_alive

HEADER = 64  # slot header: uint32 sent (written by the worker), uint32 freed (written by the main process)
_PAGE = mmap.PAGESIZE
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14
_libc = None


def populate(t: torch.Tensor) -> None:
    """Fault in a fresh shared tensor's pages in one system call (best effort): page by page, the faults
    would land inside the socket read and slow it."""
    global _libc
    nbytes = t.numel() * t.element_size()
    if nbytes < (1 << 20) or not sys.platform.startswith("linux"):
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        start = t.data_ptr() & ~(_PAGE - 1)
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(t.data_ptr() + nbytes - start), _MADV_POPULATE_WRITE)
    except (OSError, AttributeError):  # an older kernel answers EINVAL, which is fine: pages fault in lazily
        pass


def shared_empty(shape: tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor in a fresh shared-memory segment (populated): what torch's worker queue
    would otherwise copy the batch into."""
    nbytes = math.prod(shape) * dtype.itemsize
    t = torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(max(nbytes, 1)), 0, shape)
    populate(t)
    return t


class _Slot:
    """One memfd segment of a worker: HEADER bytes of counters, then room for one batch."""

    def __init__(self, index: int, capacity: int):
        self.index, self.capacity = index, capacity
        self.fd = os.memfd_create(f"actdata-batch-{index}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, HEADER + capacity)
            self.mm = mmap.mmap(self.fd, HEADER + capacity)
        except OSError:
            os.close(self.fd)
            raise
        self.counters = np.frombuffer(self.mm, dtype=np.uint32, count=2)  # [sent, freed]
        self.key = (os.getpid(), index, int.from_bytes(os.urandom(8), "little"))
        self.fd_sent = False
        self.worker_holds = False
        populate(torch.frombuffer(self.mm, dtype=torch.uint8))

    def free(self) -> bool:
        return not self.worker_holds and self.counters[0] == self.counters[1]

    def _dropped(self) -> None:
        self.worker_holds = False


class SlotBatch(torch.Tensor):
    """A batch in a worker's slot. Operations on it give plain tensors; pickling it (the worker queue)
    sends the slot's id instead of the bytes (see the module docstring)."""

    __torch_function__ = torch._C._disabled_torch_function_impl
    _actdata_slot: _Slot

    def __reduce_ex__(self, protocol):
        slot = self._actdata_slot
        fd = None if slot.fd_sent else DupFd(slot.fd)
        slot.fd_sent = True
        slot.counters[0] += 1
        return _rebuild, (slot.key, fd, HEADER + slot.capacity, tuple(self.shape), self.dtype)


class BatchPool:
    """A worker's slots (see the module docstring). `empty(shape, dtype)` returns an uninitialised batch in
    a free slot, a new slot while fewer than `max_slots` slots of at most `max_bytes` together exist, or
    else a fresh shared tensor."""

    def __init__(self, max_slots: int = 6, max_bytes: int = 1 << 30):
        self.max_slots, self.max_bytes = max_slots, max_bytes
        self.slots: list[_Slot] = []
        self._lock = threading.Lock()
        self.usable = sys.platform.startswith("linux") and hasattr(os, "memfd_create")

    def empty(self, shape: tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:  # read-ahead threads of a worker (actdata.reading.readahead) ask at once
            slot = self._slot(nbytes) if nbytes and self.usable else None
            if slot is not None:
                slot.worker_holds = True
        if slot is None:
            return shared_empty(shape, dtype)
        arr = np.frombuffer(slot.mm, dtype=np.uint8, count=nbytes, offset=HEADER)
        weakref.finalize(arr, slot._dropped)  # the storage made from arr keeps it alive: runs when all views die
        t = torch.frombuffer(arr, dtype=dtype).view(shape).as_subclass(SlotBatch)
        t._actdata_slot = slot
        return t

    def _slot(self, nbytes: int) -> Optional[_Slot]:
        fits = [s for s in self.slots if s.capacity >= nbytes and s.free()]
        if fits:
            return min(fits, key=lambda s: s.capacity)
        capacity = -(-nbytes // _PAGE) * _PAGE
        if len(self.slots) >= self.max_slots or sum(s.capacity for s in self.slots) + capacity > self.max_bytes:
            return None
        try:
            self.slots.append(_Slot(len(self.slots), capacity))
        except OSError:  # no memfd here (or no memory): torch's way
            self.usable = False
            return None
        return self.slots[-1]


_pool: Optional[BatchPool] = None
_pool_pid = 0


def worker_pool() -> BatchPool:
    """This process's pool (one per DataLoader worker process, kept across epochs of persistent workers)."""
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid():
        _pool, _pool_pid = BatchPool(), os.getpid()
    return _pool


# -- the main process ----------------------------------------------------------------------------------------
class _Mapped:
    """A worker's slot as mapped in the main process."""

    def __init__(self, mm: mmap.mmap):
        self.mm = mm
        self.counters = np.frombuffer(mm, dtype=np.uint32, count=2)

    def release(self) -> None:
        self.counters[1] += 1  # only this process writes `freed`; finalizers run under the GIL


_mapped: dict[tuple, _Mapped] = {}
_mapped_lock = threading.Lock()


def _rebuild(key: tuple, fd: Optional[DupFd], size: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A plain tensor over the slot `key` (mapped on first sight) whose death frees the slot."""
    with _mapped_lock:
        m = _mapped.get(key)
        if m is None:
            if fd is None:
                raise RuntimeError(f"actdata: batch slot {key} arrived before its memory did")
            for old in [k for k in _mapped if k[0] != key[0] and not pid_alive(k[0])]:
                del _mapped[old]  # a finished worker's slots: unmapped once their last batch dies
            fd_n = fd.detach()
            try:
                m = _mapped[key] = _Mapped(mmap.mmap(fd_n, size))
            finally:
                os.close(fd_n)
    nbytes = math.prod(shape) * dtype.itemsize
    arr = np.frombuffer(m.mm, dtype=np.uint8, count=nbytes, offset=HEADER)
    weakref.finalize(arr, m.release)
    return torch.frombuffer(arr, dtype=dtype).view(shape)
