"""First fill vs refill of the shared buffer: what page faults cost the writer, and what populating
the pages ahead of it (SharedActivationBuffer.populate_in_background) gives back. One run:

  limit      memcpy GB/s of this machine, measured now (method of shared/tools/limits.py)
  create     SharedActivationBuffer.create of a small and of the benchmarked buffer (start-up vs size)
  touched    refill: write every row again into pages already written (refresh() frees them), the scatter
             on actdata.shm.scatter's threads; "one thread" is the same with the caller's thread alone
  fresh      first fill of a new buffer, pages faulted in by the writer itself (before issue 10)
  populated  first fill of a new buffer while populate_in_background runs from its creation on
             (the writer starts at once: no head start, the worst case for the populating thread)
  head start first fill after a head start of --head-start s (the model loading in a real generator)
  after      first fill once populating has finished (a head start long enough for the whole buffer)
  populate   populate() alone: GB/s at which the thread maps pages ahead of the writer

Writes go through SharedActivationBuffer.write in batches of --batch rows, to random free slots, as
the generator writes them. GB/s = row bytes written / wall time; medians of --reps fresh buffers each.

    python scripts/bench_buffer.py [--rows 300000] [--dim 768] [--batch 4096] [--reps 3] [--head-start 2.0] [--quick]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from bench_serve import memcpy_gbps  # the limit, measured the same way as in every bench script

from actdata.shm import SharedActivationBuffer, scatter
from actdata.shm.pages import populate


def fill(buf: SharedActivationBuffer, rows: torch.Tensor) -> float:
    """Write until every slot is READY; returns GB/s of row bytes."""
    n, t0 = buf.spec.capacity, time.perf_counter()
    done = 0
    while done < n:
        k = min(len(rows), n - done)
        done += buf.write(rows[:k])
    return n * buf.spec.row_bytes / (time.perf_counter() - t0) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--head-start", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true", help="150,000 rows, 2 reps")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.reps = 150_000, 2
    torch.set_num_threads(1)
    rows = torch.randn(args.batch, args.dim)
    gb = args.rows * args.dim * 4 / 1e9
    load0 = os.getloadavg()[0]
    limit = memcpy_gbps()
    r = {k: [] for k in ("create_small", "create", "touched", "one", "fresh", "populated", "head", "after", "populate")}
    for _ in range(args.reps):
        t0 = time.perf_counter()
        SharedActivationBuffer.create(1000, (args.dim,)).close()
        r["create_small"].append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        buf = SharedActivationBuffer.create(args.rows, (args.dim,))
        r["create"].append(time.perf_counter() - t0)
        r["fresh"].append(fill(buf, rows))
        buf.refresh()
        r["touched"].append(fill(buf, rows))
        n, scatter.threads = scatter.threads, 1
        buf.refresh()
        r["one"].append(fill(buf, rows))
        scatter.threads = n
        buf.close()

        buf = SharedActivationBuffer.create(args.rows, (args.dim,))
        buf.populate_in_background()
        r["populated"].append(fill(buf, rows))
        buf.close()

        buf = SharedActivationBuffer.create(args.rows, (args.dim,))
        buf.populate_in_background()
        time.sleep(args.head_start)
        r["head"].append(fill(buf, rows))
        buf.close()

        buf = SharedActivationBuffer.create(args.rows, (args.dim,))
        t0 = time.perf_counter()
        done = populate(buf)
        r["populate"].append(done / (time.perf_counter() - t0) / 1e9)
        r["after"].append(fill(buf, rows))
        buf.close()
    load1 = os.getloadavg()[0]
    m = {k: statistics.median(v) for k, v in r.items()}
    spread = {k: f"{min(v):.2f}..{max(v):.2f}" for k, v in r.items()}
    print(f"\nbuffer {args.rows:,} x {args.dim} float32 = {gb:.2f} GB in /dev/shm; writes of {args.batch} rows to "
          f"random slots; medians of {args.reps} fresh buffers; memcpy limit {limit:.2f} GB/s (measured now)")
    print(f"1-min load average at start / end: {load0:.2f} / {load1:.2f}")
    print(f"{'run':58s} {'value':>10s}  {'min..max':>13s}   ratio")
    print(f"{'create, 1,000 rows':58s} {1e3 * m['create_small']:8.2f}ms")
    print(f"{'create, benchmarked size':58s} {1e3 * m['create']:8.2f}ms   "
          f"{'':13s}   {m['create'] / m['create_small']:.2f} x the small one")
    print(f"copy threads for a large batch: {scatter.shares(args.batch, args.dim * 4)} "
          f"(actdata.shm.scatter, {os.cpu_count()} cores)")
    for k, name in (("touched", "refill (pages touched), goal >= 0.7 of memcpy"),
                    ("one", "refill (pages touched), one copy thread (before)"),
                    ("fresh", "first fill, no populating (before)"),
                    ("populated", "first fill, populating from creation, no head start"),
                    ("head", f"first fill, populating, {args.head_start:g} s head start"),
                    ("after", "first fill once populating has finished"),
                    ("populate", "populate() alone")):
        note = f"{m[k] / limit:.2f} of memcpy"
        if k in ("fresh", "populated", "head", "after"):
            note += f"; {m[k] / m['touched']:.2f} of refill" + (" (goal >= 0.7)" if k != "fresh" else "")
        print(f"{name:58s} {m[k]:7.2f}GB/s  {spread[k]:>13s}   {note}")


if __name__ == "__main__":
    main()
