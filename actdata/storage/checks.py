"""The store checks made before anything is allocated: the replayed store gives the row shape, and a store
written to or warm-started from must hold the rows this config makes (ConfigError naming the key)."""
from __future__ import annotations

import os
from typing import Optional

from ..config import Config
from .catalog import open_store
from .format import MANIFEST_RE, StoreError, check_compatible, describe, filesystem, read_manifest


def check_store_config(cfg: Config) -> Optional[tuple]:
    """Before anything is allocated: for generator.source=store, the row shape from the store (raising
    ConfigError naming the key the config contradicts); for store.write, that an existing store in
    store.path describes the same rows. Returns the store's sample shape for source=store, else None."""
    st, b = cfg.store, cfg.buffer
    if cfg.generator.source == "store":
        s = open_store(st.path, "store.path", st.column)
        if b.dtype != s.dtype:
            raise StoreError(f"buffer.dtype: the store at {st.path} holds {s.dtype} rows, got buffer.dtype={b.dtype}")
        if b.sample_shape and tuple(int(x) for x in b.sample_shape) != s.sample_shape:
            raise StoreError(f"buffer.sample_shape: the store at {st.path} holds rows of {list(s.sample_shape)}, "
                             f"got {list(b.sample_shape)}")
        if b.activation_dim and int(b.activation_dim) != s.sample_shape[-1]:
            raise StoreError(f"buffer.activation_dim: the store at {st.path} holds rows of width "
                             f"{s.sample_shape[-1]}, got {b.activation_dim}")
        return s.sample_shape
    return None


def check_store_matches(cfg: Config, shape: tuple) -> None:
    """store.write into a directory holding rows of another kind, or buffer.warm_start from a store of other
    rows: a ConfigError naming the key (before anything is allocated)."""
    want = describe(cfg, shape, 0, 1)
    if cfg.store.write:
        try:
            fs, root, _ = filesystem(cfg.store.path)
            names = [os.path.basename(p) for p in fs.ls(root, detail=False)] if fs.isdir(root) else []
        except Exception as e:
            raise StoreError(f"store.path: cannot use {cfg.store.path}: {type(e).__name__}: {e}") from None
        for name in sorted(n for n in names if MANIFEST_RE.match(n)):
            m = read_manifest(fs, f"{root}/{name}", f"store.path: {cfg.store.path}/{name}")
            if m is not None:
                check_compatible(m.fields, want, "store.path", cfg.store.path)
    if cfg.buffer.warm_start:
        s = open_store(cfg.buffer.warm_start, "buffer.warm_start", cfg.store.column)
        if s.kind == "actdata":
            check_compatible(s.manifests[0], want, "buffer.warm_start", cfg.buffer.warm_start)
        elif (s.sample_shape, s.dtype) != (tuple(shape), cfg.buffer.dtype):
            raise StoreError(f"buffer.warm_start: {cfg.buffer.warm_start} holds {s.dtype} rows of "
                             f"{list(s.sample_shape)}, the buffer holds {cfg.buffer.dtype} rows of {list(shape)}")
