"""SharedActivationBuffer: a shared-memory tensor of activation rows that writers fill and readers drain.

What it keeps, in one memory-mapped file (POSIX shm in /dev/shm by default, any file when a path is
given) that every process attaches to by path: a header of counters, per-slot index arrays (state FREE ->
WRITING -> READY -> READING -> FREE or READY again, reads, owner pid of a claim, origin, the free and ready
lists), provenance arrays when asked, the consumer groups' region when `max_groups` > 0
(actdata.shm.groups), and the rows, page-aligned. The offsets are actdata.shm.layout's.

Provenance is written with the rows, into slots the writer claimed, and read out with the rows under the
reader's claim (`read_provenance`), so it always describes the row it is served with.

State changes happen under a cross-process lock (flock on the file, which the kernel drops if its
holder dies); row copies happen outside it. A writer copies only into slots it claimed (WRITING) and a
reader only out of slots it claimed (READING), so no reader ever sees a half-written row. Picking k
random slots is O(k): a uniform sample of positions in the free/ready list, then swap-remove from the
tail. Nothing touches the data pages on creation, so start-up time does not depend on capacity.
Pages are mapped ahead of use by actdata.shm.pages; files, space and owners are actdata.shm.segment's.
"""
from __future__ import annotations

import mmap
import os
import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .. import wire
from ..host import pid_alive
from . import segment, sidefiles
from .gather import gather
from .groups import GroupClaim, GroupTable, group_claim
from .layout import (
    FREE,
    H_BATCHES,
    H_CAPACITY,
    H_CONTEXTS_SEEN,
    H_EPOCH,
    H_MAGIC,
    H_N_FREE,
    H_N_READING,
    H_N_READY,
    H_N_WRITING,
    H_NONCE,
    H_READ,
    H_REFRESHED,
    H_RESERVED,
    H_WRITTEN,
    HEADER_BYTES,
    HF_CREATED,
    HF_MIX_SUM,
    HF_RATE_AT,
    HF_RATE_IN,
    HF_RATE_OUT,
    MAGIC,
    PROVENANCE_ARRAYS,
    READING,
    READY,
    WRITING,
    BufferSpec,
)
from .lists import NotReady, take
from .lock import ProcessLock
from .pages import Populator, prefault
from .scatter import scatter
from .segment import BufferSpaceError

RATE_WINDOW_S = 5.0


def _distinct(a: np.ndarray) -> int:
    """Distinct values of a non-empty array, by a sort and a comparison: this runs inside the buffer's
    lock on every read, where np.unique costs ten times as much."""
    s = np.sort(a)
    return int(np.count_nonzero(s[1:] != s[:-1])) + 1


class SharedActivationBuffer:
    """A fixed-capacity pool of activation rows in shared memory. See the module docstring."""

    def __init__(self, spec: BufferSpec, _mm: mmap.mmap, owner: bool):
        self.spec, self.owner, self._mm = spec, owner, _mm
        cap, lay = spec.capacity, spec.layout
        self._h = np.frombuffer(_mm, np.int64, HEADER_BYTES // 8, 0)
        self._hf = np.frombuffer(_mm, np.float64, HEADER_BYTES // 8, 0)
        if self._h[H_MAGIC] not in (0, MAGIC) or (self._h[H_MAGIC] == MAGIC and self._h[H_CAPACITY] != cap):
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
        self.data = raw.view(wire.DTYPES[spec.dtype]).view(cap, *spec.sample_shape)
        self._bytes = raw.numpy().reshape(cap, spec.row_bytes)  # the same rows as raw bytes
        self._lock = ProcessLock(spec.path)
        self._owner_lock_fd, self._reserved_all = None, bool(self._h[H_RESERVED])
        self._space_fd, self._space_pid, self._allocated = None, None, None
        self._rng_pid, self._rng = None, None
        self._rate_samples: list[tuple[float, int, int]] = []  # (time, written, read), for sample_rates
        self._populating: Optional[Populator] = None
        self.groups = GroupTable(self) if spec.max_groups else None  # consumer groups (actdata.shm.groups)

    # -- life cycle -----------------------------------------------------------------------------
    @classmethod
    def create(cls, capacity: int, sample_shape, dtype: str = "float32", *, min_fill: float = 0.0,
               max_reads: int = 1, path: Optional[str] = None, prefix: str = "actdata",
               provenance: bool = False, reserve: bool = False, max_groups: int = 0) -> "SharedActivationBuffer":
        """Create a new buffer file. `path`: None = /dev/shm, a directory, or a file path to create (a
        file left by a killed server is replaced; one whose owner lives is refused). `reserve`: allocate
        all of its space now (fallocate); otherwise each writer allocates a slot's space before its first
        write into it, and a full filesystem pauses writing (BufferSpaceError) instead of a SIGBUS.
        `max_groups`: room for that many consumer groups (configure them with `buffer.groups.configure`)."""
        if dtype not in wire.DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(wire.DTYPES)}, got {dtype!r}")
        directory = path or segment.SHM_DIR
        file_path = os.path.join(directory, segment.segment_name(prefix)) if os.path.isdir(directory) else directory
        spec = BufferSpec(file_path, int(capacity), tuple(int(x) for x in sample_shape), dtype,
                          float(min_fill), int(max_reads), bool(provenance), int(max_groups))
        if os.path.exists(file_path):  # an explicit file: left by a killed server, or in use by a live one
            if segment.owner_alive(file_path):
                raise BufferSpaceError(f"buffer.path: {file_path} is in use by a running server")
            segment.remove(file_path)
        segment.check_space(file_path, spec.nbytes)
        lock_fd = segment.hold_owner_lock(file_path)
        try:
            fd = os.open(file_path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except BaseException:
            os.close(lock_fd)
            os.unlink(sidefiles.owner_lock(file_path))
            raise
        try:
            os.ftruncate(fd, spec.nbytes)  # sparse: no page is touched until written
            # allocate now: the header and index arrays always (every claim writes them), the rows too when
            # `reserve`; a full filesystem then refuses the start instead of a SIGBUS later
            segment.reserve(fd, 0, spec.nbytes if reserve else spec.layout["data"], file_path)
            mm = mmap.mmap(fd, spec.nbytes)
        except BaseException:
            os.close(fd)
            segment.remove(file_path)
            os.close(lock_fd)
            raise
        os.close(fd)
        buf = cls(spec, mm, owner=True)
        buf._owner_lock_fd, buf._reserved_all = lock_fd, bool(reserve)
        buf._h[H_RESERVED] = int(bool(reserve))
        buf._free[:] = np.arange(spec.capacity, dtype=np.int64)
        buf._h[H_CAPACITY], buf._h[H_N_FREE] = spec.capacity, spec.capacity
        buf._hf[HF_CREATED] = time.time()
        buf._h[H_NONCE] = int.from_bytes(os.urandom(8), "little", signed=True)
        buf._h[H_MAGIC] = MAGIC
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
        self.data = self._bytes = self._h = self._hf = self.groups = None  # drop views of the map before closing it
        self._state = self._reads = self._owner = self._origin = self._free = self._ready = self._prov = None
        try:
            self._mm.close()
        except BufferError:  # a caller still holds a view of the rows; the map goes with it
            pass

    def unlink(self) -> None:
        """Remove the buffer file and its side files (`<path>.*`: generator statuses, serving metrics)."""
        segment.remove(self.spec.path)

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
            if self.groups is not None and k > self._h[H_N_FREE]:  # idle groups dropped; `skip` makes room
                self.groups.on_full(int(k))
            k = min(int(k), int(self._h[H_N_FREE]))
            ids = self._take(self._free, H_N_FREE, k)
            self._state[ids] = WRITING
            self._owner[ids] = os.getpid()
            self._h[H_N_WRITING] += k
        return ids

    def commit(self, ids: np.ndarray, origin: Optional[np.ndarray] = None) -> None:
        """Mark claimed slots READY (their rows are fully written)."""
        with self._lock:
            self._origin[ids] = -1 if origin is None else origin
            self._reads[ids] = 0
            self._state[ids] = READY
            self._put(self._ready, H_N_READY, ids) if self.groups is None else self.groups.on_commit(ids)
            self._h[H_N_WRITING] -= len(ids)
            self._h[H_WRITTEN] += len(ids)

    def _ensure_space(self, ids: np.ndarray) -> None:
        """Allocate the file space of slots `ids` before the first write into them (sparse buffers
        only): on a full filesystem this is a BufferSpaceError instead of a SIGBUS in the copy."""
        if self._reserved_all:
            return
        if self._space_pid != os.getpid():
            self._space_fd, self._space_pid = os.open(self.spec.path, os.O_RDWR), os.getpid()
            self._allocated = np.zeros(self.spec.capacity, dtype=bool)
        data_off, rb = self.spec.layout["data"], self.spec.row_bytes
        for i in ids[~self._allocated[ids]].tolist():
            segment.reserve(self._space_fd, data_off + i * rb, rb, self.spec.path)
            self._allocated[i] = True

    def _unclaim(self, ids: np.ndarray) -> None:
        """Give back WRITING slots that were not written."""
        with self._lock:
            self._state[ids] = FREE
            self._put(self._free, H_N_FREE, ids)
            self._h[H_N_WRITING] -= len(ids)

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
                scatter(self._bytes, ids, part.view(torch.uint8).numpy())
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
    def claim_ready(self, k: int, group: Optional[str] = None) -> tuple[np.ndarray, int]:
        """Claim k random READY slots and mark them READING; returns (ids, epoch; a GroupClaim for a group).
        Raises NotReady below min_fill or when fewer than k rows are READY (to the group)."""
        if group is not None or self.groups is not None:
            return group_claim(self, group, k)
        with self._lock:
            n_ready = int(self._h[H_N_READY])
            if n_ready < self.spec.min_fill * self.spec.capacity:
                raise NotReady(f"buffer filling: {n_ready}/{self.spec.capacity} rows ready, serving starts at "
                               f"min_fill={self.spec.min_fill:g}")
            if n_ready < k:
                raise NotReady(f"only {n_ready} rows ready, {k} asked")
            ids = self._take(self._ready, H_N_READY, int(k))
            self._state[ids] = READING
            self._owner[ids] = os.getpid()
            self._h[H_N_READING] += len(ids)
            return ids, int(self._h[H_EPOCH])

    def release(self, ids: np.ndarray, epoch: int) -> None:
        """Return read slots: FREE once their read budget is spent (or a refresh happened), else READY."""
        with self._lock:
            if isinstance(epoch, GroupClaim):  # a consumer group's read (actdata.shm.groups)
                self.groups.on_release(ids, epoch)
            else:
                self._reads[ids] += 1
                spent = (self._reads[ids] >= self.spec.max_reads) | (epoch != self._h[H_EPOCH])
                gone, back = ids[spent], ids[~spent]
                self._state[gone] = FREE
                self._put(self._free, H_N_FREE, gone)
                self._state[back] = READY
                self._put(self._ready, H_N_READY, back)
                self._h[H_N_READING] -= len(ids)
            self._h[H_READ] += len(ids)
            origins = self._origin[ids]
            if len(ids) and origins[0] >= 0:
                self._h[H_BATCHES] += 1
                self._hf[HF_MIX_SUM] += _distinct(origins) / len(ids)

    def read(self, k: int, out: Optional[torch.Tensor] = None, group: Optional[str] = None,
             points: Optional[Sequence[int]] = None) -> tuple[np.ndarray, torch.Tensor]:
        """Serve k random READY rows (that `group` has not read): (slot ids, rows [k, *sample_shape]), copied
        into `out` if given; with `points` only those points of each row, [k, len(points), width] (.gather)."""
        ids, epoch = self.claim_ready(k, group)
        ids.sort()  # ascending addresses: kinder to TLB and prefetcher; the set is random already
        try:
            out = gather(self.data, ids, points, out)
        finally:
            self.release(ids, epoch)
        return ids, out[:len(ids)]

    def read_provenance(self, k: int, out: Optional[torch.Tensor] = None, prov_out: Optional[dict] = None,
                        group: Optional[str] = None, points: Optional[Sequence[int]] = None
                        ) -> tuple[np.ndarray, torch.Tensor, dict]:
        """`read` that also returns the rows' provenance {"token_ids", "positions", "doc_ids"} (numpy
        arrays, or copied into the tensors of `prov_out`), gathered under the same claim as the rows."""
        if self._prov is None:
            raise ValueError("this buffer keeps no provenance (generator.provenance=false)")
        ids, epoch = self.claim_ready(k, group)
        ids.sort()
        try:
            out = gather(self.data, ids, points, out)
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

    def populate_in_background(self, stop: Optional[threading.Event] = None,
                               threads: Optional[int] = None) -> None:
        """Map this buffer's rows ahead of its writer (actdata.shm.pages); stopped by `stop`,
        `stop_populating` or `close`."""
        self.stop_populating()
        self._populating = Populator(self, stop, threads)

    def stop_populating(self) -> None:
        if self._populating is not None:
            self._populating.stop()
            self._populating = None

    def prefault(self, stop: Optional[threading.Event] = None) -> None:
        """Map every row into this process's page table (actdata.shm.pages.prefault)."""
        prefault(self, stop=stop)

    # -- control ----------------------------------------------------------------------------------
    def refresh(self) -> int:
        """Mark every READY row for regeneration (FREE); rows being read are freed when released.
        Returns the number of rows dropped."""
        with self._lock:
            if self.groups is not None:
                return self.groups.on_refresh()
            n = int(self._h[H_N_READY])
            ids = self._ready[:n].copy()
            self._state[ids] = FREE
            self._put(self._free, H_N_FREE, ids)
            self._h[H_N_READY] = 0
            self._h[H_EPOCH] += 1
            self._h[H_REFRESHED] += n
        return n

    def sample_rates(self) -> None:
        """Update the published rows/s in and out (over the last RATE_WINDOW_S seconds) from the shared
        counters. One process of a server calls this periodically; every process reads the result."""
        now = time.time()
        window = self._rate_samples
        window.append((now, int(self._h[H_WRITTEN]), int(self._h[H_READ])))
        while len(window) > 2 and now - window[1][0] >= RATE_WINDOW_S:
            window.pop(0)
        t0, w0, r0 = window[0]
        if now > t0:
            self._hf[HF_RATE_IN] = (window[-1][1] - w0) / (now - t0)
            self._hf[HF_RATE_OUT] = (window[-1][2] - r0) / (now - t0)
            self._hf[HF_RATE_AT] = now
        if self.groups is not None:  # and drops idle groups
            self.groups.tick()

    def reclaim_orphans(self) -> int:
        """Free the slots claimed (WRITING or READING) by processes that have died since, e.g. a killed
        generator or HTTP process; without this they would be lost to the buffer for good. A row that was
        being read is freed, not served again: part of it may have reached a client. Scans the state
        array (O(capacity)): for a periodic background check, not the request path. Returns slots freed."""
        n = self.groups.reclaim() if self.groups is not None else 0
        with self._lock:
            claimed = np.nonzero((self._state == WRITING) | (self._state == READING))[0]
            if len(claimed) == 0:
                return n
            dead = [p for p in np.unique(self._owner[claimed]).tolist() if not pid_alive(p)]
            ids = claimed[np.isin(self._owner[claimed], dead)]
            if len(ids) == 0:
                return n
            self._h[H_N_WRITING] -= int((self._state[ids] == WRITING).sum())
            self._h[H_N_READING] -= int((self._state[ids] == READING).sum())
            self._state[ids] = FREE
            self._reads[ids] = 0
            self._put(self._free, H_N_FREE, ids)
            return n + len(ids)

    def note_contexts(self, n: int) -> None:
        """Writers count the contexts (sequences) they consumed."""
        with self._lock:
            self._h[H_CONTEXTS_SEEN] += n

    def stats(self) -> dict:
        h, cap = self._h, self.spec.capacity
        batches = int(h[H_BATCHES])
        return {
            "capacity": cap,
            "sample_shape": list(self.spec.sample_shape),
            "dtype": self.spec.dtype,
            "row_bytes": self.spec.row_bytes,
            "bytes": cap * self.spec.row_bytes,
            "backing": self.spec.path,
            "free": int(h[H_N_FREE]),
            "writing": int(h[H_N_WRITING]),
            "ready": int(h[H_N_READY]),
            "valid_samples": int(h[H_N_READY]),  # the original service's name for rows ready
            "valid_percentage": 100.0 * int(h[H_N_READY]) / cap,
            "reading": int(h[H_N_READING]),
            "fill": int(h[H_N_READY]) / cap,
            "min_fill": self.spec.min_fill,
            "max_reads": self.spec.max_reads,
            "serving": int(h[H_N_READY]) >= self.spec.min_fill * cap and int(h[H_N_READY]) > 0,
            "rows_written": int(h[H_WRITTEN]),
            "writes_per_s": float(self._hf[HF_RATE_IN]),  # rows/s over the last few seconds
            "reads_per_s": float(self._hf[HF_RATE_OUT]),
            "rows_read": int(h[H_READ]),
            "rows_refreshed": int(h[H_REFRESHED]),
            "refresh_epoch": int(h[H_EPOCH]),
            "contexts_seen": int(h[H_CONTEXTS_SEEN]),
            "batch_mixing": (float(self._hf[HF_MIX_SUM]) / batches) if batches else None,
            "created_at": float(self._hf[HF_CREATED]),
            "groups": [] if self.groups is None else self.groups.list(),  # consumer groups (actdata.shm.groups)
            "group_policy": None if self.groups is None else self.groups.policy,
        }

    @property
    def nonce(self) -> int:
        """The random identity written into the header at creation (see actdata.reading.samehost)."""
        return int(self._h[H_NONCE])

    @property
    def data_offset(self) -> int:
        """Byte offset of the rows in the file: a reader that computes another layout is of another version."""
        return self.spec.layout["data"]

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
        """Remove k uniformly random entries from lst[:n] in O(k) and return them (actdata.shm.lists)."""
        n = int(self._h[count_slot])
        taken = take(lst, n, k, self._random())
        self._h[count_slot] = n - len(taken)
        return taken

    def _put(self, lst: np.ndarray, count_slot: int, ids: np.ndarray) -> None:
        n = int(self._h[count_slot])
        lst[n:n + len(ids)] = ids
        self._h[count_slot] = n + len(ids)


