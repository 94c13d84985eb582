"""The buffer file's layout, defined once: header slots, per-slot index arrays, rows, and BufferSpec.

    header   4 KB: int64 counters (slots below) and float64 rates, the magic number and a random nonce
    state    int8  [capacity]  FREE -> WRITING -> READY -> READING -> FREE (or READY again)
    reads    int32 [capacity]  times the row was served since it was written
    owner    int32 [capacity]  pid of the process holding a WRITING/READING claim
    origin   int64 [capacity]  the context a row came from (for the batch-mixing statistic)
    free     int64 [capacity]  list of FREE slot ids (first n_free entries valid)
    ready    int64 [capacity]  list of READY slot ids (first n_ready entries valid)
    provenance arrays (only with provenance): actdata.wire.PROVENANCE, one entry per slot
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

INDEX_ARRAYS = (("state", np.int8), ("reads", np.int32), ("owner", np.int32), ("origin", np.int64),
                ("free", np.int64), ("ready", np.int64))
PROVENANCE_ARRAYS = tuple((name, wire.NUMPY[t]) for name, t in wire.PROVENANCE.items())


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def layout(capacity: int, row_bytes: int, provenance: bool = False) -> dict[str, int]:
    """Byte offset of each array in the file, "data" (the rows) and "total" (the file size)."""
    off, out = HEADER_BYTES, {}
    for name, dtype in INDEX_ARRAYS + (PROVENANCE_ARRAYS if provenance else ()):
        out[name] = off
        off = _align(off + capacity * np.dtype(dtype).itemsize, 64)
    out["data"] = _align(off, PAGE)
    out["total"] = out["data"] + capacity * row_bytes
    return out


def index_bytes(capacity: int, provenance: bool = False) -> int:
    """Bytes of header and per-slot index arrays for a buffer of `capacity` rows."""
    return layout(capacity, 0, provenance)["data"]


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
        return wire.row_bytes(self.sample_shape, self.dtype)

    @property
    def layout(self) -> dict[str, int]:
        return layout(self.capacity, self.row_bytes, self.provenance)

    @property
    def nbytes(self) -> int:
        return self.layout["total"]
