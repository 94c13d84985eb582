"""The store's on-disk format, defined once: file names, shard headers, manifests, and what they describe.

Layout of a store directory (local, or any fsspec URL such as s3://bucket/dir):

    manifest-g00003.json          one per generator g (written only by g, rewritten atomically)
    shard-g00003-000017.safetensors   complete shards of generator g, never modified once renamed
    .shard-g00003-000018.safetensors.tmp   the shard g is writing now (removed when g starts again)

A shard is a safetensors file: `rows` [n, *sample_shape] in the buffer dtype, `origin` int64 [n] and,
when the source gave provenance, the arrays of wire.PROVENANCE [n]. Its header is padded to DATA_START
bytes so the rows start on a page boundary (a memory map reads them in place).
A manifest names the model, revision, dataset, sites, layers, the names of a row's points (actdata.points),
dtype, sample shape, the generator
partition (g of G), the running statistics of exactly the rows in its shards, and the shard list with
rows, bytes and the checksum of each shard's data region under a key that names its algorithm (CHECKSUMS):
"crc32c" (hardware CRC-32C) in version 2, "crc32" (zlib) in the version-1 stores still read.
`Shard` and `Store` are what a reader learns from
the manifests (actdata.storage.catalog.open_store); `check_manifest` and `check_header` refuse a malformed
manifest or shard header before anything relies on it; `verify_shard` checks one shard's data as well.
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
from ..points import configured
from ..stats import RunningStats
from ..wire import (
    DTYPE_NAMES,
    DTYPES,
    PROVENANCE,
    PROVENANCE_BYTES,
    TensorEntry,
    parse_header,
    row_bytes,
    tensors_layout,
)

FORMAT = "actdata-store"
VERSION = 2  # version 2: shards carry a CRC-32C; version 1 (zlib CRC-32) is still read and extended
READ_VERSIONS = (1, 2)
DATA_START = 4096  # bytes of header (8-byte length + JSON padded with spaces): rows start page-aligned
MANIFEST_RE = re.compile(r"manifest-g(\d+)\.json$")
SHARD_RE = re.compile(r"shard-g(\d+)-(\d+)\.safetensors$")


def _crc32c(data, value: int = 0) -> int:
    import google_crc32c  # noqa: PLC0415 - the server extra's; a reader of version-1 stores does without it

    # it takes numpy arrays and bytes, not memoryviews: a zero-copy array over any buffer
    return google_crc32c.extend(value, data if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8))


# A shard's checksum in its manifest entry: the key names the algorithm, the value is the checksum of the
# data region (every byte after DATA_START) as an unsigned 32-bit integer.
CHECKSUMS = {"crc32c": _crc32c, "crc32": zlib.crc32}
CHECKSUM = "crc32c"  # what a writer computes
CHECKSUM_NAMES = {"crc32c": "CRC-32C", "crc32": "CRC-32"}


def checksum(kind: str, data, value: int = 0) -> int:
    """The running checksum `kind` (a key of CHECKSUMS) of `value` extended by the bytes of `data`."""
    return CHECKSUMS[kind](data, value)


def shard_checksum(entry: dict) -> tuple[str, Optional[int]]:
    """(algorithm, value) of a manifest's shard entry; value None when it carries no checksum."""
    for kind in CHECKSUMS:
        if entry.get(kind) is not None:
            return kind, entry[kind]
    return CHECKSUM, None


class StoreError(ConfigError):
    """A store that cannot be used; one line that starts with the config key that named it, then the file."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).splitlines()))


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
    specs = ([("rows", DTYPES[dtype], (n, *shape))]
             + [(k, torch.from_numpy(a).dtype, a.shape) for k, a in extras.items()])
    prefix, _, _ = tensors_layout(specs, {"format": FORMAT, "version": VERSION})
    text = prefix[8:]  # the JSON, whose trailing spaces are padding
    if len(text) > DATA_START - 8:
        raise ValueError("shard header does not fit in DATA_START")
    return (DATA_START - 8).to_bytes(8, "little") + text.ljust(DATA_START - 8)


def read_header(f) -> dict[str, TensorEntry]:
    """The tensors of a shard's safetensors header; ValueError saying what is wrong with a malformed one."""
    raw = f.read(8)
    n = int.from_bytes(raw, "little")
    if len(raw) < 8 or n != DATA_START - 8:
        raise ValueError(f"not an actdata shard (safetensors header length {n if len(raw) == 8 else 'missing'}, "
                         f"expected {DATA_START - 8})")
    text = f.read(n)
    if len(text) < n:
        raise ValueError(f"the shard ends inside its header ({8 + len(text)} bytes)")
    return parse_header(text)[0]  # a WireError is a ValueError


def check_header(head: dict[str, TensorEntry], shard: Shard, sample_shape: tuple, dtype: str) -> None:
    """ValueError when a shard's header does not hold what its manifest entry says (rows, dtype, arrays, size)."""
    rows = head.get("rows")
    if rows is None or rows.shape != (shard.rows, *sample_shape) or rows.dtype != DTYPES[dtype] or rows.begin:
        got = "no rows" if rows is None else f"rows {list(rows.shape)} {DTYPE_NAMES.get(rows.dtype, rows.dtype)}"
        raise ValueError(f"header holds {got}, the manifest says {shard.rows} rows of {list(sample_shape)} {dtype}")
    want = {"origin": torch.int64, **(PROVENANCE if shard.provenance else {})}
    for name, t in want.items():
        e = head.get(name)
        if e is None or e.dtype != t or e.shape != (shard.rows,):
            raise ValueError(f"header lacks {name} {t} [{shard.rows}]" if e is None else
                             f"header holds {name} {e.dtype} {list(e.shape)}, expected {t} [{shard.rows}]")
    end = max(e.end for e in head.values())
    if DATA_START + end > shard.bytes:
        raise ValueError(f"header places data up to byte {DATA_START + end}, the shard has {shard.bytes}")


def stats_to_json(stats: Optional[RunningStats]) -> Optional[dict]:
    if stats is None:
        return None
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in stats.state_dict().items()}


def describe(cfg: Config, shape: tuple, g: int, G: int) -> dict:
    """What a manifest says about where its rows come from."""
    gen = cfg.generator
    return {"format": FORMAT, "version": VERSION, "source": gen.source,
            "model": {"name": cfg.model.name, "revision": cfg.model.revision, "dtype": cfg.model.dtype}
            if gen.source == "model" else None,
            "dataset": {"name": cfg.dataset.name, "config": cfg.dataset.config, "split": cfg.dataset.split}
            if gen.source == "model" else None,
            "sites": list(gen.sites) if gen.source == "model" else None,
            "layers": (gen.layers if isinstance(gen.layers, str) else list(gen.layers))
            if gen.source == "model" else None,
            "context_length": gen.context_length if gen.source == "model" else None,
            "dtype": cfg.buffer.dtype, "sample_shape": list(shape), "row_bytes": row_bytes(shape, cfg.buffer.dtype),
            "points": configured(cfg, shape), "generator": g, "generators": G}



@dataclass
class Shard:
    file: str  # full path (fsspec path inside the store's filesystem)
    rows: int
    bytes: int
    crc: Optional[int]  # the checksum of the data region, by algorithm `crc_kind` (CHECKSUMS)
    provenance: bool
    g: int = 0
    crc_kind: str = CHECKSUM


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


@dataclass
class Manifest:
    """One generator's manifest, checked by `check_manifest`: its fields as written, its statistics parsed."""
    name: str
    fields: dict
    stats: Optional[RunningStats]


def _ints(x, least: int) -> bool:
    """x is a list of integers (not booleans), each >= least."""
    return isinstance(x, list) and all(type(v) is int and v >= least for v in x)


def _int_at_least(x, least: int) -> bool:
    return type(x) is int and x >= least


def read_manifest(fs, path: str, where: str) -> Optional[Manifest]:
    """The checked manifest at `path` in filesystem `fs` (None when there is no such file); StoreError
    starting with `where` (the key and the file) for one that cannot be read or is malformed."""
    try:
        with fs.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except Exception as e:  # permissions, a directory of that name, a remote filesystem's own errors
        raise StoreError(f"{where}: cannot be read ({type(e).__name__}: {e})") from None
    try:
        m = json.loads(raw)
    except ValueError as e:  # UnicodeDecodeError included
        raise StoreError(f"{where}: not JSON ({e})") from None
    return check_manifest(m, path.rsplit("/", 1)[-1], where)


def check_manifest(m, name: str, where: str) -> Manifest:
    """Every field a reader or a continuing writer relies on, of the right type and consistent with the
    shard layout (a shard's bytes follow from its rows); StoreError starting with `where` otherwise."""
    def bad(what: str) -> StoreError:
        return StoreError(f"{where}: {what}")

    if not isinstance(m, dict):
        raise bad(f"a JSON {type(m).__name__}, not a manifest object")
    if m.get("format") != FORMAT:
        raise bad(f"not an actdata store manifest (format {m.get('format')!r})")
    if m.get("version") not in READ_VERSIONS:
        raise bad(f"format version {m.get('version')!r}; this actdata reads versions "
                  f"{', '.join(map(str, READ_VERSIONS))}")
    dtype, shape = m.get("dtype"), m.get("sample_shape")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not _ints(shape, 1) or not shape:
        raise bad(f"sample_shape {shape!r} is not a list of positive integers")
    for k, least in (("generator", 0), ("generators", 1), ("rows", 0), ("bytes", 0)):
        if not _int_at_least(m.get(k), least):
            raise bad(f"{k} {m.get(k)!r} is not an integer >= {least}")
    for k in ("model", "dataset"):
        if m.get(k) is not None and not isinstance(m[k], dict):
            raise bad(f"{k} {m[k]!r} is neither an object nor null")
    shards = m.get("shards")
    if not isinstance(shards, list):
        raise bad(f"shards is {'missing' if shards is None else 'a JSON ' + type(shards).__name__}, not a list")
    rb, seen = row_bytes(tuple(shape), dtype), set()
    if m.get("row_bytes", rb) != rb:
        raise bad(f"row_bytes {m['row_bytes']!r}, but rows of {shape} {dtype} have {rb}")
    for i, s in enumerate(shards):
        if not isinstance(s, dict):
            raise bad(f"shards[{i}] is a JSON {type(s).__name__}, not an object")
        file = s.get("file")
        if not isinstance(file, str) or not SHARD_RE.fullmatch(file):
            raise bad(f"shards[{i}].file {file!r} is not a shard name (shard-gNNNNN-NNNNNN.safetensors)")
        if file in seen:
            raise bad(f"shard {file} is listed twice")
        seen.add(file)
        for k in ("rows", "bytes"):
            if not _int_at_least(s.get(k), 0):
                raise bad(f"shard {file}: {k} {s.get(k)!r} is not an integer >= 0")
        if not isinstance(s.get("provenance", False), bool):
            raise bad(f"shard {file}: provenance {s['provenance']!r} is not true or false")
        for kind in CHECKSUMS:
            crc = s.get(kind)
            if crc is not None and not (_int_at_least(crc, 0) and crc < 1 << 32):
                raise bad(f"shard {file}: {kind} {crc!r} is not a 32-bit checksum")
        size = DATA_START + s["rows"] * (rb + 8 + (PROVENANCE_BYTES if s.get("provenance") else 0))
        if s["bytes"] != size:
            raise bad(f"shard {file}: {s['bytes']} bytes, but {s['rows']} rows of {shape} {dtype} make {size}")
    for k in ("rows", "bytes"):
        if m[k] != sum(s[k] for s in shards):
            raise bad(f"{k} {m[k]} is not the sum over its shards ({sum(s[k] for s in shards)})")
    stats = None
    if m.get("stats") is not None:
        try:
            if not isinstance(m["stats"], dict):
                raise TypeError(f"a JSON {type(m['stats']).__name__}")
            stats = RunningStats.from_state_dict(m["stats"], tuple(shape))
            if stats.sample_shape != tuple(shape) or stats.count < 0:
                raise ValueError(f"rows of {list(stats.sample_shape)}, count {stats.count}")
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"stats are not statistics of rows of {shape} ({type(e).__name__}: {e})") from None
    return Manifest(name, m, stats)


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


def verify_shard(store: Store, shard: Shard, buf: Optional[bytearray] = None) -> Optional[str]:
    """None when the shard's header matches the manifest and its data checksum matches; else what is wrong.
    `buf`: the chunk the data is read into (reused by a caller that verifies shard after shard)."""
    fs, _, _ = filesystem(store.path)
    buf = bytearray(64 << 20) if buf is None else buf
    try:
        with fs.open(shard.file, "rb") as f:
            check_header(read_header(f), shard, store.sample_shape, store.dtype)
            f.seek(DATA_START)
            crc = 0
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                crc = checksum(shard.crc_kind, memoryview(buf)[:n], crc)
    except ValueError as e:
        return str(e)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    if shard.crc is not None and crc != shard.crc:
        return f"{CHECKSUM_NAMES[shard.crc_kind]} {crc:08x}, manifest says {shard.crc:08x}"
    return None
