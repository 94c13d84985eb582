"""SharedActivationBuffer: a shared-memory tensor of activation rows that writers fill and readers drain.

What it keeps, in one memory-mapped file (POSIX shm in /dev/shm by default, any file when a path is
given) that every process attaches to by path:

    header   counters (free/ready/writing/reading counts, rows written/read, refresh epoch, ...)
    state    int8  [capacity]  FREE -> WRITING -> READY -> READING -> FREE (or READY again)
    reads    int32 [capacity]  times the row was served since it was written
    owner    int32 [capacity]  pid of the process holding a WRITING/READING claim (reclaimed if it dies)
    origin   int64 [capacity]  the context a row came from (for the batch-mixing statistic)
    free     int64 [capacity]  list of FREE slot ids (first n_free entries valid)
    ready    int64 [capacity]  list of READY slot ids (first n_ready entries valid)
    -- only with provenance (BufferSpec.provenance, generator.provenance=true); -1 where a writer gave none:
    token_ids int32 [capacity] the token at the row's position
    positions int32 [capacity] the row's position in its context (0 = BOS)
    doc_ids   int64 [capacity] the row's context id: (g << 40) | context counter of generator g, unique
                               across the generators of every node
    data     [capacity, *sample_shape] rows, page-aligned

Provenance is written with the rows, into slots the writer claimed, and read out with the rows under the
reader's claim (`read_provenance`), so it always describes the row it is served with.

State changes happen under a cross-process lock (flock on the file, which the kernel drops if its
holder dies); row copies happen outside it. A writer copies only into slots it claimed (WRITING) and a
reader only out of slots it claimed (READING), so no reader ever sees a half-written row. Picking k
random slots is O(k): a uniform sample of positions in the free/ready list, then swap-remove from the
tail. Nothing touches the data pages on creation, so start-up time does not depend on capacity.

Populating. A write into a never-touched page pays a page fault (allocate, zero, map): a first fill ran
~40x slower than a refill. `populate_in_background` (the generator calls it as it attaches, before its
model has loaded, when the buffer's space was reserved: a sparse buffer allocates slot by slot instead) allocates and maps the rows ahead of the writer in a daemon thread, in chunks, so
start-up does not wait for it: MADV_HUGEPAGE first (2 MB pages where the backing allows them: tmpfs
with transparent huge pages on `advise`; hugetlbfs pages are huge already), then MADV_POPULATE_WRITE
per chunk (Linux >= 5.14; contents untouched, safe beside a writer). A buffer file on a disk is only
reserved (fallocate), not populated: that would fill the page cache with a file that may exceed RAM.
"""
from __future__ import annotations

import ctypes
import fcntl
import glob
import math
import mmap
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ..wire import DTYPES as TORCH_DTYPES
FREE, WRITING, READY, READING = 0, 1, 2, 3
MAGIC = 0x61637464_61746131  # "actdata1"
SHM_DIR = "/dev/shm"
_PAGE = 4096
_HEADER_BYTES = _PAGE
# header slots (int64 unless noted)
(_MAGIC, _CAPACITY, _N_FREE, _N_READY, _N_WRITING, _N_READING, _WRITTEN, _READ, _EPOCH, _BATCHES,
 _CONTEXTS_SEEN, _REFRESHED) = range(12)
_RESERVED = 31  # 1 when the whole file was allocated at creation
_F_CREATED, _F_MIX_SUM, _F_RATE_IN, _F_RATE_OUT, _F_RATE_AT = 32, 33, 34, 35, 36  # float64 slots
_NONCE = 100  # int64: random, set at creation; a same-host reader checks it opened the server's own file
RATE_WINDOW_S = 5.0


def _distinct(a: np.ndarray) -> int:
    """Distinct values of a non-empty array: np.unique costs 0.47 ms for 4,096 int64 (inside the buffer's
    lock on every read), a sort and a comparison 0.04 ms."""
    s = np.sort(a)
    return int(np.count_nonzero(s[1:] != s[:-1])) + 1


class NotReady(RuntimeError):
    """The buffer cannot serve this request yet (below min_fill, or fewer READY rows than asked)."""


class BufferSpaceError(RuntimeError):
    """The filesystem behind the buffer has less free space than the buffer needs. From `write`: no
    space for the slots being written (`done` rows were written before); writing can resume later."""

    done = 0


_SPACE_ERRNOS = (28, 12, 122)  # ENOSPC, ENOMEM, EDQUOT


def _reserve(fd: int, offset: int, length: int, path: str) -> None:
    """posix_fallocate a byte range, as a BufferSpaceError naming the filesystem when space is short."""
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as e:
        if e.errno in _SPACE_ERRNOS:
            where = os.path.dirname(path) or "."
            ram = " (a tmpfs: its space is RAM)" if backing_fs(where) in ("tmpfs", "ramfs") else ""
            raise BufferSpaceError(f"no space left on {where}{ram} for the buffer ({e.strerror}); "
                                   f"lower buffer.size or free space") from None
        if e.errno in (95, 22):  # EOPNOTSUPP / EINVAL: a filesystem without fallocate: stays sparse
            return
        raise


PROVENANCE_ARRAYS = (("token_ids", np.int32), ("positions", np.int32), ("doc_ids", np.int64))


def index_bytes(capacity: int, provenance: bool = False) -> int:
    """Bytes of header and per-slot index arrays for a buffer of `capacity` rows."""
    return _layout(capacity, 0, provenance)["data"]


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _layout(capacity: int, row_bytes: int, provenance: bool = False) -> dict:
    off, out = _HEADER_BYTES, {}
    arrays = (("state", 1), ("reads", 4), ("owner", 4), ("origin", 8), ("free", 8), ("ready", 8))
    if provenance:
        arrays += tuple((name, np.dtype(t).itemsize) for name, t in PROVENANCE_ARRAYS)
    for name, itemsize in arrays:
        out[name] = off
        off = _align(off + capacity * itemsize, 64)
    out["data"] = _align(off, _PAGE)
    out["total"] = out["data"] + capacity * row_bytes
    return out


@dataclass(frozen=True)
class BufferSpec:
    """Everything a process needs to attach to a buffer; small and picklable."""

    path: str
    capacity: int
    sample_shape: tuple
    dtype: str
    min_fill: float = 0.0
    max_reads: int = 1
    provenance: bool = False  # per-slot token id, position and context id (see the module docstring)

    @property
    def row_bytes(self) -> int:
        return math.prod(self.sample_shape) * TORCH_DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return _layout(self.capacity, self.row_bytes, self.provenance)["total"]


def segment_name(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{os.urandom(4).hex()}.buf"


def owner_lock_path(path: str) -> str:
    """The owner's lock file of a buffer: flock-ed (exclusively) for as long as its server lives."""
    return path + ".owner"


def _hold_owner_lock(path: str) -> int:
    """Create `<path>.owner` already locked (made under a temporary name, locked, then renamed, so no
    one ever sees it unlocked) and return its descriptor; the lock lasts while this process or a forked
    child keeps the descriptor open, and the kernel drops it when they die (however they die, in
    whatever PID namespace)."""
    tmp = f"{owner_lock_path(path)}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, owner_lock_path(path))
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return fd


def owner_alive(path: str, legacy_grace_s: float = 0.0) -> bool:
    """Whether the server that created buffer file `path` still holds it: its owner lock is held. A
    buffer without an owner file (a server of an older version) is judged by the pid in its name and
    its age. Never judged by a pid alone when a lock exists: pids do not cross PID namespaces."""
    try:
        fd = os.open(owner_lock_path(path), os.O_RDWR)
    except FileNotFoundError:
        m = re.search(r"-(\d+)-[0-9a-f]+\.buf$", path)
        try:
            young = time.time() - os.stat(path).st_mtime < legacy_grace_s
        except OSError:
            young = False
        return young or (m is not None and pid_alive(int(m.group(1))))
    except OSError:
        return True  # cannot tell: leave it alone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock, if we got it
    return False


def _remove_with_side_files(path: str) -> list[str]:
    removed = []
    for p in [path, *glob.glob(glob.escape(path) + ".*")]:
        try:
            os.unlink(p)
            removed.append(os.path.basename(p))
        except OSError:
            pass
    return removed


def reclaim_stale(directory: str, prefix: str) -> list[str]:
    """Unlink buffer files of `prefix` (and their side files) whose owner is gone: nobody holds the
    owner lock (see `owner_alive`). Side files whose buffer file is gone are removed too."""
    pattern = re.compile(rf"^({re.escape(prefix)}-\d+-[0-9a-f]+\.buf)(\..+)?$")
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    bases = {m.group(1) for m in map(pattern.match, names) if m}
    removed = []
    for base in sorted(bases):
        path = os.path.join(directory, base)
        if not os.path.exists(path):  # side files only: a crash after unlinking, or a creation under way
            if os.path.exists(owner_lock_path(path)) and owner_alive(path):
                continue
            try:
                if any(time.time() - os.stat(p).st_mtime < 10 for p in glob.glob(glob.escape(path) + ".*")):
                    continue
            except OSError:
                continue
            removed += _remove_with_side_files(path)
        elif not owner_alive(path):
            removed += _remove_with_side_files(path)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a pid that cannot be one counts as gone)."""
    if not isinstance(pid, int) or pid <= 0:  # kill(0 or -1, 0) would ask about whole groups
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, ValueError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


_MADV_HUGEPAGE, _MADV_POPULATE_WRITE = 14, 23


class _Either:
    """`is_set()` of two events (the second may be None): what populate polls between chunks."""

    def __init__(self, a: threading.Event, b: Optional[threading.Event]):
        self.a, self.b = a, b

    def is_set(self) -> bool:
        return self.a.is_set() or (self.b is not None and self.b.is_set())


def backing_fs(path: str) -> str:
    """The filesystem type holding `path` (from /proc/mounts, longest mount point), '' if unknown."""
    path = os.path.realpath(path)
    best, fs = "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, fs = mnt, parts[2]
    except OSError:
        pass
    return fs


def host_identity() -> str:
    """This machine and process namespace as one string: hostname, kernel boot id, PID-namespace inode.
    Two processes with the same identity share pids (claims of a dead reader can be reclaimed) and, when
    they open a buffer file with the same header nonce, its memory."""
    import socket

    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    try:
        pidns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pidns = "?"
    return f"{socket.gethostname()}/{boot}/{pidns}"


def mem_available() -> Optional[int]:
    """MemAvailable from /proc/meminfo, in bytes (None where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_space(path: str, nbytes: int) -> None:
    """Raise BufferSpaceError when the filesystem holding `path` cannot hold `nbytes` more. A tmpfs
    (such as /dev/shm) is RAM: its free space counts only up to the memory available right now."""
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    st = os.statvfs(directory)
    free, what = st.f_bavail * st.f_frsize, "free"
    if backing_fs(directory) in ("tmpfs", "ramfs", "shm"):
        avail = mem_available()
        if avail is not None and avail < free:
            free, what = avail, "free (the memory available: a tmpfs lives in RAM)"
    if nbytes > free:
        raise BufferSpaceError(
            f"buffer.size: the buffer needs {nbytes / 1e9:.2f} GB but {directory} has {free / 1e9:.2f} GB {what}; "
            "lower buffer.size or point buffer.path at a larger filesystem")


class ProcessLock:
    """Exclusive lock across processes (flock) and threads; re-opened after fork, freed if a holder dies."""

    def __init__(self, path: str):
        self.path, self._pid, self._fd, self._thread_lock = path, None, None, threading.Lock()

    def __enter__(self):
        if self._pid != os.getpid():  # first use in this process (or after fork): own descriptor
            self._thread_lock = threading.Lock()
            self._fd, self._pid = os.open(self.path, os.O_RDWR), os.getpid()
        self._thread_lock.acquire()
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()

    def close(self):
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._pid = None


class SharedActivationBuffer:
    """A fixed-capacity pool of activation rows in shared memory. See the module docstring."""

    def __init__(self, spec: BufferSpec, _mm: mmap.mmap, owner: bool):
        self.spec, self.owner, self._mm = spec, owner, _mm
        cap, lay = spec.capacity, _layout(spec.capacity, spec.row_bytes, spec.provenance)
        self._h = np.frombuffer(_mm, np.int64, _HEADER_BYTES // 8, 0)
        self._hf = np.frombuffer(_mm, np.float64, _HEADER_BYTES // 8, 0)
        if self._h[_MAGIC] not in (0, MAGIC) or (self._h[_MAGIC] == MAGIC and self._h[_CAPACITY] != cap):
            raise ValueError(f"{spec.path} is not an actdata buffer of capacity {cap}")
        self._state = np.frombuffer(_mm, np.int8, cap, lay["state"])
        self._owner = np.frombuffer(_mm, np.int32, cap, lay["owner"])
        self._reads = np.frombuffer(_mm, np.int32, cap, lay["reads"])
        self._origin = np.frombuffer(_mm, np.int64, cap, lay["origin"])
        self._free = np.frombuffer(_mm, np.int64, cap, lay["free"])
        self._ready = np.frombuffer(_mm, np.int64, cap, lay["ready"])
        self._prov = {name: np.frombuffer(_mm, t, cap, lay[name]) for name, t in PROVENANCE_ARRAYS} \
            if spec.provenance else None
        raw = torch.frombuffer(_mm, dtype=torch.uint8, count=cap * spec.row_bytes, offset=lay["data"])
        self.data = raw.view(TORCH_DTYPES[spec.dtype]).view(cap, *spec.sample_shape)
        self._bytes = raw.numpy().reshape(cap, spec.row_bytes)  # the same rows as raw bytes
        self._lock = ProcessLock(spec.path)
        self._owner_lock_fd, self._reserved_all = None, bool(self._h[_RESERVED])
        self._space_fd, self._space_pid, self._allocated = None, None, None
        self._rng_pid, self._rng = None, None
        self._rate_samples: list[tuple[float, int, int]] = []  # (time, written, read), for sample_rates
        self._populating: Optional[tuple[list, threading.Event]] = None

    # -- life cycle -----------------------------------------------------------------------------
    @classmethod
    def create(cls, capacity: int, sample_shape, dtype: str = "float32", *, min_fill: float = 0.0,
               max_reads: int = 1, path: Optional[str] = None, prefix: str = "actdata",
               provenance: bool = False, reserve: bool = False) -> "SharedActivationBuffer":
        """Create a new buffer file. `path`: None = /dev/shm, a directory, or a file path to create (a
        file left by a killed server is replaced; one whose owner lives is refused). `reserve`: allocate
        all of its space now (fallocate); otherwise each writer allocates a slot's space before its first
        write into it, and a full filesystem pauses writing (BufferSpaceError) instead of a SIGBUS."""
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(TORCH_DTYPES)}, got {dtype!r}")
        directory = path or SHM_DIR
        file_path = os.path.join(directory, segment_name(prefix)) if os.path.isdir(directory) else directory
        spec = BufferSpec(file_path, int(capacity), tuple(int(x) for x in sample_shape), dtype,
                          float(min_fill), int(max_reads), bool(provenance))
        if os.path.exists(file_path):  # an explicit file: left by a killed server, or in use by a live one
            if owner_alive(file_path, legacy_grace_s=0):
                raise BufferSpaceError(f"buffer.path: {file_path} is in use by a running server")
            _remove_with_side_files(file_path)
        check_space(file_path, spec.nbytes)
        lock_fd = _hold_owner_lock(file_path)
        try:
            fd = os.open(file_path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except BaseException:
            os.close(lock_fd)
            os.unlink(owner_lock_path(file_path))
            raise
        try:
            os.ftruncate(fd, spec.nbytes)  # sparse: no page is touched until written
            # allocate now: the header and index arrays always (every claim writes them), the rows too when
            # `reserve`; a full filesystem then refuses the start instead of a SIGBUS later
            _reserve(fd, 0, spec.nbytes if reserve else index_bytes(spec.capacity, spec.provenance), file_path)
            mm = mmap.mmap(fd, spec.nbytes)
        except BaseException:
            os.close(fd)
            _remove_with_side_files(file_path)
            os.close(lock_fd)
            raise
        os.close(fd)
        buf = cls(spec, mm, owner=True)
        buf._owner_lock_fd, buf._reserved_all = lock_fd, bool(reserve)
        buf._h[_RESERVED] = int(bool(reserve))
        buf._free[:] = np.arange(spec.capacity, dtype=np.int64)
        buf._h[_CAPACITY], buf._h[_N_FREE] = spec.capacity, spec.capacity
        buf._hf[_F_CREATED] = time.time()
        buf._h[_NONCE] = int.from_bytes(os.urandom(8), "little", signed=True)
        buf._h[_MAGIC] = MAGIC
        return buf

    @classmethod
    def attach(cls, spec: BufferSpec) -> "SharedActivationBuffer":
        fd = os.open(spec.path, os.O_RDWR)
        try:
            mm = mmap.mmap(fd, spec.nbytes)
        finally:
            os.close(fd)
        return cls(spec, mm, owner=False)

    def close(self) -> None:
        """Detach; the owner also removes the file (and then lets go of its owner lock)."""
        self.stop_populating()
        self._lock.close()
        if self.owner:
            self.unlink()
        for fd in (self._owner_lock_fd, self._space_fd if self._space_pid == os.getpid() else None):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._owner_lock_fd = self._space_fd = None
        self.data = self._bytes = self._h = self._hf = None  # drop views of the map before closing it
        self._state = self._reads = self._owner = self._origin = self._free = self._ready = self._prov = None
        try:
            self._mm.close()
        except BufferError:  # a caller still holds a view of the rows; the map goes with it
            pass

    def unlink(self) -> None:
        """Remove the buffer file and its side files (`<path>.*`: generator statuses, serving metrics)."""
        for path in [self.spec.path, *glob.glob(glob.escape(self.spec.path) + ".*")]:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    @property
    def reserved(self) -> bool:
        """Whether the file's space was all allocated at creation (buffer.reserve)."""
        return self._reserved_all

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- writers ----------------------------------------------------------------------------------
    def claim_free(self, k: int) -> np.ndarray:
        """Claim up to k random FREE slots (fewer if fewer are free) and mark them WRITING."""
        with self._lock:
            k = min(int(k), int(self._h[_N_FREE]))
            ids = self._take(self._free, _N_FREE, k)
            self._state[ids] = WRITING
            self._owner[ids] = os.getpid()
            self._h[_N_WRITING] += k
        return ids

    def commit(self, ids: np.ndarray, origin: Optional[np.ndarray] = None) -> None:
        """Mark claimed slots READY (their rows are fully written)."""
        with self._lock:
            self._origin[ids] = -1 if origin is None else origin
            self._reads[ids] = 0
            self._state[ids] = READY
            self._put(self._ready, _N_READY, ids)
            self._h[_N_WRITING] -= len(ids)
            self._h[_WRITTEN] += len(ids)

    def _ensure_space(self, ids: np.ndarray) -> None:
        """Allocate the file space of slots `ids` before the first write into them (sparse buffers
        only): on a full filesystem this is a BufferSpaceError instead of a SIGBUS in the copy."""
        if self._reserved_all:
            return
        if self._space_pid != os.getpid():
            self._space_fd, self._space_pid = os.open(self.spec.path, os.O_RDWR), os.getpid()
            self._allocated = np.zeros(self.spec.capacity, dtype=bool)
        data_off, rb = _layout(self.spec.capacity, self.spec.row_bytes)["data"], self.spec.row_bytes
        for i in ids[~self._allocated[ids]].tolist():
            _reserve(self._space_fd, data_off + i * rb, rb, self.spec.path)
            self._allocated[i] = True

    def _unclaim(self, ids: np.ndarray) -> None:
        """Give back WRITING slots that were not written."""
        with self._lock:
            self._state[ids] = FREE
            self._put(self._free, _N_FREE, ids)
            self._h[_N_WRITING] -= len(ids)

    def write(self, rows: torch.Tensor, origin: Optional[np.ndarray] = None,
              stop: Optional[threading.Event] = None, poll_s: float = 0.002,
              on_wait: Optional[Callable[[], None]] = None, provenance: Optional[dict] = None) -> int:
        """Write rows into random FREE slots, waiting for slots as needed (calling `on_wait` while
        the buffer is full); returns rows written (fewer only when `stop` is set while waiting).
        `provenance`: {"token_ids", "positions", "doc_ids"} arrays [len(rows)], kept with the rows when the
        buffer has provenance arrays (-1 is stored when a writer gives none).

        Raises BufferSpaceError (with `.done`, the rows written before) when a sparse buffer's
        filesystem has no space for the slots; the caller may retry the rest later."""
        rows = rows.reshape(len(rows), *self.spec.sample_shape)
        done = 0
        while done < len(rows):
            ids = self.claim_free(len(rows) - done)
            if len(ids) == 0:
                if on_wait is not None:
                    on_wait()
                if stop is not None and stop.wait(poll_s):
                    break
                if stop is None:
                    time.sleep(poll_s)
                continue
            full = None
            try:
                self._ensure_space(ids)
            except BufferSpaceError as e:  # write what has space, give back the rest
                full, ok = e, self._allocated[ids]
                self._unclaim(ids[~ok])
                ids = ids[ok]
            if len(ids):
                part = rows[done:done + len(ids)].to(self.data.dtype).reshape(len(ids), -1).contiguous()
                self._bytes[ids] = part.view(torch.uint8).numpy()  # one memcpy per row, no thread pool
                if self._prov is not None:
                    for name, arr in self._prov.items():
                        arr[ids] = -1 if provenance is None else provenance[name][done:done + len(ids)]
                self.commit(ids, None if origin is None else origin[done:done + len(ids)])
                done += len(ids)
            if full is not None:
                full.done = done
                raise full
        return done

    # -- readers ----------------------------------------------------------------------------------
    def claim_ready(self, k: int) -> tuple[np.ndarray, int]:
        """Claim k random READY slots and mark them READING; returns (ids, epoch).
        Raises NotReady below min_fill or when fewer than k rows are READY."""
        with self._lock:
            n_ready = int(self._h[_N_READY])
            if n_ready < self.spec.min_fill * self.spec.capacity:
                raise NotReady(f"buffer filling: {n_ready}/{self.spec.capacity} rows ready, serving starts at "
                               f"min_fill={self.spec.min_fill:g}")
            if n_ready < k:
                raise NotReady(f"only {n_ready} rows ready, {k} asked")
            ids = self._take(self._ready, _N_READY, int(k))
            self._state[ids] = READING
            self._owner[ids] = os.getpid()
            self._h[_N_READING] += len(ids)
            return ids, int(self._h[_EPOCH])

    def release(self, ids: np.ndarray, epoch: int) -> None:
        """Return read slots: FREE once their read budget is spent (or a refresh happened), else READY."""
        with self._lock:
            self._reads[ids] += 1
            spent = (self._reads[ids] >= self.spec.max_reads) | (epoch != self._h[_EPOCH])
            gone, back = ids[spent], ids[~spent]
            self._state[gone] = FREE
            self._put(self._free, _N_FREE, gone)
            self._state[back] = READY
            self._put(self._ready, _N_READY, back)
            self._h[_N_READING] -= len(ids)
            self._h[_READ] += len(ids)
            origins = self._origin[ids]
            if len(ids) and origins[0] >= 0:
                self._h[_BATCHES] += 1
                self._hf[_F_MIX_SUM] += _distinct(origins) / len(ids)

    def read(self, k: int, out: Optional[torch.Tensor] = None) -> tuple[np.ndarray, torch.Tensor]:
        """Serve k random READY rows: (slot ids, rows [k, *sample_shape]), copied into `out` if given."""
        ids, epoch = self.claim_ready(k)
        ids.sort()  # ascending addresses: kinder to TLB and prefetcher; the set is random already
        try:
            if out is None:
                out = torch.empty((len(ids), *self.spec.sample_shape), dtype=self.data.dtype)
            torch.index_select(self.data, 0, torch.from_numpy(ids), out=out[:len(ids)])
        finally:
            self.release(ids, epoch)
        return ids, out[:len(ids)]

    def read_provenance(self, k: int, out: Optional[torch.Tensor] = None, prov_out: Optional[dict] = None
                        ) -> tuple[np.ndarray, torch.Tensor, dict]:
        """`read` that also returns the rows' provenance {"token_ids", "positions", "doc_ids"} (numpy
        arrays, or copied into the tensors of `prov_out`), gathered under the same claim as the rows."""
        if self._prov is None:
            raise ValueError("this buffer keeps no provenance (generator.provenance=false)")
        ids, epoch = self.claim_ready(k)
        ids.sort()
        try:
            if out is None:
                out = torch.empty((len(ids), *self.spec.sample_shape), dtype=self.data.dtype)
            torch.index_select(self.data, 0, torch.from_numpy(ids), out=out[:len(ids)])
            prov = {}
            for name, arr in self._prov.items():
                if prov_out is not None:
                    np.take(arr, ids, out=prov_out[name].numpy()[:len(ids)])
                    prov[name] = prov_out[name][:len(ids)]
                else:
                    prov[name] = arr[ids]
        finally:
            self.release(ids, epoch)
        return ids, out[:len(ids)], prov

    def prefault(self, chunk_bytes: int = 64 << 20, pause_s: float = 0.001,
                 stop: Optional[threading.Event] = None) -> None:
        """Map every row into this process's page table ahead of use (Linux MADV_POPULATE_READ), chunk by
        chunk. A reader's first touch of each page otherwise costs a minor fault: 4096 random rows of a
        3 GB buffer took 19 ms lazily and 4.7 ms populated (P6). Meant for a background thread of each
        reading process; pages not yet written are allocated here rather than by the writer. A no-op
        where the kernel lacks the call."""
        libc = ctypes.CDLL(None, use_errno=True)
        base = self.data.data_ptr() & ~(_PAGE - 1)
        end = self.data.data_ptr() + self.spec.capacity * self.spec.row_bytes
        for start in range(base, end, chunk_bytes):
            if stop is not None and stop.is_set():
                return
            if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(min(chunk_bytes, end - start)), 22) != 0:
                return  # EINVAL before Linux 5.14: pages fault in lazily, as before
            time.sleep(pause_s)

    def populate(self, stop=None, chunk_bytes: int = 32 << 20, part: int = 0, parts: int = 1) -> int:
        """Allocate and map the row pages of this process's mapping, chunk by chunk (chunks part, part +
        parts, ...; see the module docstring); returns bytes done. Stops early when `stop` is set; a no-op
        where the kernel cannot. On tmpfs each chunk is first allocated with fallocate (measured ~2.5 GB/s
        here, and it reserves the memory) and then mapped with MADV_POPULATE_WRITE: together ~15 % faster
        than MADV_POPULATE_WRITE alone."""
        start, end = self._data_range()
        fs = backing_fs(self.spec.path)
        if fs not in ("tmpfs", "hugetlbfs", "shm"):  # a disk: reserve the blocks, leave the page cache alone
            return self._fallocate_rows(stop, chunk_bytes, part, parts)
        libc = ctypes.CDLL(None, use_errno=True)
        if fs != "hugetlbfs" and part == 0:
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)  # EINVAL: small pages
        offset = _layout(self.spec.capacity, self.spec.row_bytes)["data"] - (self.data.data_ptr() - start)
        fd = os.open(self.spec.path, os.O_RDWR) if fs == "tmpfs" else None
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
                    break  # EINVAL before Linux 5.14: pages fault in as they are written, as before
                done += n
        finally:
            if fd is not None:
                os.close(fd)
        return done

    def _fallocate_rows(self, stop, chunk_bytes: int, part: int, parts: int) -> int:
        lay = _layout(self.spec.capacity, self.spec.row_bytes)
        done = 0
        fd = os.open(self.spec.path, os.O_RDWR)
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

    def _data_range(self) -> tuple[int, int]:
        ptr = self.data.data_ptr()
        return ptr & ~(_PAGE - 1), ptr + self.spec.capacity * self.spec.row_bytes

    def populate_in_background(self, stop: Optional[threading.Event] = None,
                               threads: Optional[int] = None) -> list[threading.Thread]:
        """Start `populate` in daemon threads (default: one per 4 CPUs, 1..4), each taking every n-th
        chunk; stopped by `stop`, `stop_populating` or `close`."""
        self.stop_populating()
        n = threads or max(1, min(4, (os.cpu_count() or 1) // 4))
        halt = threading.Event()
        guard = _Either(halt, stop)  # either event ends it
        ts = [threading.Thread(target=self.populate, args=(guard,), kwargs={"part": i, "parts": n},
                               name="actdata-populate", daemon=True) for i in range(n)]
        self._populating = (ts, halt)
        for t in ts:
            t.start()
        return ts

    def stop_populating(self) -> None:
        """Stop a background populate and wait for its current chunks (the map must outlive them)."""
        if self._populating is not None:
            ts, halt = self._populating
            halt.set()
            for t in ts:
                t.join()
            self._populating = None

    # -- control ----------------------------------------------------------------------------------
    def refresh(self) -> int:
        """Mark every READY row for regeneration (FREE); rows being read are freed when released.
        Returns the number of rows dropped."""
        with self._lock:
            n = int(self._h[_N_READY])
            ids = self._ready[:n].copy()
            self._state[ids] = FREE
            self._put(self._free, _N_FREE, ids)
            self._h[_N_READY] = 0
            self._h[_EPOCH] += 1
            self._h[_REFRESHED] += n
        return n

    def sample_rates(self) -> None:
        """Update the published rows/s in and out (over the last RATE_WINDOW_S seconds) from the shared
        counters. One process of a server calls this periodically; every process reads the result."""
        now = time.time()
        window = self._rate_samples
        window.append((now, int(self._h[_WRITTEN]), int(self._h[_READ])))
        while len(window) > 2 and now - window[1][0] >= RATE_WINDOW_S:
            window.pop(0)
        t0, w0, r0 = window[0]
        if now > t0:
            self._hf[_F_RATE_IN] = (window[-1][1] - w0) / (now - t0)
            self._hf[_F_RATE_OUT] = (window[-1][2] - r0) / (now - t0)
            self._hf[_F_RATE_AT] = now

    def reclaim_orphans(self) -> int:
        """Free the slots claimed (WRITING or READING) by processes that have died since, e.g. a killed
        generator or HTTP process; without this they would be lost to the buffer for good. A row that was
        being read is freed, not served again: part of it may have reached a client. Scans the state
        array (O(capacity)): for a periodic background check, not the request path. Returns slots freed."""
        with self._lock:
            claimed = np.nonzero((self._state == WRITING) | (self._state == READING))[0]
            if len(claimed) == 0:
                return 0
            dead = [p for p in np.unique(self._owner[claimed]).tolist() if not pid_alive(p)]
            ids = claimed[np.isin(self._owner[claimed], dead)]
            if len(ids) == 0:
                return 0
            self._h[_N_WRITING] -= int((self._state[ids] == WRITING).sum())
            self._h[_N_READING] -= int((self._state[ids] == READING).sum())
            self._state[ids] = FREE
            self._reads[ids] = 0
            self._put(self._free, _N_FREE, ids)
            return len(ids)

    def note_contexts(self, n: int) -> None:
        """Writers count the contexts (sequences) they consumed."""
        with self._lock:
            self._h[_CONTEXTS_SEEN] += n

    def stats(self) -> dict:
        h, cap = self._h, self.spec.capacity
        batches = int(h[_BATCHES])
        return {
            "capacity": cap,
            "sample_shape": list(self.spec.sample_shape),
            "dtype": self.spec.dtype,
            "row_bytes": self.spec.row_bytes,
            "bytes": cap * self.spec.row_bytes,
            "backing": self.spec.path,
            "free": int(h[_N_FREE]),
            "writing": int(h[_N_WRITING]),
            "ready": int(h[_N_READY]),
            "valid_samples": int(h[_N_READY]),  # the original service's name for rows ready
            "valid_percentage": 100.0 * int(h[_N_READY]) / cap,
            "reading": int(h[_N_READING]),
            "fill": int(h[_N_READY]) / cap,
            "min_fill": self.spec.min_fill,
            "max_reads": self.spec.max_reads,
            "serving": int(h[_N_READY]) >= self.spec.min_fill * cap and int(h[_N_READY]) > 0,
            "rows_written": int(h[_WRITTEN]),
            "writes_per_s": float(self._hf[_F_RATE_IN]),  # rows/s over the last few seconds
            "reads_per_s": float(self._hf[_F_RATE_OUT]),
            "rows_read": int(h[_READ]),
            "rows_refreshed": int(h[_REFRESHED]),
            "refresh_epoch": int(h[_EPOCH]),
            "contexts_seen": int(h[_CONTEXTS_SEEN]),
            "batch_mixing": (float(self._hf[_F_MIX_SUM]) / batches) if batches else None,
            "created_at": float(self._hf[_F_CREATED]),
        }

    @property
    def nonce(self) -> int:
        """The random identity written into the header at creation (see actdata.local)."""
        return int(self._h[_NONCE])

    @property
    def data_offset(self) -> int:
        """Byte offset of the rows in the file: a reader that computes another layout is of another version."""
        return _layout(self.spec.capacity, self.spec.row_bytes)["data"]

    def states(self) -> np.ndarray:
        """A copy of the per-slot state array (for tests and debugging)."""
        with self._lock:
            return self._state.copy()

    # -- index lists (call under the lock) ------------------------------------------------------
    def _random(self) -> np.random.Generator:
        if self._rng_pid != os.getpid():  # fresh stream per process: forked children must not agree
            self._rng, self._rng_pid = np.random.default_rng(), os.getpid()
        return self._rng

    def _take(self, lst: np.ndarray, count_slot: int, k: int) -> np.ndarray:
        """Remove k uniformly random entries from lst[:n] in O(k) and return them."""
        n = int(self._h[count_slot])
        if k <= 0:
            return np.empty(0, np.int64)
        pos = self._random().choice(n, size=k, replace=False, shuffle=False)
        taken = lst[pos].copy()
        tail = n - k
        keep = np.ones(k, dtype=bool)
        keep[pos[pos >= tail] - tail] = False  # tail entries that were themselves taken
        lst[pos[pos < tail]] = lst[tail:n][keep]  # fill the holes with the surviving tail
        self._h[count_slot] = tail
        return taken

    def _put(self, lst: np.ndarray, count_slot: int, ids: np.ndarray) -> None:
        n = int(self._h[count_slot])
        lst[n:n + len(ids)] = ids
        self._h[count_slot] = n + len(ids)


