"""What a row source yields: the `RowBatch` every source produces and the `RowSource` protocol it follows.

A source is an iterable of batches: the model over text (generation.model_source), synthetic rows
(generation.synthetic) and a store replayed (storage.replay). The generation loop writes each batch into
the buffer, saves `info`'s position and counts its counters; it never asks which source it drives.

`RowBatch` is a NamedTuple, so a source may yield a plain `(rows, origin, info)` tuple as well: the loop
only unpacks it. `BatchInfo` lists, in one place, every key a batch's `info` may carry; a source sets the
ones that apply to it and the loop reads each with a default.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Protocol, TypedDict

import numpy as np
import torch


class BatchInfo(TypedDict, total=False):
    """The counters and positions that travel with one batch (every key is optional)."""

    contexts: int  # contexts (token blocks) this batch comes from
    tokens: int  # tokens forwarded to make it
    corpus_passes: int  # completed passes over the corpus (or the store) so far
    position: dict  # the source's resumable position right after this batch (generation.text, storage.replay)
    next_context: int  # the model source's context counter after this batch (low 40 bits of origin ids)
    next_id: int  # the synthetic source's next row id
    # per row: {"token_ids": int32 [k], the token at the row's position; "positions": int32 [k], its place
    # in its context (0 = BOS); "doc_ids": int64 [k], the context (model), row id (synthetic) or stored id}
    provenance: dict
    rows_overflowed: int  # rows dropped because they overflowed a float16 buffer
    store: dict  # replay only: the store's pass, shard and bad shards, for the status


class RowBatch(NamedTuple):
    """One batch of rows from a source."""

    rows: torch.Tensor  # [k, *sample_shape] on the CPU, in the buffer's dtype; valid until the next batch
    origin: np.ndarray  # int64 [k]: the context each row comes from, unique across generators (-1: unknown)
    info: BatchInfo


class RowSource(Protocol):
    """An endless (or, for a finished replay, idling) stream of batches. A source may also have
    `close()`, called before the next source is built, to free its model and buffers, and `fresh_rows =
    True` when every batch's rows are a new tensor (not memory reused for the next batch), so the loop
    need not wait for the statistics thread to finish with them."""

    def __iter__(self) -> Iterator[RowBatch]: ...
