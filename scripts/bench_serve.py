"""P1: how close the HTTP data plane comes to the machine's limits, beside the baselines, in one run.

    .venv/bin/python scripts/bench_serve.py [--quick] [--png bench-serve.png]

Rows of the table (GB/s of tensor bytes delivered, samples/s, ratio to the loopback-TCP limit):
  limits      memcpy and loopback TCP of this machine, measured now (method of shared/tools/limits.py)
  baselines   the seed's JSON route; LitServe's LitAPI round trip of the same bytes; a plain route
              serialising with torch.save read by requests
  actdata     /activations/tensor one request at a time (TensorReader), and RemoteActivationDataset through a
              DataLoader with 1, 2 and 4 workers in each of its forms: `batch_size=None` (the dataset
              batches), `DataLoader(ds)` (the DataLoader's default batch_size=1) and `batch_size=4096`, each
              also as a ratio to the `batch_size=None` form; the same-host path (no HTTP) as a ratio to
              memcpy; for 4096 x 768 float32 and the CLT shape 4096 x [2,12,768] float16.
  overlap     `DataLoader(ds)` with no workers in a loop whose step waits 8 ms (a GPU step): the loop's
              time per batch / max(fetch alone, step) (1.00: the read-ahead hides the shorter one).
The limits are noisy on a shared machine: loopback TCP and memcpy are measured again before each actdata
row (interleaved), and the table gives their median and spread (min-max) over all those runs.
The synthetic source fills the buffer; rows are reused (buffer.max_reads large) so that the data plane,
not the synthetic writer, is what is measured. One row measures serve-once with the writer running.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import requests
import torch

from actdata.reading.client import ActivationClient, TensorReader
from actdata.reading.dataset import RemoteActivationDataset
from actdata.serving.process import ServerProcess

MB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- limits (same method as shared/tools/limits.py) -------------------------------------------------
def memcpy_gbps(size=256 * MB, reps=7) -> float:
    src = torch.empty(size, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        ts.append(time.perf_counter() - t)
    return size / statistics.median(ts) / 1e9


def loopback_gbps(size=256 * MB, reps=7) -> float:
    payload = memoryview(bytearray(size))
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve():
        c, _ = srv.accept()
        for _ in range(reps):
            c.recv(1)
            c.sendall(payload)
        c.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    cli = socket.create_connection(("127.0.0.1", srv.getsockname()[1]))
    buf, ts = memoryview(bytearray(size)), []
    for _ in range(reps):
        t = time.perf_counter()
        cli.sendall(b"x")
        got = 0
        while got < size:
            got += cli.recv_into(buf[got:], size - got)
        ts.append(time.perf_counter() - t)
    cli.close()
    th.join()
    srv.close()
    return size / statistics.median(ts) / 1e9


# -- measuring ----------------------------------------------------------------------------------------
def rate(fn, nbytes_per_call: int, calls: int, reps: int, warmup: int = 1) -> float:
    """Median over reps of GB/s for `calls` calls of fn (each delivering nbytes_per_call)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append(nbytes_per_call * calls / (time.perf_counter() - t) / 1e9)
    return statistics.median(out)


FORMS = {  # DataLoader keyword arguments of each form; the dataset is RemoteActivationDataset(url, ...)
    "batch_size=None": dict(batch_size=None),
    "DataLoader(ds)": dict(),
    "batch_size=4096": dict(batch_size=4096),
}


def dataloader_rate(url: str, batch: int, workers: int, batches: int, reps: int, form: str = "batch_size=None",
                    local: bool = False) -> float:
    ds = RemoteActivationDataset(url, batch_size=None if form == "batch_size=4096" else batch, local=local)
    dl = torch.utils.data.DataLoader(ds, num_workers=workers, persistent_workers=workers > 0,
                                     prefetch_factor=2 if workers else None, **FORMS[form])
    it = iter(dl)
    first = next(it)
    nbytes = first.numel() * first.element_size()
    for _ in range(2 * max(workers, 1)):
        next(it)
    assert first.shape[0] == batch, (form, tuple(first.shape))
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        out.append(nbytes * batches / (time.perf_counter() - t) / 1e9)
    del it, dl
    return statistics.median(out)


def paired_rates(url: str, batch: int, workers: int, batches: int, reps: int, configs: list[tuple[str, bool]],
                 limits: "Limits") -> tuple[list[float], list[float]]:
    """GB/s of several loaders measured in turns: every rep times each loader once (and samples the limits
    once), so that slow phases of a shared machine hit all of them alike. The order rotates from rep to
    rep, and each loader's workers are given `settle_s` to refill their prefetch queues before the next
    loader is timed (otherwise a loader timed right after another competes with its refill); the prefetched
    batches are taken before the clock starts, so a window times what the workers fetch while it runs. Returns
    (median GB/s per config, median over reps of each config's ratio to the first config)."""
    its, nbytes = [], []
    for form, local in configs:
        ds = RemoteActivationDataset(url, batch_size=None if form == "batch_size=4096" else batch, local=local)
        it = iter(torch.utils.data.DataLoader(ds, num_workers=workers, persistent_workers=workers > 0,
                                              prefetch_factor=2 if workers else None, **FORMS[form]))
        first = next(it)
        assert first.shape[0] == batch, (form, tuple(first.shape))
        for _ in range(2 * max(workers, 1)):
            next(it)
        its.append(it)
        nbytes.append(first.numel() * first.element_size())
    per = [[] for _ in configs]
    settle_s = 0.5 + 0.25 * workers
    for rep in range(reps):
        limits.sample()
        for j in range(len(its)):
            i = (rep + j) % len(its)
            time.sleep(settle_s)
            for _ in range(2 * workers):  # what the workers prefetched while the others ran: not this window's
                next(its[i])
            t = time.perf_counter()
            for _ in range(batches):
                next(its[i])
            per[i].append(nbytes[i] * batches / (time.perf_counter() - t) / 1e9)
    del its
    ratios = [statistics.median(a / b for a, b in zip(p, per[0])) for p in per]
    return [statistics.median(p) for p in per], ratios


def overlap_rates(url: str, batch: int, batches: int, step_s: float) -> tuple[float, float]:
    """`DataLoader(ds)` with num_workers=0 in a training loop whose step takes `step_s` seconds without the
    CPU (a GPU step: the loop waits, as on a CUDA sync). Returns (seconds per batch fetching alone, seconds
    per batch of the loop), each the median of windows taken in turns (fetch, loop, fetch, loop, ...).
    Without read-ahead the loop takes fetch + step; with a perfect one max(fetch, step)."""
    ds = RemoteActivationDataset(url, batch_size=batch, local=False)
    it = iter(torch.utils.data.DataLoader(ds))
    for _ in range(5):
        next(it)
    fetch, loop = [], []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        fetch.append((time.perf_counter() - t) / batches)
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
            time.sleep(step_s)
        loop.append((time.perf_counter() - t) / batches)
    del it
    return statistics.median(fetch), statistics.median(loop)


class Limits:
    """Loopback TCP and memcpy, measured again whenever `sample()` is called (between the rows compared)."""

    def __init__(self, size=128 * MB, reps=5):
        self.size, self.reps, self.lo, self.mem = size, reps, [], []

    def sample(self) -> None:
        self.lo.append(loopback_gbps(self.size, self.reps))
        self.mem.append(memcpy_gbps(self.size, self.reps))

    @staticmethod
    def fmt(xs) -> str:
        return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f}, n={len(xs)})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_baseline(kind: str, rows: int, dim: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "baseline_servers.py"), kind, str(port),
                          str(rows), str(dim)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            r = requests.get(f"http://127.0.0.1:{port}/health" if kind == "litapi" else f"http://127.0.0.1:{port}/docs",
                             timeout=1)
            if r.status_code == 200:
                return p, port
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"baseline {kind} did not start")


def stop(p: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(10)
    except Exception:
        os.killpg(p.pid, signal.SIGKILL)


def wait_full(url: str, fill: float = 0.99, timeout: float = 300) -> None:
    client = ActivationClient(url)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if client.get_stats()["fill"] >= fill:
            return
        time.sleep(0.2)
    raise RuntimeError("buffer did not fill")


# -- main -----------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer reps")
    ap.add_argument("--png", default="bench-results/bench-serve.png", help="bar chart output ('' = none)")
    ap.add_argument("--workers", default="0,1,2,4", help="DataLoader worker counts")
    ap.add_argument("--forms-only", action="store_true", help="only the DataLoader forms and same-host rows")
    a = ap.parse_args()
    reps, batches = (3, 12) if a.quick else (5, 24)
    torch.set_num_threads(1)
    rows_out: list[tuple[str, float, float]] = []  # (label, GB/s, samples/s)
    k, dim = 4096, 768
    nbytes = k * dim * 4

    limits = Limits()
    limits.sample()
    print(f"limits: memcpy {limits.mem[-1]:.2f} GB/s, loopback TCP {limits.lo[-1]:.2f} GB/s", flush=True)
    ratios: list[tuple[str, float]] = []  # (label, ratio) of each form to batch_size=None, same workers

    common = ["+preset=test", "generator.source=synthetic", "buffer.max_reads=1000000000", "buffer.min_fill=0.05",
              "generator.rows_per_second=2000000"]
    with ServerProcess([*common, "buffer.size=100000", f"buffer.activation_dim={dim}"]) as srv:
        wait_full(srv.url)
        url = srv.url
        # baseline 1: the seed's JSON route (at most server.max_samples_json rows per answer)
        kj = min(k, requests.get(f"{url}/stats").json()["server"]["max_samples_json"])

        def json_call():
            r = requests.get(f"{url}/activations", params={"num_samples": kj})
            r.raise_for_status()
            torch.tensor(r.json()["activations"], dtype=torch.float32)
        if not a.forms_only:
            g = rate(json_call, kj * dim * 4, 1, max(2, reps // 2))
            rows_out.append((f"baseline: JSON route (requests, {kj} rows)", g, g * 1e9 / (dim * 4)))
            print(rows_out[-1], flush=True)
        # actdata: one client, raw tensor route via the dataset's reader (no DataLoader)
        limits.sample()
        reader, out = TensorReader(url), torch.empty(k, dim)
        g = rate(lambda: reader.fetch(k, out=out), nbytes, batches, reps, warmup=2)
        rows_out.append(("actdata: /activations/tensor, one request at a time", g, g * 1e9 / (dim * 4)))
        print(rows_out[-1], flush=True)
        configs = [(form, False) for form in FORMS] + [("batch_size=None", True)]
        for w in [int(x) for x in a.workers.split(",")]:
            gs, rs = paired_rates(url, k, w, batches, reps, configs, limits)
            ws = f"{w} worker{'s' if w != 1 else ''}"
            for (form, local), g, r in zip(configs, gs, rs):
                label = (f"actdata: same host (no HTTP), DataLoader {ws}" if local
                         else f"actdata: DataLoader {form}, {ws}")
                rows_out.append((label, g, g * 1e9 / (dim * 4)))
                if local:
                    ratios.append((f"same host / memcpy (median of all limit runs), {ws}", ("memcpy", g)))
                elif form != "batch_size=None":
                    ratios.append((f"{form} / batch_size=None, {ws} (median of paired reps)", r))
                print(rows_out[-1], f"{r:.2f} x batch_size=None", flush=True)

        # num_workers=0 in a training loop: the next batch is read while the step runs (actdata.reading.dataset)
        step = 0.008
        fetch, loop = overlap_rates(url, k, batches, step)
        ratios.append((f"0 workers, 8 ms step: loop / max(fetch {fetch * 1e3:.1f} ms, step)", loop / max(fetch, step)))
        print(f"DataLoader(ds), 0 workers, 8 ms step: loop {loop * 1e3:.1f} ms/batch, "
              f"fetch alone {fetch * 1e3:.1f} ms; "
              f"loop / (fetch + step) = {loop / (fetch + step):.2f} (1.00 = no overlap), loop / max(fetch, step) = "
              f"{loop / max(fetch, step):.2f} (1.00 = full overlap)", flush=True)

    import io

    sess = requests.Session()
    baselines = {
        "litapi": [("baseline: LitAPI round trip (requests; LitServe's gzip)", {}),
                   ("baseline: LitAPI round trip (no gzip)", {"Accept-Encoding": "identity"})],
        "torchsave": [("baseline: torch.save route (requests)", {})],
    }
    for kind, variants in ({} if a.forms_only else baselines).items():
        p, port = start_baseline(kind, k, dim)
        try:
            for label, headers in variants:
                if kind == "litapi":
                    call = lambda: torch.frombuffer(bytearray(sess.post(f"http://127.0.0.1:{port}/predict", json={},
                                                                        headers=headers).content), dtype=torch.float32)
                else:
                    call = lambda: torch.load(io.BytesIO(sess.get(f"http://127.0.0.1:{port}/tensor").content))
                g = rate(call, nbytes, max(2, batches // 3), max(2, reps // 2))
                rows_out.append((label, g, g * 1e9 / (dim * 4)))
                print(rows_out[-1], flush=True)
        finally:
            stop(p)

    if a.forms_only:
        return print_table(rows_out, ratios, limits, a.png)
    clt_bytes = 2 * 12 * 768 * 2
    with ServerProcess([*common, "buffer.size=12000", "buffer.dtype=float16", "buffer.sample_shape=[2,12,768]"]) as srv:
        wait_full(srv.url)
        for w in (2, 4):
            limits.sample()
            g = dataloader_rate(srv.url, k, w, max(3, batches // 4), reps, local=False)
            rows_out.append((f"actdata: CLT 4096x[2,12,768] fp16, DataLoader {w} workers", g, g * 1e9 / clt_bytes))
            print(rows_out[-1], flush=True)

    with ServerProcess(["+preset=test", "generator.source=synthetic", "buffer.size=100000",
                        "buffer.min_fill=0.2"]) as srv:
        wait_full(srv.url, 0.9)
        limits.sample()
        g = dataloader_rate(srv.url, k, 2, batches, reps, local=False)
        rows_out.append(("actdata: serve-once, writer running, DataLoader 2 workers", g, g * 1e9 / (dim * 4)))
        print(rows_out[-1], flush=True)

    print_table(rows_out, ratios, limits, a.png)


def print_table(rows_out, ratios, limits: Limits, png: str) -> None:
    limits.sample()
    mem, lo = statistics.median(limits.mem), statistics.median(limits.lo)
    print()
    print(f"limits, median (min-max) of {len(limits.lo)} runs interleaved with the rows: "
          f"loopback TCP {Limits.fmt(limits.lo)} GB/s, memcpy {Limits.fmt(limits.mem)} GB/s; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"| {'path':<62} | {'GB/s':>6} | {'samples/s':>10} | {'x loopback':>10} |")
    print(f"|{'-' * 64}|{'-' * 8}|{'-' * 12}|{'-' * 12}|")
    print(f"| {'limit: memcpy (median)':<62} | {mem:6.2f} | {'':>10} | {mem / lo:10.2f} |")
    print(f"| {'limit: loopback TCP (median)':<62} | {lo:6.2f} | {'':>10} | {1.0:10.2f} |")
    for label, g, sps in rows_out:
        print(f"| {label:<62} | {g:6.2f} | {sps:10.0f} | {g / lo:10.2f} |")
    print()
    print(f"| {'ratio':<62} | {'x':>6} |")
    print(f"|{'-' * 64}|{'-' * 8}|")
    for label, r in ratios:
        r = r[1] / mem if isinstance(r, tuple) else r  # same host: to the median of every memcpy run
        print(f"| {label:<62} | {r:6.2f} |")
    if png:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("(matplotlib not installed: no chart; pip install matplotlib)")
            return
        labels = ["memcpy", "loopback TCP"] + [r[0].split(": ", 1)[1] for r in rows_out]
        vals = [mem, lo] + [r[1] for r in rows_out]
        colors = ["#888888", "#888888"] + ["#d62728" if r[0].startswith("baseline") else "#1f77b4" for r in rows_out]
        fig, ax = plt.subplots(figsize=(10, 0.45 * len(labels) + 1))
        ax.barh(labels[::-1], vals[::-1], color=colors[::-1])
        ax.axvline(lo, color="black", linestyle="--", linewidth=1)
        ax.set_xlabel("GB/s of tensor bytes delivered (grey: limits, red: baselines, blue: actdata)")
        ax.set_title("actdata data plane vs this machine's limits")
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        print(f"chart: {png}")


if __name__ == "__main__":
    main()
