"""The generator's host path, measured on its own: statistics, the consumer, the tokenizer.

One run, ratios beside the machine's memcpy bandwidth measured in the same run (limits.py):

  (s)  statistics on / off: the synthetic source writing 2048-wide bfloat16 rows flat out into a shared
       buffer (Progress + buffer write, as the generation loop does it). Three runs: statistics off; on
       as before this change (a float64 reduction in the writer's thread, reimplemented here as the
       baseline); on now (float32 chunks reduced by the statistics thread beside the buffer write).
  (c)  the consumer path alone: 4096-row batches of 2048-wide bfloat16 rows handed in as fast as possible
       (no source), through the outlier filter, the copy into a staging buffer, the saved position, the
       statistics, the buffer write to random slots; bytes/s / memcpy. Also without the filter and staging
       copy (on CUDA those run on the device and the copy engine, not the host), and with the statistics'
       sums handed in as a GPU hands them over (reduced on the device: only the merge is left).
  (t)  the tokenizer alone on the embedded corpus with the embedded tokenizer, blocks of 8 x 128 tokens:
       before (the tokenizer's own call, 64 documents at a time, list packing, in one thread: reimplemented
       here) and now (generation.text.TokenBlocks: a pool of cores' threads, numpy packing); tokens/s.
  (w)  the forward thread's idle time: the threaded (CUDA) pipeline on the CPU with a stand-in forward that
       takes the time a GPU would at the given tokens/s (it sleeps, as a thread waiting on a GPU does),
       the embedded tokenizer making its tokens; the fraction of the run it waited for tokens.

Medians of --reps timings; the machine may be shared, so read the spread.

    python scripts/bench_host.py [--quick] [--reps 5] [--rates 500000,1000000]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMITS = os.path.join(os.path.dirname(ROOT), "shared", "tools", "limits.py")
WIDTH = 2048


def memcpy_gbps() -> float:
    """The machine's memcpy bandwidth, by limits.py when it is there (else the same measurement here)."""
    if os.path.exists(LIMITS):
        sys.path.insert(0, os.path.dirname(LIMITS))
        import limits

        return limits.memcpy()
    src = torch.empty(256 << 20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        dst.copy_(src)
        ts.append(time.perf_counter() - t)
    return src.numel() / statistics.median(ts) / 1e9


def old_update(stats, rows: torch.Tensor) -> None:
    """The statistics as they were: the batch reduced in float64 in the writer's thread."""
    k = len(rows)
    x = rows.reshape(k, stats.points, stats.width).to(torch.float64)
    var, mean = torch.var_mean(x, dim=0, correction=0)
    norm = torch.linalg.vector_norm(x, dim=-1)
    stats._fold(k, mean.numpy(), (var * k).numpy(), (norm * norm).sum(dim=0).numpy(), norm.sum(dim=0).numpy())


def med(xs):
    return statistics.median(xs), (max(xs) - min(xs)) / statistics.median(xs) if xs else 0.0


# -- (s) statistics on / off, synthetic source ---------------------------------------------------------
def bench_statistics(reps: int, batches: int) -> dict:
    from actdata.config import Config
    from actdata.generation.progress import Progress
    from actdata.generation.synthetic import SyntheticSource
    from actdata.shm import SharedActivationBuffer

    rows_per_rep = 256 * batches
    buf = SharedActivationBuffer.create(rows_per_rep, (WIDTH,), "bfloat16", prefix="actbenchhost")
    out = {k: [] for k in ("off", "before", "now")}
    try:
        progs = {}
        for mode in out:
            cfg = Config()
            cfg.generator.source, cfg.generator.state_dir = "synthetic", tempfile.mkdtemp(prefix="actbench-")
            cfg.generator.statistics = mode != "off"
            progs[mode] = Progress(cfg, buf.spec, f"bench-{mode}", 0, 1)
        sources = {m: iter(SyntheticSource((WIDTH,), torch.bfloat16)) for m in out}
        for _ in range(reps + 1):  # the first round warms up
            for mode, prog in progs.items():
                buf.refresh()
                src = sources[mode]
                t0 = time.perf_counter()
                for _ in range(batches):
                    rows, origin, info = next(src)
                    if mode == "before":
                        prog.worker = None  # statistics in this thread, in float64, as before
                        prog.before_commit(rows, info)
                        old_update(prog.stats, rows)
                    else:
                        prog.before_commit(rows, info)
                    buf.write(rows, origin)  # no settle(): synthetic rows are fresh tensors (fresh_rows)
                prog.settle()
                out[mode].append(rows_per_rep / (time.perf_counter() - t0))
        for m in out:
            out[m] = out[m][1:]
        for prog in progs.values():
            prog.close()
    finally:
        buf.close()
    return out


# -- (c) the consumer path alone -----------------------------------------------------------------------
def bench_consumer(reps: int, batches: int, batch_rows: int = 4096) -> dict:
    from actdata.config import Config
    from actdata.generation.progress import Progress
    from actdata.generation.sites import OutlierFilter
    from actdata.shm import SharedActivationBuffer
    from actdata.stats import reduce_rows

    g = torch.Generator().manual_seed(0)
    made = [(torch.randn(batch_rows, WIDTH, generator=g) * 2).to(torch.bfloat16) for _ in range(4)]
    buf = SharedActivationBuffer.create(batch_rows * batches, (WIDTH,), "bfloat16", prefix="actbenchhost")
    cfg = Config()
    cfg.generator.source, cfg.generator.state_dir = "model", tempfile.mkdtemp(prefix="actbench-")
    prog = Progress(cfg, buf.spec, "bench-consumer", 0, 1)
    staging = torch.empty(batch_rows, WIDTH, dtype=torch.bfloat16)
    outliers = OutlierFilter(10.0)
    out = {"full": [], "consumer": [], "device": []}
    sums = [reduce_rows(m, 1, WIDTH) for m in made]  # what a GPU hands over with its rows
    ctx = 0
    try:
        for _ in range(reps + 1):
            for mode in out:
                buf.refresh()
                t0 = time.perf_counter()
                for i in range(batches):
                    rows = made[i % len(made)]
                    if mode == "full":  # the device filter and the staging copy, on the host here
                        ok = outliers(rows.view(batch_rows, 1, 1, WIDTH))
                        kept = ok.numpy()
                        if not kept.all():
                            rows = rows.index_select(0, torch.from_numpy(np.flatnonzero(kept)))
                        host = staging[:len(rows)]
                        host.copy_(rows)
                        rows = host
                    origin = np.full(len(rows), ctx, dtype=np.int64)
                    ctx += 1
                    info = {"contexts": 8, "tokens": len(rows), "position": {"pass": 0, "documents": ctx,
                                                                                "offset": 0},
                            "next_context": ctx}
                    if mode == "device":
                        info["moments"] = sums[i % len(made)]
                    prog.before_commit(rows, info)
                    buf.write(rows, origin)
                    prog.settle()  # staging memory is reused by the next batch
                out[mode].append(batch_rows * batches * WIDTH * 2 / (time.perf_counter() - t0) / 1e9)
        for m in out:
            out[m] = out[m][1:]
    finally:
        prog.close()
        buf.close()
    return out


# -- (t) the tokenizer alone ---------------------------------------------------------------------------
def old_token_blocks(d, tok, T: int, B: int):
    """The tokenizer path as it was: the tokenizer's call on 64 documents, list packing, one thread."""
    from actdata.generation.text import documents, first_id, pack_tracked

    sep = [first_id(tok.eos_token_id, tok.bos_token_id)]

    def streams():
        epoch = 0
        while True:
            batch, n = [], 0
            for text in documents(d, epoch):
                batch.append(text)
                n += 1
                if len(batch) == 64:
                    for j, ids in enumerate(tok(batch, add_special_tokens=False)["input_ids"]):
                        yield epoch, n - 64 + j, list(ids) + sep, 0
                    batch = []
            epoch += 1

    rows = []
    for block, _ in pack_tracked(streams(), T, first_id(tok.bos_token_id, tok.eos_token_id)):
        rows.append(block)
        if len(rows) == B:
            ids = torch.zeros((B, T), dtype=torch.int64)
            for i, r in enumerate(rows):
                ids[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
            yield ids
            rows = []


def bench_tokenizer(reps: int, batches: int) -> dict:
    from actdata.config import Config
    from actdata.generation.loading import load_tokenizer
    from actdata.generation.text import TokenBlocks

    cfg = Config()
    tok = load_tokenizer(cfg)
    runs = {"before": lambda: old_token_blocks(cfg.dataset, tok, 128, 8),
            "now": lambda: (b.input_ids for b in TokenBlocks(cfg.dataset, tok, 128, 8))}
    out = {k: [] for k in runs}
    for _ in range(reps):  # a fresh iterator each time: the pool's read-ahead never runs beside another timing
        for k, make in runs.items():
            t0, n = time.perf_counter(), 0
            it = make()
            for _ in range(batches):
                n += next(it).numel()
            out[k].append(n / (time.perf_counter() - t0))
            it.close()
    return out


# -- (w) the forward thread's idle time ------------------------------------------------------------------
def bench_forward_idle(rate: float, seconds: float, batch: int = 8, ctx: int = 1024) -> tuple[float, float]:
    """(fraction of the run the forward thread waited for tokens, tokens/s reached) with a stand-in forward
    taking tokens / rate seconds."""
    from actdata.config import Config
    from actdata.generation.model_source import ModelSource

    cfg = Config()
    cfg.generator.source, cfg.generator.state_dir = "model", None
    cfg.generator.batch_size, cfg.generator.context_length, cfg.generator.layers = batch, ctx, [0]
    src = ModelSource(cfg, "cpu", 0, threaded=True)
    capture = src.capture
    rows = torch.zeros(src.max_rows, *src.plan.full, dtype=src.dtype)

    def forward(ids, mask, flat):
        time.sleep(ids.numel() / rate)
        return rows[:len(flat)]

    src.capture = forward
    items = iter(src)
    for _ in range(3):
        next(items)
    pipe = src.pipeline["pipe"]
    w0, t0, tokens = pipe.token_wait_s, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        _, _, info = next(items)
        tokens += info["tokens"]
    elapsed = time.perf_counter() - t0
    waited = pipe.token_wait_s - w0
    items.close()
    src.capture = capture
    src.close()
    return waited / elapsed, tokens / elapsed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer batches and reps (a minute)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--rates", default="500000,1000000", help="stand-in forward tokens/s for (w)")
    a = ap.parse_args()
    reps = a.reps or (3 if a.quick else 7)
    scale = 1 if a.quick else 4
    mc = memcpy_gbps()
    print(f"cores {len(os.sched_getaffinity(0))}, torch threads {torch.get_num_threads()}, "
          f"memcpy {mc:.2f} GB/s (limits.py, this run); medians of {reps} reps, spread = (max-min)/median")
    print()
    print(f"{'run':58s} {'median':>14s} {'spread':>7s} {'ratio':>8s}")

    def row(name, xs, unit, ratio_to=None, fmt="{:,.0f}"):
        m, spread = med(xs)
        r = "" if ratio_to is None else f"{m / ratio_to:8.2f}"
        print(f"{name:58s} {fmt.format(m):>10s} {unit:3s} {spread:7.2f} {r}")

    s = bench_statistics(reps, 40 * scale)
    off = med(s["off"])[0]
    row("(s) synthetic 2048 bf16, statistics off  rows/s", s["off"], "r/s")
    row("(s) statistics on, before (float64, writer thread) / off", s["before"], "r/s", off)
    row("(s) statistics on, now (float32, stats thread) / off", s["now"], "r/s", off)
    c = bench_consumer(reps, 8 * scale)
    row("(c) consumer: filter+staging+state+stats+write / memcpy", c["full"], "GB/s", mc, "{:.2f}")
    row("(c) consumer: state+stats+write (device filter) / memcpy", c["consumer"], "GB/s", mc, "{:.2f}")
    row("(c) consumer: state+write, sums from the device / memcpy", c["device"], "GB/s", mc, "{:.2f}")
    t = bench_tokenizer(reps, 1000 * scale)
    before = med(t["before"])[0]
    row("(t) tokenizer before (one thread, lists)  tokens/s", t["before"], "t/s")
    row("(t) tokenizer now (pool, numpy) / before", t["now"], "t/s", before)
    for rate in (float(x) for x in a.rates.split(",")):
        idle, reached = bench_forward_idle(rate, 3.0 if a.quick else 10.0)
        print(f"{f'(w) forward at {rate:,.0f} tok/s: waited for tokens':58s} {idle * 100:9.2f} %   "
              f"(reached {reached:,.0f} tok/s)")


if __name__ == "__main__":
    main()
