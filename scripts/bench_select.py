"""Point selection: rows of 8 points, whole rows vs 1 point, bytes/s and rows/s, beside the limits, one run.

    python scripts/bench_select.py [--quick] [--points 8] [--width 768] [--rows 1024] [--reps 9]

Rows of `--points` points x `--width` float32 (the synthetic source, buffer.max_reads large, so the data
plane and not the writer is measured). Each mode runs rep by rep, interleaved with the others:
  copy      actdata.shm.gather alone: random slots (sorted, as a read sorts them) copied into a reused
            tensor; a ratio to memcpy
  buffer    SharedActivationBuffer.read in this process: claim, gather, release (no HTTP): the claim's
            bookkeeping is per row, so it shows in the rows of one point; a ratio to memcpy
  http      GET /activations/tensor through ActivationClient (one client, keep-alive); a ratio to
            loopback TCP
and in each, three requests:
  whole     N whole rows
  1pt-eqB   8N rows of one point (`points=3`): the same bytes per request as `whole`
  1pt-eqN   N rows of one point: the same rows per request as `whole`
The goal of the issue: 1pt-eqB bytes/s >= 0.7 x whole bytes/s (the gather is not slower per byte), and
rows/s >= 5 x whole rows/s. memcpy and loopback TCP (method of scripts/bench_serve.py) are measured before
every rep; the table gives their median and spread. The 1-min load average is printed: the machine may be
shared, so read the ratios, not the absolute figures.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_serve import loopback_gbps, memcpy_gbps  # noqa: E402

from actdata.generation.synthetic import make_rows  # noqa: E402
from actdata.reading.client import ActivationClient  # noqa: E402
from actdata.serving.process import ServerProcess  # noqa: E402
from actdata.shm import SharedActivationBuffer  # noqa: E402
from actdata.shm.gather import gather  # noqa: E402

MB = 1 << 20


def timed(fn, per_rep: int) -> float:
    t0 = time.perf_counter()
    for _ in range(per_rep):
        fn()
    return (time.perf_counter() - t0) / per_rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small buffer, few reps (a check, not a figure)")
    ap.add_argument("--points", type=int, default=8)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--rows", type=int, default=1024, help="N: whole rows per request")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--per-rep", type=int, default=4, help="requests per timed rep")
    a = ap.parse_args()
    torch.set_num_threads(1)  # as in the server's processes: a 2-thread gather on a busy core waits for its pool
    if a.quick:
        a.reps, a.per_rep, a.rows = 3, 2, min(a.rows, 512)
    P, W, N = a.points, a.width, a.rows
    point_bytes = W * 4
    capacity = 2 * P * N  # holds a request of 8N single-point rows twice over
    limit_mb = 64 if a.quick else 256
    mems, los = [], []

    def limits():
        mems.append(memcpy_gbps(limit_mb * MB, 5))
        los.append(loopback_gbps(limit_mb * MB, 5))

    shape = (P, W)
    modes = {"whole": (N, None), "1pt-eqB": (P * N, [3]), "1pt-eqN": (N, [3])}
    rates = {(where, m): [] for where in ("copy", "buffer", "http") for m in modes}

    # in-process gather
    buf = SharedActivationBuffer.create(capacity, shape, "float32", max_reads=10**9, prefix="actdata-bench-select")
    try:
        for a0 in range(0, capacity, 4096):
            buf.write(make_rows(torch.arange(a0, min(capacity, a0 + 4096)), shape, torch.float32))
        outs = {m: torch.empty((k, *shape) if sel is None else (k, len(sel), W)) for m, (k, sel) in modes.items()}
        for m, (k, sel) in modes.items():  # warm-up: page faults of the outputs
            buf.read(k, out=outs[m], points=sel)
        load0 = os.getloadavg()[0]
        for _ in range(a.reps):
            limits()
            for m, (k, sel) in modes.items():
                ids = np.sort(np.random.default_rng().choice(capacity, k, replace=False))
                s = timed(lambda: gather(buf.data, ids, sel, outs[m]), a.per_rep)
                rates[("copy", m)].append(k / s)
                s = timed(lambda: buf.read(k, out=outs[m], points=sel), a.per_rep)
                rates[("buffer", m)].append(k / s)
    finally:
        buf.close()
        buf.unlink()

    # over HTTP: one server, one client per selection
    overrides = ["+preset=test", "generator.source=synthetic", "generator.state_dir=null",
                 f"buffer.sample_shape=[{P},{W}]", f"buffer.size={capacity}", "buffer.min_fill=1.0",
                 "buffer.max_reads=1000000000", "server.workers=1", "buffer.prefix=actdata-bench-select",
                 f"server.response_memory_bytes={max(256 * MB, 4 * N * P * point_bytes)}"]
    with ServerProcess(overrides) as srv:
        clients = {m: ActivationClient(srv.url, retry_for_s=120, points=sel) for m, (_, sel) in modes.items()}
        assert clients["whole"].wait_for_data(capacity, timeout=180), "the buffer did not fill"
        for m, (k, _) in modes.items():
            for _ in range(2):
                clients[m].get_activations_tensor(k)
        for _ in range(a.reps):
            limits()
            for m, (k, _) in modes.items():
                s = timed(lambda: clients[m].get_activations_tensor(k), a.per_rep)
                rates[("http", m)].append(k / s)
        for c in clients.values():
            c.close()
    load1 = os.getloadavg()[0]

    mem, lo = statistics.median(mems), statistics.median(los)
    print(f"\nrows of {P} points x {W} float32 ({P * point_bytes:,} bytes; one point {point_bytes:,} bytes); "
          f"N = {N}; medians of {a.reps} reps x {a.per_rep} requests")
    print(f"limits: memcpy {mem:.2f} GB/s ({min(mems):.2f}..{max(mems):.2f}), loopback TCP {lo:.2f} GB/s "
          f"({min(los):.2f}..{max(los):.2f}); 1-min load average {load0:.2f} at the start, {load1:.2f} at the end")
    print(f"{'path':7s} {'request':9s} {'rows':>6s} {'rows/s':>11s} {'min..max':>21s} {'GB/s':>6s} {'x limit':>7s}"
          f"  {'bytes/s ÷ whole':>15s} {'rows/s ÷ whole':>14s}")
    for where, limit in (("copy", mem), ("buffer", mem), ("http", lo)):
        whole = statistics.median(rates[(where, "whole")])
        for m, (k, sel) in modes.items():
            r = rates[(where, m)]
            med = statistics.median(r)
            row_b = P * point_bytes if sel is None else len(sel) * point_bytes
            whole_b = whole * P * point_bytes
            gbps = med * row_b / 1e9
            ratio_b, ratio_r = med * row_b / whole_b, med / whole
            goal = "  (goal >= 0.7 and >= 5)" if m == "1pt-eqB" else ""
            print(f"{where:7s} {m:9s} {k:6d} {med:11,.0f} {min(r):10,.0f}..{max(r):<10,.0f} {gbps:6.2f} "
                  f"{gbps / limit:7.2f}  {ratio_b:15.2f} {ratio_r:14.2f}{goal}")


if __name__ == "__main__":
    main()
