"""Synthetic rows that prove themselves: each row is a pure function of its 48-bit id.

The first six values hold the id in base 256 (exact in float32, float16 and bfloat16); the rest are
deterministic pseudo-random values of (id, position). A reader recomputes the row from its id and
compares bit for bit, so a torn row (halves of two writes) or a row served twice is caught.
This is the harness for integrity and speed tests and the server's `generator.source=synthetic`.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Iterator, Optional

import numpy as np
import torch

from .source import BatchInfo, RowBatch

ID_DIGITS = 6  # base-256 digits: ids < 2**48
CONTEXT_ROWS = 64  # rows that share an origin (a pretend context), for the batch-mixing statistic


_PERIOD = 65521  # prime: a row's body is a window into a fixed pseudo-random sequence of this period


@functools.lru_cache(maxsize=8)
def _sequence(n: int, dtype: torch.dtype) -> np.ndarray:
    """The pseudo-random sequence, extended to _PERIOD + n values, as raw integer words of `dtype`."""
    j = torch.arange(_PERIOD + n, dtype=torch.int64) % _PERIOD
    vals = ((j * 104_729) % _PERIOD - _PERIOD // 2).to(torch.float32) / (_PERIOD / 8)  # in [-4, 4)
    words = torch.int16 if dtype.itemsize == 2 else torch.int32
    return vals.to(dtype).view(words).numpy()


def make_rows(ids: torch.Tensor, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """Rows [len(ids), *shape] of `dtype`, each determined by its id: the id's base-256 digits, then
    the window of the pseudo-random sequence that starts at a hash of the id."""
    ids = ids.to(torch.int64)
    n = math.prod(shape)
    seq = _sequence(n, dtype)
    start = ((ids % _PERIOD) * 40_503 % _PERIOD).numpy()
    rows = torch.from_numpy(np.lib.stride_tricks.sliding_window_view(seq, n)[start]).view(dtype)
    shifts = torch.arange(ID_DIGITS, dtype=torch.int64) * 8
    rows[:, :ID_DIGITS] = ((ids[:, None] >> shifts[None, :]) & 255).to(dtype)
    return rows.view(len(ids), *shape)


def row_ids(rows: torch.Tensor) -> torch.Tensor:
    """The ids written into rows [k, *shape]."""
    digits = rows.reshape(len(rows), -1)[:, :ID_DIGITS].to(torch.float32).round().to(torch.int64)
    shifts = torch.arange(ID_DIGITS, dtype=torch.int64) * 8
    return (digits << shifts[None, :]).sum(dim=1)


def verify_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, ok): ok[i] is True when row i is exactly the row its id names."""
    ids = row_ids(rows)
    expected = make_rows(ids, tuple(rows.shape[1:]), rows.dtype)
    flat_bits = lambda t: t.reshape(len(t), -1).view(torch.int16 if t.element_size() == 2 else torch.int32)
    ok = (flat_bits(rows) == flat_bits(expected)).all(dim=1)
    return ids, ok


class SyntheticSource:
    """An endless stream of self-checking `RowBatch`es of `batch_rows` rows, optionally throttled.

    Generator g starts at id g << 40 (or at a saved `first_id`), so ids never repeat across generators or
    restarts. info has contexts, tokens (0), next_id and, with `provenance`, provenance (doc_ids = the
    row id, positions = id % CONTEXT_ROWS, token_ids = 0)."""

    fresh_rows = True  # every batch is a new tensor: the statistics thread may still read it after the next

    def __init__(self, shape: tuple, dtype: torch.dtype, first_id: int = 0, batch_rows: int = 256,
                 rows_per_second: Optional[float] = None, provenance: bool = False):
        self.shape, self.dtype, self.next_id = tuple(shape), dtype, int(first_id)
        self.batch_rows, self.rows_per_second, self.provenance = batch_rows, rows_per_second, provenance

    def __iter__(self) -> Iterator[RowBatch]:
        t0, produced = time.perf_counter(), 0
        while True:
            ids = torch.arange(self.next_id, self.next_id + self.batch_rows, dtype=torch.int64)
            self.next_id += self.batch_rows
            rows = make_rows(ids, self.shape, self.dtype)
            origin = (ids // CONTEXT_ROWS).numpy()
            produced += len(ids)
            if self.rows_per_second:
                ahead = produced / self.rows_per_second - (time.perf_counter() - t0)
                if ahead > 0:
                    time.sleep(ahead)
            info: BatchInfo = {"contexts": self.batch_rows // CONTEXT_ROWS, "tokens": 0, "next_id": self.next_id}
            if self.provenance:
                n = ids.numpy()
                info["provenance"] = {"doc_ids": n, "positions": (n % CONTEXT_ROWS).astype(np.int32),
                                      "token_ids": np.zeros(len(n), np.int32)}
            yield RowBatch(rows, origin, info)
