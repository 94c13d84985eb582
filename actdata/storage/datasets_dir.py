"""A datasets.Dataset.save_to_disk directory (SAELens's activation cache layout: one array column per hook,
each example a context [context_size, d] or a row [d]) as a store: its examples are cut into blocks that
play the part of shards (`open_dataset_store`), read by `DatasetBlocks`; the arrow files are memory-mapped
by `datasets`."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .format import Shard, Store, StoreError


class DatasetBlocks:
    """A datasets.save_to_disk directory as blocks of rows: `read(block)` -> (rows, origin, provenance)."""

    def __init__(self, store: Store):
        import datasets

        ds = datasets.load_from_disk(store.path)
        self.ds, self.column, self.store = ds.with_format("numpy"), store.column, store
        self.has_tokens = "token_ids" in ds.column_names

    def read(self, shard: Shard):
        a, b = (int(x) for x in shard.file.split(":"))
        part = self.ds[a:b]
        x = np.asarray(part[self.column])
        per = int(np.prod(x.shape[1:-1])) if x.ndim > 2 else 1
        rows = torch.from_numpy(np.ascontiguousarray(x.reshape(-1, x.shape[-1])))
        ex = np.repeat(np.arange(a, b, dtype=np.int64), per)
        prov = None
        if self.has_tokens:
            tok = np.asarray(part["token_ids"]).reshape(-1).astype(np.int32)
            if len(tok) == len(rows):
                prov = {"token_ids": tok, "positions": np.tile(np.arange(per, dtype=np.int32), b - a),
                        "doc_ids": ex}
        return rows, ex, prov


def open_dataset_store(path: str, key: str, column: Optional[str]) -> Store:
    """A datasets.save_to_disk directory as a Store: blocks of examples as shards (no checksums, no stats)."""
    try:
        import datasets

        ds = datasets.load_from_disk(path)
    except Exception as e:
        raise StoreError(f"{key}: {path} looks like a datasets directory but cannot be loaded: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        raise StoreError(f"{key}: {path} holds a DatasetDict ({', '.join(ds)}); point at one split's directory")
    if len(ds) == 0:
        raise StoreError(f"{key}: {path} holds no rows")
    arrays = [c for c in ds.column_names if c != "token_ids"]
    if column is None:
        if len(arrays) != 1:
            raise StoreError(f"store.column: {path} has columns {arrays}; name the activation column")
        column = arrays[0]
    if column not in ds.column_names:
        raise StoreError(f"store.column: {path} has no column {column!r} (columns: {ds.column_names})")
    first = np.asarray(ds.with_format("numpy")[0][column])
    if first.dtype.kind != "f" or first.ndim < 1:
        raise StoreError(f"store.column: column {column!r} holds {first.dtype} of shape {first.shape}, not float rows")
    dtype = {"float32": "float32", "float16": "float16"}.get(str(first.dtype))
    if dtype is None:
        raise StoreError(f"store.column: column {column!r} holds {first.dtype}; float32 or float16 needed")
    per = int(np.prod(first.shape[:-1])) if first.ndim > 1 else 1
    row_b = first.shape[-1] * first.dtype.itemsize
    block = max(1, (64 << 20) // (per * row_b))  # about 64 MB of rows per block
    shards = [Shard(f"{a}:{min(a + block, len(ds))}", (min(a + block, len(ds)) - a) * per,
                    (min(a + block, len(ds)) - a) * per * row_b, None, "token_ids" in ds.column_names)
              for a in range(0, len(ds), block)]
    return Store(path, "datasets", (int(first.shape[-1]),), dtype, shards, column=column)
