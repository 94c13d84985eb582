"""The store's on-disk format, defined once: file names, shard headers, manifests, and what they describe.

Layout of a store directory (local, or any fsspec URL such as s3://bucket/dir):

    manifest-g00003.json          one per generator g (written only by g, rewritten atomically)
    shard-g00003-000017.safetensors   complete shards of generator g, never modified once renamed
    .shard-g00003-000018.safetensors.tmp   the shard g is writing now (removed when g starts again)

A shard is a safetensors file: `rows` [n, *sample_shape] in the buffer dtype, `origin` int64 [n] and,
when the source gave provenance, `token_ids` int32, `positions` int32, `doc_ids` int64 [n]. Its header
is padded to DATA_START bytes so the rows start on a page boundary (a memory map reads them in place).
A manifest names the model, revision, dataset, sites, layers, dtype, sample shape, the generator
partition (g of G), the running statistics of exactly the rows in its shards, and the shard list with
rows, bytes and the CRC-32 of each shard's data region. `Shard` and `Store` are what a reader learns from
the manifests (actdata.storage.catalog.open_store); `verify_shard` checks one shard against them.
"""
from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ..config import Config, ConfigError
from ..wire import DTYPES, row_bytes, tensors_layout
from ..stats import RunningStats

FORMAT = "actdata-store"
VERSION = 1
DATA_START = 4096  # bytes of header (8-byte length + JSON padded with spaces): rows start page-aligned
MANIFEST_RE = re.compile(r"manifest-g(\d+)\.json$")


class StoreError(ConfigError):
    """A store that cannot be used; the message starts with the config key that named it."""


def manifest_name(g: int) -> str:
    return f"manifest-g{g:05d}.json"


def shard_name(g: int, n: int) -> str:
    return f"shard-g{g:05d}-{n:06d}.safetensors"


def filesystem(path: str):
    """(fsspec filesystem, path inside it, is_local)."""
    from fsspec.core import url_to_fs
    from fsspec.implementations.local import LocalFileSystem

    fs, root = url_to_fs(path)
    return fs, root.rstrip("/") or "/", isinstance(fs, LocalFileSystem)


def shard_header(n: int, shape: tuple, dtype: str, extras: dict[str, np.ndarray]) -> bytes:
    """The safetensors header (length + JSON, space-padded to DATA_START) for n rows followed by extras."""
    specs = [("rows", DTYPES[dtype], (n, *shape))] + [(k, torch.from_numpy(a).dtype, a.shape) for k, a in extras.items()]
    prefix, _, _ = tensors_layout(specs, {"format": FORMAT, "version": VERSION})
    text = prefix[8:]  # the JSON, whose trailing spaces are padding
    if len(text) > DATA_START - 8:
        raise ValueError("shard header does not fit in DATA_START")
    return (DATA_START - 8).to_bytes(8, "little") + text.ljust(DATA_START - 8)


def read_header(f) -> dict:
    n = int.from_bytes(f.read(8), "little")
    if not 2 <= n <= 100 << 20:
        raise ValueError(f"not a safetensors file (header length {n})")
    return json.loads(f.read(n))


def stats_to_json(stats: Optional[RunningStats]) -> Optional[dict]:
    if stats is None:
        return None
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in stats.state_dict().items()}


def stats_from_json(d: Optional[dict]) -> Optional[RunningStats]:
    return None if not d else RunningStats.from_state_dict(d)


def describe(cfg: Config, shape: tuple, g: int, G: int) -> dict:
    """What a manifest says about where its rows come from."""
    gen = cfg.generator
    return {"format": FORMAT, "version": VERSION, "source": gen.source,
            "model": {"name": cfg.model.name, "revision": cfg.model.revision, "dtype": cfg.model.dtype}
            if gen.source == "model" else None,
            "dataset": {"name": cfg.dataset.name, "config": cfg.dataset.config, "split": cfg.dataset.split}
            if gen.source == "model" else None,
            "sites": list(gen.sites) if gen.source == "model" else None,
            "layers": (gen.layers if isinstance(gen.layers, str) else list(gen.layers)) if gen.source == "model" else None,
            "context_length": gen.context_length if gen.source == "model" else None,
            "dtype": cfg.buffer.dtype, "sample_shape": list(shape), "row_bytes": row_bytes(shape, cfg.buffer.dtype),
            "generator": g, "generators": G}



@dataclass
class Shard:
    file: str  # full path (fsspec path inside the store's filesystem)
    rows: int
    bytes: int
    crc32: Optional[int]
    provenance: bool
    g: int = 0


@dataclass
class Store:
    """What a store holds, from its manifests: rows of `sample_shape` in `dtype`, in `shards`."""
    path: str
    kind: str  # "actdata" (shards + manifests) | "datasets" (a datasets.save_to_disk directory)
    sample_shape: tuple
    dtype: str
    shards: list
    manifests: list = field(default_factory=list)
    stats: Optional[RunningStats] = None
    column: Optional[str] = None

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


def load_json(fs, path: str) -> Optional[dict]:
    try:
        with fs.open(path, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def check_compatible(m: dict, want: dict, key: str, path: str) -> None:
    """Raise StoreError when manifest `m` does not describe the same rows as `want`."""
    for k in ("sample_shape", "dtype", "source", "model", "dataset", "sites", "layers"):
        a, b = m.get(k), want.get(k)
        if k == "model" and a and b:
            a, b = a.get("name"), b.get("name")
        if k == "dataset" and a and b:
            a, b = a.get("name"), b.get("name")
        if a != b:
            raise StoreError(f"{key}: the store at {path} holds rows with {k}={a!r}, this config makes {k}={b!r}")


def verify_shard(store: Store, shard: Shard, chunk: int = 64 << 20) -> Optional[str]:
    """None when the shard's header matches the manifest and its data CRC-32 matches; else what is wrong."""
    fs, _, _ = filesystem(store.path)
    try:
        with fs.open(shard.file, "rb") as f:
            head = read_header(f)
            if head.get("rows", {}).get("shape", [None])[0] != shard.rows:
                return f"header says {head.get('rows', {}).get('shape')} rows, manifest says {shard.rows}"
            f.seek(DATA_START)
            crc = 0
            while True:
                b = f.read(chunk)
                if not b:
                    break
                crc = zlib.crc32(b, crc)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    if shard.crc32 is not None and crc != shard.crc32:
        return f"CRC-32 {crc:08x}, manifest says {shard.crc32:08x}"
    return None

