"""Mapping a buffer's pages ahead of use, so that neither its writer nor its readers pay page faults.

A write into a never-touched page pays a fault (allocate, zero, map), which makes a first fill far slower
than a refill. `populate_in_background` (the generator calls it as it attaches, before its model has loaded,
when the buffer's space was reserved: a sparse buffer allocates slot by slot instead) allocates and maps
the rows ahead of the writer in daemon threads, in chunks: MADV_HUGEPAGE first (2 MB pages where the
backing allows them), then MADV_POPULATE_WRITE per chunk (Linux >= 5.14; contents untouched, safe beside a
writer). A buffer file on a disk is only reserved (fallocate), not populated: that would fill the page
cache with a file that may exceed RAM. `prefault` maps the rows into a reading process (MADV_POPULATE_READ).
"""
from __future__ import annotations

import ctypes
import os
import threading
import time
from typing import Optional

from ..host import backing_fs
from .layout import PAGE

_MADV_HUGEPAGE, _MADV_POPULATE_READ, _MADV_POPULATE_WRITE = 14, 22, 23


class _Either:
    """`is_set()` of two events (the second may be None): what populate polls between chunks."""

    def __init__(self, a: threading.Event, b: Optional[threading.Event]):
        self.a, self.b = a, b

    def is_set(self) -> bool:
        return self.a.is_set() or (self.b is not None and self.b.is_set())


def _data_range(buffer) -> tuple[int, int]:
    ptr = buffer.data.data_ptr()
    return ptr & ~(PAGE - 1), ptr + buffer.spec.capacity * buffer.spec.row_bytes


def prefault(buffer, chunk_bytes: int = 64 << 20, pause_s: float = 0.001,
             stop: Optional[threading.Event] = None) -> None:
    """Map every row into this process's page table ahead of use, chunk by chunk, so that a reader's
    random gathers do not pay a minor fault on their first touch of each page. Meant for a background
    thread of each reading process; a no-op where the kernel lacks it."""
    libc = ctypes.CDLL(None, use_errno=True)
    base, end = _data_range(buffer)
    for start in range(base, end, chunk_bytes):
        if stop is not None and stop.is_set():
            return
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(min(chunk_bytes, end - start)),
                        _MADV_POPULATE_READ) != 0:
            return  # EINVAL before Linux 5.14: pages fault in lazily
        time.sleep(pause_s)


def populate(buffer, stop=None, chunk_bytes: int = 32 << 20, part: int = 0, parts: int = 1) -> int:
    """Allocate and map the row pages of this process's mapping, chunks part, part + parts, ...; returns
    bytes done. Stops early when `stop` is set. On tmpfs each chunk is first allocated with fallocate
    (which also reserves the memory) and then mapped, which is faster than MADV_POPULATE_WRITE alone."""
    start, end = _data_range(buffer)
    spec = buffer.spec
    fs = backing_fs(spec.path)
    if fs not in ("tmpfs", "hugetlbfs", "shm"):  # a disk: reserve the blocks, leave the page cache alone
        return _fallocate_rows(spec, stop, chunk_bytes, part, parts)
    libc = ctypes.CDLL(None, use_errno=True)
    if fs != "hugetlbfs" and part == 0:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)  # EINVAL: small pages
    offset = spec.layout["data"] - (buffer.data.data_ptr() - start)
    fd = os.open(spec.path, os.O_RDWR) if fs == "tmpfs" else None
    done = 0
    try:
        for at in range(start + part * chunk_bytes, end, parts * chunk_bytes):
            if stop is not None and stop.is_set():
                break
            n = min(chunk_bytes, end - at)
            if fd is not None:
                try:
                    os.posix_fallocate(fd, offset + (at - start), n)
                except OSError:
                    os.close(fd)
                    fd = None
            if libc.madvise(ctypes.c_void_p(at), ctypes.c_size_t(n), _MADV_POPULATE_WRITE) != 0:
                break  # EINVAL before Linux 5.14: pages fault in as they are written
            done += n
    finally:
        if fd is not None:
            os.close(fd)
    return done


def _fallocate_rows(spec, stop, chunk_bytes: int, part: int, parts: int) -> int:
    lay = spec.layout
    done = 0
    fd = os.open(spec.path, os.O_RDWR)
    try:
        for off in range(lay["data"] + part * chunk_bytes, lay["total"], parts * chunk_bytes):
            if stop is not None and stop.is_set():
                break
            n = min(chunk_bytes, lay["total"] - off)
            os.posix_fallocate(fd, off, n)
            done += n
    except OSError:
        pass  # a filesystem without fallocate: blocks are allocated as rows are written
    finally:
        os.close(fd)
    return done


class Populator:
    """`populate` in daemon threads (default one per 4 CPUs, 1..4), each taking every n-th chunk."""

    def __init__(self, buffer, stop: Optional[threading.Event] = None, threads: Optional[int] = None):
        n = threads or max(1, min(4, (os.cpu_count() or 1) // 4))
        self._halt = threading.Event()
        guard = _Either(self._halt, stop)  # either event ends it
        self.threads = [threading.Thread(target=populate, args=(buffer, guard), kwargs={"part": i, "parts": n},
                                         name="actdata-populate", daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        """Stop and wait for the current chunks (the map must outlive them)."""
        self._halt.set()
        for t in self.threads:
            t.join()
