"""R1: many concurrent streaming clients against one server on loopback, and whether it holds up.

    .venv/bin/python scripts/load_test.py [--clients 64] [--seconds 60] [--url URL]

Without --url it starts a synthetic server (rows reused, so the server, not the writer, is under load).
Clients are mixed: 3/4 read raw tensors, 1/8 JSON, 1/8 /stats, each over its own keep-alive connection.
Prints requests, errors, 5xx, 503s, p50/p99 latency, GB/s, and the resident memory of every server
process (private memory, RssAnon) after a warm-up and at the end of the run (it should stay flat).
"""
from __future__ import annotations

import argparse
import http.client
import os
import statistics
import sys
import threading
import time
from urllib.parse import urlsplit

from actdata import wire


def rss_mb(pid: int) -> float:
    """Private resident memory (RssAnon) in MB: the shared buffer's pages, which every process maps
    and touches as it serves, are left out."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def server_pids(leader: int) -> list[int]:
    """The server's processes: its process group (ServerProcess starts it in its own session)."""
    out = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open(f"/proc/{e}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[2]) == leader and fields[0] != "Z":
                    out.append(int(e))
            except OSError:
                pass
    return out


def client_loop(url: str, kind: str, deadline: float, out: dict, lock: threading.Lock, rows: int) -> None:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    path = {"tensor": f"{wire.TENSOR_PATH}?num_samples={rows}", "json": f"{wire.JSON_PATH}?num_samples=4",
            "stats": "/stats"}[kind]
    lat, n, errors, s5xx, s503, nbytes = [], 0, 0, 0, 0, 0
    while time.time() < deadline:
        t0 = time.perf_counter()
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            if kind == "tensor" and r.status == 200:
                t, view = wire.empty_for(r.headers)
                got = 0
                while got < len(view):
                    k = r.readinto(view[got:])
                    if not k:
                        raise ConnectionError("short body")
                    got += k
                nbytes += got
            else:
                body = r.read()
                if r.status == 200 and kind != "tensor":
                    nbytes += len(body)
            n += 1
            if r.status == 503:
                s503 += 1
                time.sleep(float(r.headers.get("Retry-After", "1")) / 10)
            elif r.status >= 500:
                s5xx += 1
            elif r.status != 200:
                errors += 1
            lat.append(time.perf_counter() - t0)
        except (OSError, http.client.HTTPException):
            errors += 1
            conn.close()
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.close()
    with lock:
        out["latency"] += lat
        for k, v in (("requests", n), ("errors", errors), ("5xx", s5xx), ("503", s503), ("bytes", nbytes)):
            out[k] += v


def run_load(url: str, clients: int, seconds: float, leader_pid: int | None = None, rows: int = 256) -> dict:
    """Run the mixed load; returns counts, latency percentiles, GB/s and per-process RSS (start, end)."""
    kinds = ["tensor"] * 6 + ["json", "stats"]
    out = {"latency": [], "requests": 0, "errors": 0, "5xx": 0, "503": 0, "bytes": 0}
    lock = threading.Lock()
    pids = server_pids(leader_pid) if leader_pid else []
    t0 = time.time()
    deadline = t0 + seconds
    threads = [threading.Thread(target=client_loop, args=(url, kinds[i % len(kinds)], deadline, out, lock, rows),
                                daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(min(5.0, seconds / 4))  # warm-up: pools and allocator arenas reach their working size
    rss0 = {p: rss_mb(p) for p in pids}
    for t in threads:
        t.join(seconds + 60)
    elapsed = time.time() - t0
    lat = sorted(out.pop("latency")) or [0.0]
    out.update(seconds=elapsed, gbps=out["bytes"] / elapsed / 1e9, p50_ms=1e3 * statistics.median(lat),
               p99_ms=1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
               rss_mb={p: (rss0[p], rss_mb(p)) for p in pids})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--rows", type=int, default=256, help="rows per tensor request")
    ap.add_argument("--url", help="an already running server (memory is then not sampled)")
    a = ap.parse_args()
    srv = None
    if a.url:
        url, leader = a.url, None
    else:
        from actdata.serving.process import ServerProcess

        srv = ServerProcess(["+preset=test", "generator.source=synthetic", "buffer.size=50000",
                             "buffer.max_reads=1000000000", "buffer.min_fill=0.5"])
        url, leader = srv.url, srv.proc.pid
        import requests

        while not requests.get(url + "/").json()["serving"]:
            time.sleep(0.2)
    try:
        print(f"{a.clients} clients for {a.seconds:.0f} s against {url} ...", flush=True)
        r = run_load(url, a.clients, a.seconds, leader, a.rows)
    finally:
        if srv:
            srv.stop()
    print(f"requests {r['requests']:,}  errors {r['errors']}  5xx {r['5xx']}  503 {r['503']}  "
          f"p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  {r['gbps']:.2f} GB/s")
    for pid, (a0, a1) in r["rss_mb"].items():
        print(f"  server process {pid}: private RSS {a0:.0f} -> {a1:.0f} MB ({a1 - a0:+.0f})")
    sys.exit(0 if r["errors"] == 0 and r["5xx"] == 0 else 1)


if __name__ == "__main__":
    main()
