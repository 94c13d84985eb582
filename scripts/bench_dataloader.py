"""RemoteActivationDataset through a DataLoader with 1, 2 and 4 workers, beside the loopback-TCP limit.

Starts its own synthetic server (ServerProcess), measures the limits with ../shared/tools/limits.py's
method in the same run, then for each worker count: `reps` timed passes of `batches` batches after a
warm-up pass; prints medians of GB/s and samples/s with the ratio to the loopback limit.

    .venv/bin/python scripts/bench_dataloader.py [--batch-size 4096] [--workers 1 2 4] [--reps 3]
        [--batches 40] [--server-workers 2] [--max-reads 1] [--rcvbuf BYTES] [--url URL]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from actdata.client import ActivationClient, TensorReader
from actdata.dataset import RemoteActivationDataset, make_loader

HERE = os.path.dirname(os.path.abspath(__file__))
LIMITS = os.path.join(HERE, "..", "..", "shared", "tools", "limits.py")


def limits() -> dict:
    """{'memcpy_GBps': .., 'loopback_tcp_GBps': ..} from the shared limits script (same machine, same run)."""
    path = os.environ.get("ACTDATA_LIMITS", LIMITS)
    out = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=300, check=True).stdout
    return {k: float(v) for k, v in (line.split("=") for line in out.split() if "=" in line)}


def one_pass(loader, batches: int) -> tuple[float, int, int]:
    """(seconds, bytes, rows) for `batches` batches from an already-warm iterator source."""
    t0, nbytes, rows = time.perf_counter(), 0, 0
    for x in loader:
        nbytes += x.numel() * x.element_size()
        rows += x.shape[0]
    return time.perf_counter() - t0, nbytes, rows


def bench_loader(url: str, workers: int, args) -> tuple[float, float]:
    """Median (GB/s, samples/s) over reps; persistent workers so worker start-up is excluded."""
    ds = RemoteActivationDataset(url, batch_size=args.batch_size, max_batches=args.batches, rcvbuf=args.rcvbuf)
    loader = make_loader(ds, num_workers=workers, persistent_workers=workers > 0)
    one_pass(loader, args.batches)  # warm-up: workers started, connections open
    gbps, sps = [], []
    for _ in range(args.reps):
        dt, nbytes, rows = one_pass(loader, args.batches)
        gbps.append(nbytes / dt / 1e9)
        sps.append(rows / dt)
    del loader
    return statistics.median(gbps), statistics.median(sps)


def bench_single(url: str, args) -> tuple[float, float]:
    """One TensorReader in this process, no DataLoader: the client's own ceiling."""
    reader = TensorReader(url, rcvbuf=args.rcvbuf)
    reader.fetch(args.batch_size)
    gbps, sps = [], []
    for _ in range(args.reps):
        t0, nbytes = time.perf_counter(), 0
        for _ in range(args.batches):
            x, _ = reader.fetch(args.batch_size)
            nbytes += x.numel() * x.element_size()
        dt = time.perf_counter() - t0
        gbps.append(nbytes / dt / 1e9)
        sps.append(args.batches * args.batch_size / dt)
    reader.close()
    return statistics.median(gbps), statistics.median(sps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="use a running server instead of starting one")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batches", type=int, default=40, help="batches per timed pass")
    p.add_argument("--buffer-size", type=int, default=200_000)
    p.add_argument("--min-fill", type=float, default=0.1)
    p.add_argument("--server-workers", type=int, default=2)
    p.add_argument("--max-reads", type=int, default=1, help=">1 lets rows be served again (no refill load)")
    p.add_argument("--sample-shape", default="[768]")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rcvbuf", type=int, default=None, help="SO_RCVBUF bytes (default: kernel autotuning)")
    args = p.parse_args()
    torch.set_num_threads(1)

    srv = None
    url = args.url
    if url is None:
        from actdata.serve import ServerProcess

        srv = ServerProcess(["+preset=test", "generator.source=synthetic", f"buffer.size={args.buffer_size}",
                             f"buffer.min_fill={args.min_fill}", f"server.workers={args.server_workers}",
                             f"buffer.max_reads={args.max_reads}", f"buffer.sample_shape={args.sample_shape}",
                             f"buffer.dtype={args.dtype}"])
        url = srv.url
    try:
        client = ActivationClient(url)
        if not client.wait_for_data(args.batch_size * 2, timeout=300):
            raise SystemExit(f"{url}: not serving {args.batch_size * 2} rows within 300 s")
        st = client.get_stats()
        lim = limits()
        tcp = lim["loopback_tcp_GBps"]
        row_mb = args.batch_size * torch.tensor([], dtype=getattr(torch, st["dtype"])).element_size() * \
            int(torch.tensor(st["sample_shape"]).prod()) / 1e6
        print(f"server {url}: rows {st['sample_shape']} {st['dtype']}, capacity {st['capacity']:,}, "
              f"server.workers={args.server_workers}, max_reads={args.max_reads}; batch {args.batch_size} rows = "
              f"{row_mb:.1f} MB; medians of {args.reps} passes x {args.batches} batches")
        rows = [("memcpy limit", lim["memcpy_GBps"], None), ("loopback TCP limit", tcp, None)]
        g, s = bench_single(url, args)
        rows.append(("TensorReader, 1 client, no DataLoader", g, s))
        for w in args.workers:
            g, s = bench_loader(url, w, args)
            rows.append((f"DataLoader, {w} worker{'s' if w > 1 else ''}", g, s))
        print(f"{'path':40} {'GB/s':>7} {'samples/s':>12} {'x loopback':>11}")
        for name, g, s in rows:
            print(f"{name:40} {g:7.2f} {'' if s is None else f'{s:,.0f}':>12} {g / tcp:10.2f}x")
        cpu = os.getloadavg()[0]
        print(f"(load average during the run: {cpu:.1f} on {os.cpu_count()} cores)")
    finally:
        if srv is not None:
            srv.stop()


if __name__ == "__main__":
    main()
