"""The tensor route with and without provenance, same server, same run: rows/s and their ratio.

    python scripts/bench_provenance.py [--rows 4096] [--dim 576] [--reps 15]

One synthetic server with generator.provenance=true (buffer.max_reads large, so the data plane and not
the writer is measured). Interleaved rep by rep, one client (ActivationClient, keep-alive):
  plain       GET /activations/tensor?num_samples=N             raw bytes read straight into a tensor
  provenance  GET /activations/tensor?num_samples=N&provenance=1  one safetensors body: rows + token ids,
                                                                  positions, doc ids (+16 bytes per row)
The machine's limits (memcpy and loopback TCP, method of scripts/bench_serve.py) are measured in the
same run; the 1-min load average is printed before and after (the machine may be shared).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_serve import loopback_gbps, memcpy_gbps  # noqa: E402

from actdata.reading.client import ActivationClient  # noqa: E402
from actdata.serving.process import ServerProcess  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--per-rep", type=int, default=5, help="requests per timed rep")
    a = ap.parse_args()
    mem, lo = memcpy_gbps(), loopback_gbps()
    print(f"limits: memcpy {mem:.2f} GB/s, loopback TCP {lo:.2f} GB/s", flush=True)
    overrides = ["+preset=test", "generator.source=synthetic", "generator.provenance=true",
                 "generator.state_dir=null", f"buffer.activation_dim={a.dim}", "buffer.size=60000",
                 "buffer.min_fill=0.5", "buffer.max_reads=100000000", "server.workers=1"]
    with ServerProcess(overrides) as srv:
        c = ActivationClient(srv.url, retry_for_s=120)
        assert c.wait_for_data(30000, timeout=120)
        fetch = {"plain": lambda: c.get_activations_tensor(a.rows)[0],
                 "provenance": lambda: c.get_activations_tensor(a.rows, provenance=True).activations}
        for f in fetch.values():  # warm-up: pools, connections, page faults
            for _ in range(3):
                f()
        rates = {k: [] for k in fetch}
        load0 = os.getloadavg()[0]
        for _ in range(a.reps):
            for k, f in fetch.items():
                t0 = time.perf_counter()
                for _ in range(a.per_rep):
                    x = f()
                rates[k].append(a.per_rep * len(x) / (time.perf_counter() - t0))
        load1 = os.getloadavg()[0]
    m = {k: statistics.median(v) for k, v in rates.items()}
    row_bytes = a.dim * 4
    print(f"\n{a.rows} x {a.dim} float32 per request, one client, medians of {a.reps} reps x {a.per_rep} requests")
    print(f"1-min load average at the start / end of the timed reps: {load0:.2f} / {load1:.2f}")
    print(f"{'route':12s} {'rows/s':>10s} {'min..max':>19s} {'GB/s':>6s} {'x loopback':>10s}  ratio")
    for k in fetch:
        gbps = m[k] * (row_bytes + (16 if k == "provenance" else 0)) / 1e9
        note = f"provenance/plain = {m['provenance'] / m['plain']:.2f} (goal >= 0.9)" if k == "provenance" else ""
        print(f"{k:12s} {m[k]:10,.0f} {min(rates[k]):9,.0f}..{max(rates[k]):<9,.0f} {gbps:6.2f} "
              f"{gbps / lo:10.2f}  {note}")


if __name__ == "__main__":
    main()
