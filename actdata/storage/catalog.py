"""What a store directory holds: `open_store` reads an actdata store's manifests, or a datasets.save_to_disk
directory's metadata, into a `Store` (reading no rows)."""
from __future__ import annotations

import os
from typing import Optional

from .datasets_dir import open_dataset_store
from .format import FORMAT, MANIFEST_RE, Shard, Store, StoreError, filesystem, load_json, stats_from_json


def open_store(path: Optional[str], key: str = "store.path", column: Optional[str] = None) -> Store:
    """Read a store's manifests (or a datasets directory's metadata). Raises StoreError naming `key` for a
    missing, empty or half-written store. Reads no rows."""
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
    ms, shards, sizes = [], [], {}
    try:
        for info in fs.ls(root, detail=True):
            sizes[os.path.basename(info["name"])] = info.get("size")
    except Exception:
        pass
    for name in manifests:
        m = load_json(fs, f"{root}/{name}")
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise StoreError(f"{key}: {path}/{name} is not an actdata store manifest")
        if ms:
            for k in ("sample_shape", "dtype"):
                if m.get(k) != ms[0].get(k):
                    raise StoreError(f"{key}: {name} holds {k}={m.get(k)} but {manifests[0]} holds {ms[0].get(k)}")
        ms.append(m)
        for s in m.get("shards", []):
            if sizes.get(s["file"]) is None:
                raise StoreError(f"{key}: {path}: shard {s['file']} listed in {name} is missing")
            if sizes[s["file"]] != s["bytes"]:
                raise StoreError(f"{key}: {path}: shard {s['file']} is {sizes[s['file']]} bytes, {name} says {s['bytes']}")
            shards.append(Shard(f"{root}/{s['file']}", int(s["rows"]), int(s["bytes"]), s.get("crc32"),
                                bool(s.get("provenance")), int(m.get("generator", 0))))
    if not shards or not sum(s.rows for s in shards):
        raise StoreError(f"{key}: {path} holds no complete shard yet")
    stats = [stats_from_json(m.get("stats")) for m in ms]
    stats = [s for s in stats if s is not None]
    from ..stats import merged

    return Store(path, "actdata", tuple(ms[0]["sample_shape"]), ms[0]["dtype"],
                 sorted(shards, key=lambda s: s.file), ms, merged(stats) if stats else None)

