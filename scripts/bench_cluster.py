"""actdata on a Ray cluster: does the aggregate rate grow with the nodes, and how fast does a reader
recover from a node's server dying?

    .venv/bin/python scripts/bench_cluster.py [--rate 3000] [--window 4] [--windows 3] [--nodes 1 2 3]

For each N, a fresh simulated Ray cluster (scripts/sim_cluster.py: a head without CPUs and N nodes of
one CPU), `python -m actdata.cluster` on it with the synthetic source throttled to `--rate` rows/s per
node (generator.rows_per_second), serve-once (buffer.max_reads=1), and one DataLoader with N workers
reading through the directory. After a warm-up that drains the initial fill, the delivered rows/s are
measured over `--windows` windows: median and spread. Scaling = rate(N) / (N x rate(1)), both from this
run (goal >= 0.9 for N = 2, 3); also rate / (N x the configured throttle).

On the largest N, `--kills` times: SIGKILL the actor of node 0 (its server goes with it) while the
DataLoader reads, and wait until its restarted server is read again.
  failover   kill -> the first batch, from another node, of the worker that was reading node 0 (goal <= 5 s)
  relisted   kill -> the directory lists node 0's restarted server as serving (Ray restart + server start)
  read again relisted -> the first batch from node 0's restarted server (goal <= 15 s)
Batches of a DataLoader arrive worker by worker in turn, so batch i came from worker i % workers; a
synthetic row's id says its generator (id >> 40 = g = node rank here, one generator per node).
The machine's limits (memcpy, loopback TCP) and `uptime`'s load average are printed with the table.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from actdata.generation.synthetic import row_ids  # noqa: E402
from actdata.reading.dataset import RemoteActivationDataset, make_loader  # noqa: E402

OBJECT_STORE = 75 * 1024 * 1024
ROW_BYTES = 768 * 4


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _wait(what, fn, timeout=180.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class SimulatedCluster:
    """N one-CPU nodes (scripts/sim_cluster.py, its own process: no Ray in this one, which forks the
    DataLoader workers) and actdata.cluster on them; stop() ends both (only these)."""

    def __init__(self, n: int, rate: float, buffer_rows: int):
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.dir = tempfile.mkdtemp(prefix="actdata-bench-cluster-")
        self.log = open(os.path.join(self.dir, "driver.log"), "wb")
        self.sim = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "sim_cluster.py"), "--cpus",
                                     *["1"] * n], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=self.log, env=env, text=True)
        self.driver = None
        try:
            line = self.sim.stdout.readline()
            if not line.startswith("ADDRESS "):
                raise RuntimeError(f"the simulated cluster did not start; see {self.log.name}")
            ready = os.path.join(self.dir, "directory.json")
            self.driver = subprocess.Popen(
                [sys.executable, "-m", "actdata.cluster", "+preset=test", "generator.source=synthetic",
                 f"generator.rows_per_second={rate}", f"buffer.size={buffer_rows}", "buffer.min_fill=0.05",
                 "buffer.max_reads=1", "server.workers=1", "server.log_file=null",
                 f"cluster.address={line.split()[1]}", "cluster.nodes=actdata", "cluster.directory_port=0",
                 f"cluster.ready_file={ready}"],
                cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
            self.url = _wait("the directory", lambda: os.path.exists(ready) and json.load(open(ready))["url"])
            _wait(f"{n} serving servers", lambda: _get(self.url + "/")["serving_servers"] == n)
        except BaseException:
            self.stop()
            raise

    def servers(self) -> dict[int, dict]:
        return {s["node_rank"]: s for s in _get(self.url + "/servers")["servers"]}

    def stop(self) -> None:
        if self.driver is not None and self.driver.poll() is None:
            self.driver.send_signal(signal.SIGTERM)
            try:
                self.driver.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.driver.pid, signal.SIGKILL)
        self.sim.stdin.close()  # the simulated cluster shuts itself down
        self.sim.wait(120)
        self.log.close()


def measure(c: SimulatedCluster, n: int, batch: int, warmup: float, window: float, windows: int,
            kills: int) -> dict:
    ds = RemoteActivationDataset(c.url, batch_size=batch, retry_for_s=120)
    it = iter(make_loader(ds, num_workers=n, persistent_workers=False))
    t_end = time.perf_counter() + warmup
    while time.perf_counter() < t_end:  # drain the initial fill: from here on generation is the limit
        next(it)
    rates = []
    for _ in range(windows):
        rows, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < window:
            rows += len(next(it))
        rates.append(rows / (time.perf_counter() - t0))
    out = {"rates": rates}
    if not kills:
        return out

    # which worker reads node 0: batch i comes from worker i % n
    i, worker = 0, None
    while worker is None:
        x = next(it)
        if (row_ids(x) >> 40).eq(0).all():
            worker = i % n
        i += 1
    out.update(failover=[], relisted=[], read_again=[])
    for _ in range(kills):
        victim = c.servers()[0]
        os.kill(victim["actor_pid"], signal.SIGKILL)
        t_kill = time.perf_counter()
        t_failover = t_listed = t_read = None
        last_poll = 0.0
        while t_read is None and time.perf_counter() - t_kill < 180:
            x = next(it)
            now = time.perf_counter()
            g = set((row_ids(x) >> 40).tolist())
            if i % n == worker and t_failover is None and 0 not in g:
                t_failover = now
            if t_listed is not None and 0 in g:
                t_read = now
            if t_listed is None and now - last_poll > 0.1:
                last_poll = now
                s = c.servers().get(0)
                if s and s["url"] != victim["url"] and s["serving"]:
                    t_listed = time.perf_counter()
            i += 1
        out["failover"].append(t_failover and t_failover - t_kill)
        out["relisted"].append(t_listed and t_listed - t_kill)
        out["read_again"].append(t_read and t_listed and t_read - t_listed)
        # the worker that reads node 0 now (shares are recomputed when the list changes)
        for _ in range(3 * n):
            x = next(it)
            if (row_ids(x) >> 40).eq(0).all():
                worker = i % n
            i += 1
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--rate", type=float, default=3000.0, help="rows/s of each node's generator (throttle)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--buffer", type=int, default=8000, help="rows per node's buffer")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--window", type=float, default=4.0)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--kills", type=int, default=3, help="kill/restart rounds on the largest N (0 = none)")
    a = p.parse_args()

    from bench_serve import loopback_gbps, memcpy_gbps

    print(f"limits: memcpy {memcpy_gbps():.2f} GB/s, loopback TCP {loopback_gbps():.2f} GB/s; "
          f"load average before: {load()}; {os.cpu_count()} CPUs", flush=True)
    results = {}
    for n in a.nodes:
        t0 = time.time()
        c = SimulatedCluster(n, a.rate, a.buffer)
        started = time.time() - t0
        try:
            r = measure(c, n, a.batch, a.warmup, a.window, a.windows, kills=a.kills if n == max(a.nodes) else 0)
        finally:
            c.stop()
        r["start_s"], r["load"] = started, load()
        results[n] = r
        print(f"N={n}: started in {started:.1f} s; rows/s per window {[round(x) for x in r['rates']]}; "
              f"load {r['load']}", flush=True)

    one = statistics.median(results[min(results)]["rates"]) if 1 in results else None
    print(f"\nserve-once rows/s delivered to one DataLoader (N workers), {a.rate:g} rows/s per node's generator, "
          f"rows of {ROW_BYTES} B; median of {a.windows} windows of {a.window:g} s [min-max]")
    print(f"{'N':>3} {'rows/s':>10} {'[min-max]':>17} {'MB/s':>7} {'/ (N x N=1)':>12} {'/ (N x rate)':>13}  load avg")
    for n, r in results.items():
        med = statistics.median(r["rates"])
        scal = f"{med / (n * one):.3f}" if one else "-"
        spread = f"[{min(r['rates']):,.0f}-{max(r['rates']):,.0f}]"
        print(f"{n:>3} {med:>10,.0f} {spread:>17} "
              f"{med * ROW_BYTES / 1e6:>7.1f} {scal:>12} {med / (n * a.rate):>13.3f}  {r['load']}")
    for n, r in results.items():
        if "failover" in r:
            def fmt(vals):
                seen = [v for v in vals if v is not None]
                med = f"median {statistics.median(seen):.2f} s" if seen else "not seen"
                return f"{med} {[round(v, 2) if v is not None else None for v in vals]}"
            print(f"\nN={n}, node 0's server actor SIGKILLed while reading, {len(r['failover'])} times:\n"
                  f"  failover (kill -> that worker reads another node)  {fmt(r['failover'])}  goal <= 5 s\n"
                  f"  kill -> restarted server listed again             {fmt(r['relisted'])}\n"
                  f"  listed -> read again                               {fmt(r['read_again'])}  goal <= 15 s")
    print(f"load average after: {load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
