"""The store beside this machine's limits, in one run: writing, replay, start-up.

    .venv/bin/python scripts/bench_store.py [--dir DIR] [--gb 2] [--reps 3] [--quick]

--quick: 0.5 GB, one rep, 2 s per generator rate (one run for a busy machine; ratios still beside limits).

Rows of the table (768-wide float32 rows, the synthetic source; DIR defaults to the system temp dir):
  limit       sequential write (+ fsync) and read of a large file in DIR, measured now
  writing     StoreWriter GB/s for the same bytes (rows queued as fast as put() takes them; running
              statistics and CRC-32C on); the generator loop's rows/s with store.write on / off
              (run_supervised on the synthetic source, a consumer releasing rows as fast as it can)
  replay      DataLoader GB/s (RemoteActivationDataset, 2 workers, 4096 rows a batch, serve-once, three
              buffers' worth of rows) from a replaying server / from a synthetic server, both with the buffer
              full first; replay from
              page cache and from cold shards (evicted with posix_fadvise DONTNEED, per file: dropping the
              whole page cache would disturb other users of the machine)
  start-up    replay start-up on a 1 GB vs a 10 GB store: open_store + the first batch in-process, and a
              server's start to its first served rows (the 10 GB store is hard links of the 1 GB store's
              shards, listed 10 times: real shards, no extra disk)
Everything written is removed at the end. Load average is printed beside the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from bench_serve import dataloader_rate, wait_full  # noqa: E402

from actdata.config import Config  # noqa: E402
from actdata.generation.loop import run_supervised  # noqa: E402
from actdata.generation.synthetic import make_rows  # noqa: E402
from actdata.serving.process import ServerProcess  # noqa: E402
from actdata.shm.buffer import NotReady, SharedActivationBuffer  # noqa: E402
from actdata.storage.catalog import open_store  # noqa: E402
from actdata.storage.format import describe, manifest_name  # noqa: E402
from actdata.storage.replay import StoreSource  # noqa: E402
from actdata.storage.writer import StoreWriter  # noqa: E402

MB = 1 << 20
DIM, BATCH = 768, 4096


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def evict(path: str) -> None:
    """Drop a file's pages from the page cache (its own pages only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fs_write_read(d: str, nbytes: int, chunk: int = 16 * MB) -> tuple[float, float]:
    """Sequential write + fsync, then a cold sequential read, of one file: GB/s each."""
    path = os.path.join(d, "limit.bin")
    buf = np.random.default_rng(0).integers(0, 255, chunk, dtype=np.uint8).tobytes()
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes // chunk):
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    w = nbytes / (time.perf_counter() - t) / 1e9
    evict(path)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(chunk):
            pass
    r = nbytes / (time.perf_counter() - t) / 1e9
    os.unlink(path)
    return w, r


def synthetic_meta(g: int = 0) -> dict:
    cfg = Config()
    cfg.generator.source = "synthetic"
    return describe(cfg, (DIM,), g, 1)


def store_write(d: str, nbytes: int, pool: list[torch.Tensor], stats: bool = True) -> float:
    """StoreWriter GB/s: queue `nbytes` of rows, close (last shard fsynced and renamed)."""
    w = StoreWriter(d, synthetic_meta(), keep_stats=stats)
    n = nbytes // (BATCH * DIM * 4)
    t = time.perf_counter()
    for i in range(n):
        w.put(pool[i % len(pool)], np.arange(i * BATCH, (i + 1) * BATCH, dtype=np.int64))
    w.close()
    dt = time.perf_counter() - t
    assert w.state()["rows"] == n * BATCH, w.state()
    return n * BATCH * DIM * 4 / dt / 1e9


def generator_rate(store_dir, seconds: float, rows_per_second=None) -> float:
    """rows/s of run_supervised (synthetic source) into a buffer drained as fast as possible."""
    cfg = Config()
    cfg.generator.source, cfg.generator.rows_per_second = "synthetic", rows_per_second
    if store_dir:
        cfg.store.path, cfg.store.write, cfg.store.stats = store_dir, True, True
    buf = SharedActivationBuffer.create(50_000, (DIM,), "float32", min_fill=0.0, max_reads=1, prefix="actdata-bstore")
    stop = threading.Event()
    gen = threading.Thread(target=run_supervised, args=(cfg, buf.spec, "cpu", 0, stop), daemon=True)

    def drain():
        while not stop.is_set():
            try:
                ids, epoch = buf.claim_ready(BATCH)
                buf.release(ids, epoch)
            except NotReady:
                time.sleep(0.001)

    dr = threading.Thread(target=drain, daemon=True)
    gen.start()
    dr.start()
    time.sleep(1.0)  # warm-up
    w0, t0 = buf.stats()["rows_written"], time.perf_counter()
    time.sleep(seconds)
    rate = (buf.stats()["rows_written"] - w0) / (time.perf_counter() - t0)
    stop.set()
    gen.join(60)
    dr.join(5)
    buf.close()
    return rate


def link_store(src: str, dst: str, shards: int, times: int) -> None:
    """A store of `shards` x `times` hard links to the first shards of `src` (same bytes, same CRCs)."""
    m = json.load(open(os.path.join(src, manifest_name(0))))
    os.makedirs(dst)
    out = []
    for r in range(times):
        for s in m["shards"][:shards]:
            name = s["file"].replace("shard-g00000-", f"shard-g00000-{r:03d}")
            os.link(os.path.join(src, s["file"]), os.path.join(dst, name))
            out.append({**s, "file": name})
    m["shards"] = out
    m["rows"], m["bytes"] = sum(s["rows"] for s in out), sum(s["bytes"] for s in out)
    json.dump(m, open(os.path.join(dst, manifest_name(0)), "w"))


def replay_startup(d: str, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        src = StoreSource(open_store(d), seed=len(ts))
        next(iter(src))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def server_first_rows(overrides: list[str]) -> float:
    import requests

    from actdata import wire

    t = time.perf_counter()
    with ServerProcess(overrides) as srv:
        while requests.get(srv.url + wire.TENSOR_PATH, params={"num_samples": 256}).status_code != 200:
            time.sleep(0.02)
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="a directory on the filesystem to measure")
    ap.add_argument("--gb", type=float, default=2.0, help="bytes written for the write figures and the replay store")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0, help="per generator-rate measurement")
    ap.add_argument("--quick", action="store_true", help="--gb 0.5 --reps 1 --seconds 2")
    ap.add_argument("--parts", default="write,replay,startup", help="which parts of the table to measure")
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    if a.quick:
        a.gb, a.reps, a.seconds = 0.5, 1, 2.0
    base = tempfile.mkdtemp(prefix="actdata-bench-store-", dir=a.dir)
    nbytes = int(a.gb * 1e9) // (16 * MB) * 16 * MB
    rows = []
    print(f"load average at start: {load()}", flush=True)
    try:
        # -- limits and writing ---------------------------------------------------------------------
        pool = [make_rows(torch.arange(i * BATCH, (i + 1) * BATCH), (DIM,), torch.float32) for i in range(8)]
        store = os.path.join(base, "replay")
        if "write" in parts:
            fs, sw, sw_nostats = [], [], []
            for r in range(a.reps):  # interleaved: the limit and the store see the same load, ratios per rep
                fs.append(fs_write_read(base, nbytes))
                d = os.path.join(base, f"w{r}")
                sw.append(store_write(d, nbytes, pool))
                if r < a.reps - 1:
                    shutil.rmtree(d)
                d2 = os.path.join(base, f"ns{r}")
                sw_nostats.append(store_write(d2, nbytes, pool, stats=False))
                shutil.rmtree(d2)
            fs_w, fs_r = statistics.median(x[0] for x in fs), statistics.median(x[1] for x in fs)
            ratio = statistics.median(s_ / f[0] for s_, f in zip(sw, fs))
            ratio_ns = statistics.median(s_ / f[0] for s_, f in zip(sw_nostats, fs))
            os.rename(os.path.join(base, f"w{a.reps - 1}"), store)  # kept: the replay store
            print(f"fs write {[round(f[0], 2) for f in fs]} GB/s, read (cold) {fs_r:.2f} GB/s; store write {sw} GB/s; "
                  f"no stats {sw_nostats}", flush=True)
            off, on = [], []
            for r in range(a.reps):
                off.append(generator_rate(None, a.seconds))
                d = os.path.join(base, f"gen{r}")
                on.append(generator_rate(d, a.seconds))
                shutil.rmtree(d)
            # a generator slower than the disk (as a model is): half the filesystem's write speed
            rps = 0.5 * fs_w * 1e9 / (DIM * 4)
            toff, ton = [], []
            for r in range(a.reps):
                toff.append(generator_rate(None, a.seconds, rps))
                d = os.path.join(base, f"tgen{r}")
                ton.append(generator_rate(d, a.seconds, rps))
                shutil.rmtree(d)
            print(f"generator rows/s off {off} on {on}; throttled off {toff} on {ton}", flush=True)
            rows += [("limit: filesystem sequential write + fsync", f"{fs_w:.2f} GB/s", ""),
                     ("limit: filesystem sequential read, cold", f"{fs_r:.2f} GB/s", ""),
                     ("store write (statistics + CRC-32C on)",
                      f"{statistics.median(sw):.2f} GB/s (spread {min(sw):.2f}-{max(sw):.2f})",
                      f"{ratio:.2f} x fs write, median of per-rep ratios (goal >= 0.7)"),
                     ("store write, statistics off", f"{statistics.median(sw_nostats):.2f} GB/s",
                      f"{ratio_ns:.2f} x fs write"),
                     ("generator loop rows/s, store off", f"{statistics.median(off):,.0f}", ""),
                     ("generator loop rows/s, store on", f"{statistics.median(on):,.0f}",
                      f"{statistics.median(on) / statistics.median(off):.2f} x off (goal >= 0.95)"),
                     ("generator at half the disk's speed, rows/s, store off", f"{statistics.median(toff):,.0f}", ""),
                     ("generator at half the disk's speed, rows/s, store on", f"{statistics.median(ton):,.0f}",
                      f"{statistics.median(ton) / statistics.median(toff):.2f} x off (goal >= 0.95)")]

        else:  # the replay and start-up store alone
            store_write(store, nbytes, pool)
        # -- replay ---------------------------------------------------------------------------------
        if "replay" in parts:
            common = ["+preset=test", "buffer.size=100000", "buffer.min_fill=0.2", "buffer.max_reads=1"]
            batches = 3 * 100_000 // BATCH  # three buffers' worth: the refill is timed, not the rows ready at start
            with ServerProcess([*common, "generator.source=synthetic"]) as srv:
                wait_full(srv.url, 0.9)
                syn = dataloader_rate(srv.url, BATCH, 2, batches, a.reps)
            with ServerProcess([*common, "generator.source=store", f"store.path={store}"]) as srv:
                wait_full(srv.url, 0.9)
                warm = dataloader_rate(srv.url, BATCH, 2, batches, a.reps)
            for f in os.listdir(store):
                evict(os.path.join(store, f))
            with ServerProcess([*common, "generator.source=store", f"store.path={store}", "store.seed=1"]) as srv:
                wait_full(srv.url, 0.9)
                cold = dataloader_rate(srv.url, BATCH, 2, batches, a.reps)
            print(f"dataloader synthetic {syn:.2f} replay warm {warm:.2f} cold {cold:.2f}", flush=True)
            rows += [("DataLoader 2 workers, synthetic server (serve-once)", f"{syn:.2f} GB/s", ""),
                     ("DataLoader 2 workers, replay server, page cache", f"{warm:.2f} GB/s",
                      f"{warm / syn:.2f} x synthetic (goal >= 0.9)"),
                     ("DataLoader 2 workers, replay server, cold shards", f"{cold:.2f} GB/s",
                      f"{cold / syn:.2f} x synthetic (goal >= 0.9)")]

        # -- start-up -------------------------------------------------------------------------------
        if "startup" in parts:
            s = open_store(store)
            per = max(1, int(1e9 // s.shards[0].bytes))
            small, big = os.path.join(base, "s1"), os.path.join(base, "s10")
            link_store(store, small, per, 1)
            link_store(store, big, per, 10)
            gb1, gb10 = open_store(small).bytes / 1e9, open_store(big).bytes / 1e9
            t1, t10 = [], []
            for _ in range(a.reps + 2):  # interleaved, so load changes hit both alike
                t1.append(replay_startup(small, 1))
                t10.append(replay_startup(big, 1))
            t1, t10 = statistics.median(t1), statistics.median(t10)
            srv1 = server_first_rows(["+preset=test", "generator.source=store", f"store.path={small}"])
            srv10 = server_first_rows(["+preset=test", "generator.source=store", f"store.path={big}"])
            rows += [(f"replay start-up in-process, {gb1:.1f} GB vs {gb10:.1f} GB store",
                      f"{t1 * 1e3:.0f} vs {t10 * 1e3:.0f} ms", f"{t10 / t1:.2f} x (goal <= 1.2)"),
                     (f"server start to first rows, {gb1:.1f} GB vs {gb10:.1f} GB store",
                      f"{srv1:.2f} vs {srv10:.2f} s",
                      f"{srv10 / srv1:.2f} x (goal <= 1.2)")]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nload average at end: {load()} ({os.cpu_count()} cores); {a.gb:g} GB written per figure, "
          f"medians of {a.reps}")
    print(f"| {'what':<58} | {'figure':<28} | {'ratio':<34} |")
    print(f"|{'-' * 60}|{'-' * 30}|{'-' * 36}|")
    for what, fig, ratio in rows:
        print(f"| {what:<58} | {fig:<28} | {ratio:<34} |")


if __name__ == "__main__":
    main()
