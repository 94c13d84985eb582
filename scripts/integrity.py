"""R2: rows read by many clients while the writer runs flat out are whole, and served no more often
than their read budget allows.

    .venv/bin/python scripts/integrity.py [--rows 1000000] [--clients 8] [--max-reads 1]

Starts a synthetic server (self-checking rows: each row is a function of its unique id), reads
--rows rows over --clients keep-alive connections and counts torn rows (a row that is not exactly
the row its id names) and rows served more than --max-reads times.
"""
from __future__ import annotations

import argparse
import collections
import http.client
import sys
import threading
import time
from urllib.parse import urlsplit

from actdata import wire
from actdata.generation.synthetic import verify_rows


def read_rows(url: str, total: int, clients: int, batch: int = 1024, timeout: float = 600) -> dict:
    """Read `total` rows over `clients` connections; returns {rows, torn, max_count, over(k)}."""
    u = urlsplit(url)
    counts: collections.Counter = collections.Counter()
    torn, done, lock = [0], [0], threading.Lock()
    deadline = time.time() + timeout

    def client():
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        while time.time() < deadline:
            with lock:
                if done[0] >= total:
                    break
            conn.request("GET", f"{wire.TENSOR_PATH}?num_samples={batch}")
            r = conn.getresponse()
            if r.status == 503:
                r.read()
                time.sleep(0.01)
                continue
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
            t, view = wire.empty_for(r.headers)
            got = 0
            while got < len(view):
                got += r.readinto(view[got:])
            ids, ok = verify_rows(t)
            with lock:
                torn[0] += int((~ok).sum())
                counts.update(ids[ok].tolist())
                done[0] += len(ids)
        conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"rows": done[0], "torn": torn[0], "distinct": len(counts),
            "max_count": max(counts.values(), default=0), "counts": counts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-reads", type=int, default=1)
    ap.add_argument("--buffer", type=int, default=20_000)
    a = ap.parse_args()
    from actdata.serving.process import ServerProcess

    with ServerProcess(["+preset=test", "generator.source=synthetic", f"buffer.size={a.buffer}",
                        f"buffer.max_reads={a.max_reads}", "buffer.min_fill=0.25"]) as srv:
        t0 = time.time()
        r = read_rows(srv.url, a.rows, a.clients)
        dt = time.time() - t0
    over = sum(1 for c in r["counts"].values() if c > a.max_reads)
    print(f"{r['rows']:,} rows in {dt:.1f} s by {a.clients} clients (max_reads={a.max_reads}): torn {r['torn']}, "
          f"distinct {r['distinct']:,}, most reads of one row {r['max_count']}, rows over budget {over}")
    sys.exit(0 if r["torn"] == 0 and over == 0 else 1)


if __name__ == "__main__":
    main()
