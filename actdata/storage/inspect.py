"""`python -m actdata.store DIR [--verify]`: what a store holds (rows, shards, generators, statistics) and,
with --verify, every shard's CRC-32 checked against its manifest."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

from .catalog import open_store
from .format import StoreError, verify_shard


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m actdata.store", description="Inspect an actdata store.")
    p.add_argument("path", help="the store directory (or URL)")
    p.add_argument("--verify", action="store_true", help="read every shard and check its CRC-32")
    a = p.parse_args(argv)
    try:
        s = open_store(a.path, "path")
    except StoreError as e:
        print(f"actdata.store: {e}", file=sys.stderr)
        return 2
    print(f"store {s.path} ({s.kind})")
    print(f"  rows: {s.rows:,} of {list(s.sample_shape)} {s.dtype}   shards: {len(s.shards)}   bytes: {s.bytes:,}")
    for m in s.manifests:
        print(f"  generator {m.get('generator')} of {m.get('generators')}: {len(m.get('shards', []))} shards, "
              f"{m.get('rows', 0):,} rows | source {m.get('source')} | model {m.get('model')} | "
              f"dataset {m.get('dataset')} | sites {m.get('sites')} layers {m.get('layers')}")
    if s.stats is not None:
        print("  statistics: " + json.dumps(s.stats.summary()))
    if not a.verify:
        return 0
    if s.kind != "actdata":
        print("  --verify: a datasets directory carries no shard checksums")
        return 0
    bad = 0
    t0 = time.perf_counter()
    for sh in s.shards:
        err = verify_shard(s, sh)
        if err:
            bad += 1
            print(f"  BAD {os.path.basename(sh.file)}: {err}")
    dt = time.perf_counter() - t0
    print(f"  verified {len(s.shards)} shards ({s.bytes / 1e9:.2f} GB in {dt:.1f} s): "
          + ("all match" if not bad else f"{bad} failed"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
