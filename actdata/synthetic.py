"""Synthetic rows that prove themselves: each row is a pure function of its 48-bit id.

The first six values hold the id in base 256 (exact in float32, float16 and bfloat16); the rest are
deterministic pseudo-random values of (id, position). A reader recomputes the row from its id and
compares bit for bit, so a torn row (halves of two writes) or a row served twice is caught.
This is the harness for integrity and speed tests and the server's `generator.source=synthetic`.
"""
from __future__ import annotations

import math
import time
from typing import Iterator, Optional

import numpy as np
import torch

ID_DIGITS = 6  # base-256 digits: ids < 2**48
CONTEXT_ROWS = 64  # rows that share an origin (a pretend context), for the batch-mixing statistic


def make_rows(ids: torch.Tensor, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """Rows [len(ids), *shape] of `dtype`, each determined by its id."""
    ids = ids.to(torch.int64)
    n = math.prod(shape)
    pos = torch.arange(n, dtype=torch.int64)
    body = ((ids[:, None] % 1_000_003) * 7919 + pos[None, :] * 104_729) % 1021
    vals = (body - 510).to(torch.float32) / 128.0
    shifts = torch.arange(ID_DIGITS, dtype=torch.int64) * 8
    vals[:, :ID_DIGITS] = ((ids[:, None] >> shifts[None, :]) & 255).to(torch.float32)
    return vals.to(dtype).view(len(ids), *shape)


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
    """An endless stream of self-checking rows: batches of `batch_rows`, optionally throttled."""

    def __init__(self, shape: tuple, dtype: torch.dtype, first_id: int = 0, batch_rows: int = 256,
                 rows_per_second: Optional[float] = None):
        self.shape, self.dtype, self.next_id = tuple(shape), dtype, int(first_id)
        self.batch_rows, self.rows_per_second = batch_rows, rows_per_second

    def __iter__(self) -> Iterator[tuple[torch.Tensor, np.ndarray, dict]]:
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
            yield rows, origin, {"contexts": self.batch_rows // CONTEXT_ROWS, "tokens": 0}
