"""Consumer groups, measured: exactness with a group killed mid-run, scale in groups, the skip policy.

    .venv/bin/python scripts/bench_groups.py [--quick]

Each group is one reader process (a keep-alive TensorReader reading as its group) against a synthetic
server (self-checking rows: each row is a function of its unique id).
  exactness  4 groups, `wait`, serving held until all 4 registered; every group reads until it has every
             row id below N (1M; --quick 100k), checking each row bit for bit: torn rows, ids seen twice and ids
             missing per group. One more group is killed (SIGKILL) a third of the way in; the longest pause
             of the surviving groups after the kill is printed beside buffer.group_idle_s + 1 s.
  scale      the writer throttled to R rows/s (generator.rows_per_second); 1, 2, 4, 8 groups (--quick 1, 2, 4)
             read for a few seconds: each group's rows/s / R (min over groups), and the total bytes/s out
             beside loopback TCP measured in the same run.
  skip       `skip`, R rows/s, two groups reading flat out and one at R/4: the fast groups' rows/s / R, and
             the slow group's rows_skipped beside what it missed (rows written - rows read - lag).
The machine's loopback limit is measured before the scale rows (method of shared/tools/limits.py).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import statistics
import sys
import time

import numpy as np
import requests
import torch
from bench_serve import loopback_gbps  # the limit, measured the same way as in every bench script

from actdata.generation.synthetic import verify_rows
from actdata.reading.tensor_reader import TensorReader
from actdata.serving.process import ServerProcess

BASE = ["+preset=test", "generator.source=synthetic", "generator.state_dir=null", "server.accelerator=cpu",
        "server.devices=1", "server.generators_per_device=1", "buffer.min_fill=0"]


def _read(url, group, q, n_ids=0, seconds=0.0, rate=None, die_at=None, batch=4096):
    """One group's reader: until it has every id < n_ids (exactness) or for `seconds` (throughput)."""
    reader = TensorReader(url, group=group, timeout=120)
    counts = np.zeros(n_ids, np.int32) if n_ids else None
    torn = extra = rows = 0
    times, t0 = [], time.time()
    while True:
        x, _ = reader.fetch(batch)
        times.append(time.time())
        rows += len(x)
        if counts is not None:
            ids, ok = verify_rows(x)
            torn += int((~ok).sum())
            ids = ids[ok].numpy()
            low = ids[ids < n_ids]
            extra += len(ids) - len(low)
            np.add.at(counts, low, 1)
            if die_at is not None and rows >= die_at:
                q.put((group, "killed", time.time()))
                q.close()
                q.join_thread()  # the message leaves before the kill
                os.kill(os.getpid(), signal.SIGKILL)
            if (counts > 0).all():
                break
        elif time.time() - t0 >= seconds:
            break
        if rate:  # a slow group: R/4 rows/s
            time.sleep(max(0.0, rows / rate - (time.time() - t0)))
    out = {"rows": rows, "seconds": time.time() - t0, "times": times}
    if counts is not None:
        out.update(torn=torn, dup=int((counts > 1).sum()), missing=int((counts == 0).sum()))
    q.put((group, "done", out))


def _procs(specs):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    ps = [ctx.Process(target=_read, args=(*args, q), kwargs=kw) for args, kw in specs]
    for p in ps:
        p.start()
    return ps, q


def _collect(ps, q, expect):
    got = []
    while len(got) < expect:
        got.append(q.get(timeout=1800))
    for p in ps:
        p.join(timeout=30)
    return got


def exactness(n_ids: int, idle_s: float) -> dict:
    groups = [f"g{i}" for i in range(4)]
    with ServerProcess([*BASE, "buffer.activation_dim=16", "buffer.size=20000", "buffer.max_groups=5",
                        "buffer.groups_expected=5", f"buffer.group_idle_s={idle_s}",
                        "buffer.prefix=benchgroups"]) as srv:
        specs = [((srv.url, g), {"n_ids": n_ids}) for g in groups]
        specs.append(((srv.url, "victim"), {"n_ids": n_ids, "die_at": n_ids // 3}))
        t0 = time.time()
        ps, q = _procs(specs)
        got = _collect(ps, q, len(specs))
        wall = time.time() - t0
        killed = next(t for g, kind, t in got if kind == "killed")
        res = {g: r for g, kind, r in got if kind == "done"}
        pause = 0.0
        for r in res.values():
            after = [t for t in r["times"] if t >= killed]
            gaps = np.diff([killed] + after)
            pause = max(pause, float(gaps.max()) if len(gaps) else 0.0)
        log = srv.log_tail(200_000)
    return {"res": res, "pause": pause, "dropped": "consumer group victim dropped" in log, "wall": wall}


def throughput(n_groups: int, rate: float, seconds: float, width: int, slow: bool = False) -> dict:
    policy = "skip" if slow else "wait"
    groups = [f"g{i}" for i in range(n_groups)]
    with ServerProcess([*BASE, f"buffer.activation_dim={width}", "buffer.size=40000",
                        f"generator.rows_per_second={rate}", f"buffer.max_groups={n_groups}",
                        f"buffer.groups_expected={n_groups}", f"buffer.group_lag={policy}",
                        "buffer.prefix=benchgroups"]) as srv:
        specs = [((srv.url, g), {"seconds": seconds, "batch": 1024,
                                 "rate": rate / 4 if slow and i == n_groups - 1 else None})
                 for i, g in enumerate(groups)]
        ps, q = _procs(specs)
        res = {g: r for g, _, r in _collect(ps, q, len(specs))}
        st = requests.get(srv.url + "/stats").json()
    out = {}
    for g, r in res.items():  # steady state: the rows read after the first second
        ts = np.array(r["times"])
        keep = ts >= ts[0] + 1.0
        span = ts[keep][-1] - ts[0] - 1.0 if keep.sum() > 1 else r["seconds"]
        out[g] = (1024 * max(0, int(keep.sum()) - 1)) / span if span > 0 else 0.0
    return {"per_group": out, "stats": st, "row_bytes": st["row_bytes"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="100k rows, 1/2/4 groups, 4 s per scale row")
    a = p.parse_args()
    n_ids = 100_000 if a.quick else 1_000_000
    idle_s = 3.0
    print(f"exactness: 4 groups + 1 killed, wait, {n_ids:,} row ids each, group_idle_s={idle_s:g}", flush=True)
    ex = exactness(n_ids, idle_s)
    print(f"{'group':<8} {'rows read':>10} {'torn':>5} {'dup':>5} {'missing':>8}")
    for g, r in sorted(ex["res"].items()):
        print(f"{g:<8} {r['rows']:>10,} {r['torn']:>5} {r['dup']:>5} {r['missing']:>8}")
    print(f"killed group dropped: {ex['dropped']}; longest pause of the others after the kill: {ex['pause']:.2f} s "
          f"(bound: group_idle_s + 1 = {idle_s + 1:g} s); wall {ex['wall']:.0f} s\n", flush=True)

    rate, width, seconds = 20_000, 768, (4.0 if a.quick else 8.0)
    loops = []
    print(f"scale: writer throttled to R = {rate:,} rows/s of {width} float32 ({rate * width * 4 / 1e6:.0f} MB/s), "
          f"{seconds:g} s per row")
    print(f"{'groups':>6} {'min rows/s / R':>15} {'median':>8} {'out GB/s':>9} {'loopback GB/s':>14} "
          f"{'out / loopback':>15}")
    for n in (1, 2, 4) if a.quick else (1, 2, 4, 8):
        loops.append(loopback_gbps(size=128 << 20, reps=5))
        r = throughput(n, rate, seconds, width)
        per = list(r["per_group"].values())
        out = sum(per) * r["row_bytes"] / 1e9
        print(f"{n:>6} {min(per) / rate:>15.2f} {statistics.median(per) / rate:>8.2f} {out:>9.3f} "
              f"{loops[-1]:>14.2f} {out / loops[-1]:>15.3f}", flush=True)
    print(f"loopback over the scale rows: median {statistics.median(loops):.2f} GB/s, "
          f"spread {min(loops):.2f}-{max(loops):.2f}\n")

    print(f"skip: R = {rate:,} rows/s, 2 groups flat out, 1 at R/4, {seconds:g} s")
    r = throughput(3, rate, seconds, width, slow=True)
    groups = {g["name"]: g for g in r["stats"]["groups"]}
    for name, rps in sorted(r["per_group"].items()):
        g = groups[name]
        missed = r["stats"]["rows_written"] - g["rows_read"] - g["lag"]
        print(f"{name}: rows/s / R = {rps / rate:.2f}; rows_skipped {g['rows_skipped']:,}, missed "
              f"(written - read - lag) {missed:,}")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
