"""The buffer file's layout, defined once: header slots, per-slot index arrays, rows, and BufferSpec.

    header   4 KB: int64 counters (slots below) and float64 rates, the magic number and a random nonce
    state    int8  [capacity]  FREE -> WRITING -> READY -> READING -> FREE (or READY again)
    reads    int32 [capacity]  times the row was served since it was written
    owner    int32 [capacity]  pid of the process holding a WRITING/READING claim
    origin   int64 [capacity]  the context a row came from (for the batch-mixing statistic)
    free     int64 [capacity]  list of FREE slot ids (first n_free entries valid)
    ready    int64 [capacity]  list of READY slot ids (first n_ready entries valid)
    provenance arrays (only with provenance): actdata.wire.PROVENANCE, one entry per slot
    group region (only with max_groups > 0): GROUP_ARRAYS, see actdata.shm.groups
    data     [capacity, *sample_shape] rows, page-aligned

Every array starts 64-byte aligned and the rows start on a page. A reader on the same host computes the
same layout from the spec the server publishes, and refuses a file whose layout differs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import wire

FREE, WRITING, READY, READING = 0, 1, 2, 3
MAGIC = 0x61637464_61746131  # "actdata1"
PAGE = 4096
HEADER_BYTES = PAGE
# header slots (int64 unless noted)
(H_MAGIC, H_CAPACITY, H_N_FREE, H_N_READY, H_N_WRITING, H_N_READING, H_WRITTEN, H_READ, H_EPOCH, H_BATCHES,
 H_CONTEXTS_SEEN, H_REFRESHED) = range(12)
H_RESERVED = 31  # 1 when the whole file was allocated at creation
HF_CREATED, HF_MIX_SUM, HF_RATE_IN, HF_RATE_OUT, HF_RATE_AT = 32, 33, 34, 35, 36  # float64 slots
H_NONCE = 100  # int64: random, set at creation; a same-host reader checks it opened the server's own file
# consumer groups (actdata.shm.groups): lag policy (0 wait, 1 skip), groups expected before serving, whether
# that many have registered once (serving is held until then), and the idle time after which a group is dropped
H_GROUP_POLICY, H_GROUPS_EXPECTED, H_GROUPS_RELEASED = 40, 41, 42
HF_GROUP_IDLE = 43  # float64

INDEX_ARRAYS = (("state", np.int8), ("reads", np.int32), ("owner", np.int32), ("origin", np.int64),
                ("free", np.int64), ("ready", np.int64))
PROVENANCE_ARRAYS = tuple((name, wire.NUMPY[t]) for name, t in wire.PROVENANCE.items())
MAX_GROUPS = 64  # one bit per group in a uint64 per slot
GROUP_POLICIES = ("wait", "skip")  # buffer.group_lag, stored in the header as its index
GROUP_NAME_BYTES = 64
GROUP_META = 16  # int64/float64 fields per group (actdata.shm.groups)


def group_arrays(capacity: int, max_groups: int, max_reads: int = 1) -> tuple:
    """(name, dtype, entries) of the group region: per-slot bitmasks, then per-group fields and lists
    (the read counts only when a row may be read more than once)."""
    if max_groups <= 0:
        return ()
    g = max_groups
    out = (("owed", np.uint64, capacity), ("busy", np.uint64, capacity), ("g_meta", np.int64, g * GROUP_META),
           ("g_names", np.uint8, g * GROUP_NAME_BYTES), ("g_ready", np.int32, g * capacity),
           ("g_owner", np.int32, g * capacity))
    return out + ((("g_reads", np.uint16, g * capacity),) if max_reads > 1 else ())


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def layout(capacity: int, row_bytes: int, provenance: bool = False, max_groups: int = 0,
           max_reads: int = 1) -> dict[str, int]:
    """Byte offset of each array in the file, "data" (the rows) and "total" (the file size)."""
    off, out = HEADER_BYTES, {}
    arrays = [(n, t, capacity) for n, t in INDEX_ARRAYS + (PROVENANCE_ARRAYS if provenance else ())]
    for name, dtype, entries in arrays + list(group_arrays(capacity, max_groups, max_reads)):
        out[name] = off
        off = _align(off + entries * np.dtype(dtype).itemsize, 64)
    out["data"] = _align(off, PAGE)
    out["total"] = out["data"] + capacity * row_bytes
    return out


def index_bytes(capacity: int, provenance: bool = False, max_groups: int = 0, max_reads: int = 1) -> int:
    """Bytes of header, per-slot index arrays and group region for a buffer of `capacity` rows."""
    return layout(capacity, 0, provenance, max_groups, max_reads)["data"]


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
    max_groups: int = 0  # consumer groups the group region has room for (0 = no region, no groups)

    @property
    def row_bytes(self) -> int:
        return wire.row_bytes(self.sample_shape, self.dtype)

    @property
    def layout(self) -> dict[str, int]:
        return layout(self.capacity, self.row_bytes, self.provenance, self.max_groups, self.max_reads)

    @property
    def nbytes(self) -> int:
        return self.layout["total"]
