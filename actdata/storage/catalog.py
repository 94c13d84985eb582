"""What a store directory holds: `open_store` reads an actdata store's manifests, or a datasets.save_to_disk
directory's metadata, into a `Store`. Every manifest is checked whole and every shard's header against
its manifest entry, so a malformed store is refused with one line naming the file before any row is read."""
from __future__ import annotations

import os
from typing import Optional

from ..points import count, point_names
from ..stats import merged
from .datasets_dir import open_dataset_store
from .format import (
    MANIFEST_RE,
    Manifest,
    Shard,
    Store,
    StoreError,
    check_header,
    filesystem,
    read_header,
    read_manifest,
    shard_checksum,
)


def open_store(path: Optional[str], key: str = "store.path", column: Optional[str] = None) -> Store:
    """Read a store's manifests and shard headers (or a datasets directory's metadata). Raises StoreError
    naming `key` and the file for a missing, empty, half-written or malformed store. Reads no rows."""
    if not path:
        raise StoreError(f"{key}: no store given")
    try:
        fs, root, _ = filesystem(path)
        if not fs.isdir(root):
            raise StoreError(f"{key}: {path} is not a directory")
        names = [os.path.basename(p) for p in fs.ls(root, detail=False)]
    except StoreError:
        raise
    except Exception as e:  # a bucket that does not exist, a filesystem package not installed...
        raise StoreError(f"{key}: cannot read {path}: {type(e).__name__}: {e}") from None
    manifests = sorted(n for n in names if MANIFEST_RE.match(n))
    if not manifests:
        if "state.json" in names and "dataset_info.json" in names:
            return open_dataset_store(path, key, column)
        half = [n for n in names if n.endswith(".tmp")]
        raise StoreError(f"{key}: {path} holds no store manifest" +
                         (f" (only a shard being written: {half[0]})" if half else
                          " (neither manifest-g*.json nor a datasets.save_to_disk directory)"))
    sizes = {}
    try:
        for info in fs.ls(root, detail=True):
            sizes[os.path.basename(info["name"])] = info.get("size")
    except Exception:
        pass
    ms: list[Manifest] = []
    shards = []
    for name in manifests:
        m = read_manifest(fs, f"{root}/{name}", f"{key}: {path}/{name}")
        if m is None:
            raise StoreError(f"{key}: {path}/{name} went away while the store was being read")
        for k in ("sample_shape", "dtype"):
            if ms and m.fields[k] != ms[0].fields[k]:
                raise StoreError(f"{key}: {path}/{name} holds {k}={m.fields[k]} but {ms[0].name} holds "
                                 f"{ms[0].fields[k]}")
        ms.append(m)
        for s in m.fields["shards"]:
            if sizes.get(s["file"]) is None:
                raise StoreError(f"{key}: {path}/{s['file']} (listed in {name}) is missing")
            if sizes[s["file"]] != s["bytes"]:
                raise StoreError(f"{key}: {path}/{s['file']} is {sizes[s['file']]} bytes, {name} says {s['bytes']}")
            kind, crc = shard_checksum(s)
            shards.append(Shard(f"{root}/{s['file']}", s["rows"], s["bytes"], crc,
                                s.get("provenance", False), m.fields["generator"], kind))
    if not shards or not sum(s.rows for s in shards):
        raise StoreError(f"{key}: {path} holds no complete shard yet")
    shape, dtype = tuple(ms[0].fields["sample_shape"]), ms[0].fields["dtype"]
    for sh in shards:  # a header that disagrees with its manifest is refused here, not found mid-replay
        try:
            with fs.open(sh.file, "rb") as f:
                check_header(read_header(f), sh, shape, dtype)
        except ValueError as e:
            raise StoreError(f"{key}: {path}/{os.path.basename(sh.file)}: {e}") from None
        except Exception as e:
            raise StoreError(f"{key}: {path}/{os.path.basename(sh.file)}: cannot be read ({type(e).__name__}: {e})"
                             ) from None
    stats = [m.stats for m in ms if m.stats is not None]
    return Store(path, "actdata", shape, dtype, sorted(shards, key=lambda s: s.file), [m.fields for m in ms],
                 merged(stats) if stats else None)


def stored_point_names(path: str, sample_shape: tuple) -> list[str]:
    """Names of the points of the rows of the store at `path`, as its first manifest writes them (from its
    sites x layers when it predates `points`); indices for a datasets directory. Reads one manifest."""
    try:
        fs, root, _ = filesystem(path)
        names = sorted(os.path.basename(p) for p in fs.ls(root, detail=False))
        first = next((n for n in names if MANIFEST_RE.match(n)), None)
        m = read_manifest(fs, f"{root}/{first}", f"store.path: {path}/{first}") if first else None
    except Exception:  # checked at start; a store unreadable since then still serves its points by index
        m = None
    if m is None:
        return point_names(sample_shape)
    named = m.fields.get("points")
    if isinstance(named, list) and len(named) == count(sample_shape) and all(isinstance(x, str) for x in named):
        return named
    return point_names(sample_shape, m.fields.get("sites"), m.fields.get("layers"))
