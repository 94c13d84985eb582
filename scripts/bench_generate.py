"""Generator throughput: bare transformers forwards vs actdata writing into a real shared buffer.

Same model (the embedded SmolLM2-135M, 30 blocks), same batch and context, one run:

  (a)  bare  model(input_ids), full depth, the causal LM as the issue states it (AutoModelForCausalLM:
             30 blocks + final norm + LM head over the 49k vocabulary) [torch.no_grad, transformers defaults]
  (a') bare  model(input_ids), full depth, the base model (AutoModel: 30 blocks + final norm, no LM head)
  (b)  bare  causal LM stopped after block L by a forward hook that raises
  (b') bare  base model stopped after block L the same way
  (bh) bare  (b') with model.dtype=bfloat16 (what model.dtype=auto picks on a CPU with native bf16)
  (c)  actdata ModelSource -> SharedActivationBuffer.write, resid_post of the last block (full depth)
  (c') (c) with generator.compile=true
  (d0) actdata, resid_post of block L, eager blocks
  (d)  actdata, resid_post of block L, generator.compile=true (blocks under torch.compile)
  (e)  (d) with model.dtype=bfloat16
  (dt) optional (--threaded): (d0) with the CUDA-style three-thread pipeline forced on the CPU
  (f)  optional (--filter): the cost of filtering on the rows' device (outlier norms vs the running
       median + float16 overflow check + keeping only the kept rows) as a fraction of the capture
       forward of the same batch (resid_post of block L, float16 buffer); goal <= 5 %
  (p)  (d0) with generator.provenance and generator.statistics on and a saved position (state file
       written before each batch), as the server's generator does it; (d0) has all three off

The bare forwards get pre-tokenised blocks (no text work at all); actdata pays for tokenising,
packing, filtering and the buffer write. Everything is timed in steady state: each runner is warmed up
(and compiled) before timing, and each actdata run keeps one iterator over its source for the whole
benchmark (on the CPU the source computes only when asked, so nothing runs between its timings; the
threaded variant restarts its pipeline each rep and discards its first items untimed). Tokens/s =
tokens forwarded / wall time, median of --reps timings of --batches batches each. The runs are
interleaved rep by rep, so load from other processes hits every run alike. The ratios use the
base-model baselines (a') and (b'), the stricter comparison; the causal-LM ratios are printed too.

    python scripts/bench_generate.py [--threads 2] [--batch 8] [--ctx 128] [--layer 14] [--reps 5]
                                     [--batches 3] [--only a,b,c,...] [--threaded] [--filter]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from actdata.config import Config
from actdata.generation.loading import load_model, load_tokenizer, model_path
from actdata.generation.model_source import ModelSource
from actdata.generation.sites import sample_shape
from actdata.generation.text import TokenBlocks
from actdata.shm.buffer import SharedActivationBuffer
from actdata.wire import DTYPES


class _Stop(Exception):
    pass


class Bare:
    """A bare `model(input_ids)` of pre-tokenised blocks, optionally stopped after block `layer` by a hook.
    lm: the causal LM (with its head); otherwise the base model."""

    def __init__(self, cfg: Config, blocks: list, layer: int | None, lm: bool):
        if lm:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(model_path(cfg.model.name),
                                                              dtype=DTYPES[cfg.model.dtype]).eval()
            layers = self.model.model.layers
        else:
            self.model = load_model(cfg, "cpu")
            layers = self.model.layers
        self.blocks, self.i = blocks, 0
        if layer is not None:
            def stop(module, args, output):
                raise _Stop
            layers[layer].register_forward_hook(stop)
        self.time(2)  # warm-up (the first forwards pay one-off allocator and kernel set-up costs)

    def time(self, batches: int) -> float:
        t0, tokens = time.perf_counter(), 0
        for _ in range(batches):
            ids = self.blocks[self.i % len(self.blocks)]
            self.i += 1
            with torch.no_grad():
                try:
                    self.model(ids)
                except _Stop:
                    pass
            tokens += ids.numel()
        return tokens / (time.perf_counter() - t0)


class Actdata:
    """actdata's ModelSource feeding SharedActivationBuffer.write, as the server's generator does."""

    def __init__(self, cfg: Config, batches: int, threaded: bool = False, origin: bool = False):
        shape = sample_shape(cfg)
        rows = cfg.generator.batch_size * cfg.generator.context_length
        self.buf = SharedActivationBuffer.create(rows * (batches + 2), shape, cfg.buffer.dtype,
                                                 provenance=cfg.generator.provenance)
        self.progress, self.extra, self.batch_s = None, [], []
        if origin:  # provenance, statistics and the saved position, as actdata.generation.loop keeps them
            import tempfile

            from actdata.generation.progress import Progress

            cfg.generator.state_dir = tempfile.mkdtemp(prefix="actdata-bench-state-")
            self.progress = Progress(cfg, self.buf.spec, "bench", 0, 1)
        self.source = ModelSource(cfg, "cpu", 0)
        self.threaded = threaded
        self.items = None if threaded else iter(self.source)  # one steady-state iterator for the whole run
        self.time(2)  # warm-up (and compilation, when asked)

    def _write(self, item) -> int:
        rows, origin, info = item
        if self.progress is not None:
            t0 = time.perf_counter()
            self.progress.before_commit(rows, info)  # position saved, statistics updated
            self.extra.append(time.perf_counter() - t0)
        self.buf.write(rows, origin, provenance=info.get("provenance"))
        if self.progress is not None:
            self.progress.settle()
        return info["tokens"]

    def time(self, batches: int) -> float:
        self.buf.refresh()  # every slot FREE again (outside the timing)
        if self.threaded:  # a fresh pipeline each rep (nothing computed while other runs are timed);
            items = self.source._iter_threaded()  # its start-up and first items are not timed
            for _ in range(2):
                self._write(next(items))
        else:
            items = self.items
        t0, tokens = time.perf_counter(), 0
        for _ in range(batches):
            tokens += self._write(next(items))
        self.batch_s.append((time.perf_counter() - t0) / batches)
        rate = tokens / (time.perf_counter() - t0)
        if self.threaded:
            items.close()
        return rate

    def close(self):
        if self.items is not None:
            self.items.close()
        self.buf.close()


def filter_cost(cfg: Config, layer: int, reps: int, batches: int) -> None:
    """(f): ModelSource._filter (outliers + float16 overflow, on the rows' device) vs the capture forward."""
    c = Config(model=type(cfg.model)(**{**vars(cfg.model), "dtype": "float32"}), dataset=cfg.dataset,
               generator=type(cfg.generator)(**{**vars(cfg.generator), "layers": [layer], "outlier_factor": 3.0}))
    c.buffer.dtype = "float16"
    src = ModelSource(c, "cpu", 0)
    items = src._prepare()
    batch = [next(items) for _ in range(batches)]
    fwd, filt = [], []
    for rep in range(reps + 1):
        tf = tk = 0.0
        for ids, mask, flat, _, _ in batch:
            t0 = time.perf_counter()
            rows = src.capture(ids, mask, flat)
            t1 = time.perf_counter()
            src._filter(rows)
            tf, tk = tf + t1 - t0, tk + time.perf_counter() - t1
        if rep:  # the first pass warms up
            fwd.append(tf / len(batch))
            filt.append(tk / len(batch))
    f, k = statistics.median(fwd), statistics.median(filt)
    print(f"{'(f)  filter on the device (outliers + fp16 overflow), per batch':58s} {1e3 * k:8.2f} ms  "
          f"{1e3 * min(filt):6.2f}..{1e3 * max(filt):<6.2f}   forward {1e3 * f:.1f} ms: filter/forward = "
          f"{100 * k / f:.2f} % (goal <= 5 %)")
    src.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--layer", type=int, default=14)
    ap.add_argument("--batches", type=int, default=3, help="batches per timed rep")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated run keys (default: all but dt)")
    ap.add_argument("--threaded", action="store_true", help="add (dt): (d0) through the three-thread pipeline")
    ap.add_argument("--filter", action="store_true", help="add (f): device filter cost vs the forward")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = Config()
    cfg.model.dtype = "float32"  # the baselines; (e) asks for bfloat16
    g = cfg.generator
    g.source, g.batch_size, g.context_length = "model", args.batch, args.ctx
    n_layers = 30
    blocks = [b.input_ids for _, b in zip(range(args.batches + 1),
                                          TokenBlocks(cfg.dataset, load_tokenizer(cfg), args.ctx, args.batch))]

    def at(layer, dtype="float32", compile=False, origin=False):
        return Config(model=type(cfg.model)(**{**vars(cfg.model), "dtype": dtype}), dataset=cfg.dataset,
                      generator=type(g)(**{**vars(g), "layers": [layer], "compile": compile, "provenance": origin,
                                           "statistics": origin, "state_dir": None}))

    L, last = args.layer, n_layers - 1
    runs = {
        "a": ("(a)  bare causal LM model(input_ids), full depth + head", lambda: Bare(cfg, blocks, None, True)),
        "a'": ("(a') bare base model(input_ids), full depth", lambda: Bare(cfg, blocks, None, False)),
        "b": (f"(b)  bare causal LM, stopped after block {L} by a hook", lambda: Bare(cfg, blocks, L, True)),
        "b'": (f"(b') bare base model, stopped after block {L} by a hook", lambda: Bare(cfg, blocks, L, False)),
        "bh": ("(bh) (b') in bfloat16", lambda: Bare(at(L, "bfloat16"), blocks, L, False)),
        "c": (f"(c)  actdata -> buffer, resid_post@{last} (full depth)", lambda: Actdata(at(last), args.batches)),
        "c'": ("(c') (c) with generator.compile", lambda: Actdata(at(last, compile=True), args.batches)),
        "d0": (f"(d0) actdata -> buffer, resid_post@{L}, no compile", lambda: Actdata(at(L), args.batches)),
        "d": (f"(d)  actdata -> buffer, resid_post@{L}, generator.compile",
              lambda: Actdata(at(L, compile=True), args.batches)),
        "e": ("(e)  (d) with model.dtype=bfloat16", lambda: Actdata(at(L, "bfloat16", compile=True), args.batches)),
        "p": ("(p)  (d0) + provenance, statistics, saved position",
              lambda: Actdata(at(L, origin=True), args.batches, origin=True)),
        "dt": ("(dt) (d0) through the 3-thread pipeline (CUDA's)",
               lambda: Actdata(at(L), args.batches, threaded=True)),
    }
    if args.only == "f":
        filter_cost(cfg, args.layer, args.reps, args.batches)
        return
    keys = [k for k in args.only.split(",") if k] or [k for k in runs if k != "dt"] + (["dt"] if args.threaded else [])
    runs = {k: runs[k] for k in runs if k in keys}
    runners, rates = {}, {k: [] for k in runs}
    for k, (name, make) in runs.items():
        t0 = time.perf_counter()
        runners[k] = make()
        print(f"set up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    load0 = os.getloadavg()[0]
    for rep in range(args.reps):  # interleaved, so a neighbour's load hits every run alike
        for k, r in runners.items():
            rates[k].append(r.time(args.batches))
        print(f"rep {rep + 1}: " + "  ".join(f"{k}={v[-1]:,.0f}" for k, v in rates.items()), flush=True)
    load1 = os.getloadavg()[0]
    for r in runners.values():
        if isinstance(r, Actdata):
            r.close()
    m = {k: statistics.median(v) for k, v in rates.items()}

    def ratio(num, den, target=None):
        if num not in m or den not in m:
            return ""
        return f"{num}/{den} = {m[num] / m[den]:.2f}" + (f" (target >= {target})" if target else "")

    notes = {"c": [ratio("c", "a'", 1.0), ratio("c", "a")], "c'": [ratio("c'", "a'"), ratio("c'", "a")],
             "d0": [ratio("d0", "b'"), ratio("d0", "b")], "d": [ratio("d", "b'", 1.1), ratio("d", "b")],
             "e": [ratio("e", "b'")], "bh": [ratio("bh", "b'")], "dt": [ratio("dt", "d0")],
             "p": [ratio("p", "d0", 0.97)]}
    print(f"\nSmolLM2-135M (embedded), fp32 unless noted, torch threads={args.threads}, batch {args.batch} x "
          f"{args.ctx}, medians of {args.reps} reps x {args.batches} batches (steady state)")
    print(f"1-min load average at the start / end of the timed reps: {load0:.2f} / {load1:.2f} "
          f"(this benchmark alone keeps it near {args.threads}; more means other processes shared the cores)")
    print(f"{'run':58s} {'tokens/s':>10s}  {'min..max':>15s}   ratio")
    for k, (name, _) in runs.items():
        note = "   ".join(n for n in notes.get(k, []) if n)
        print(f"{name:58s} {m[k]:10,.0f}  {min(rates[k]):7,.0f}..{max(rates[k]):<7,.0f}   {note}")
    if "p" in runners and runners["p"].extra:  # the part of (p)'s time that (d0) does not spend, measured directly
        r = runners["p"]
        extra, batch = statistics.median(r.extra), statistics.median(r.batch_s)
        print(f"(p) extra work per batch (save position + update statistics), measured inside the run: median "
              f"{extra * 1e3:.1f} ms of a {batch * 1e3:.0f} ms batch = {extra / batch:.1%} "
              f"(=> ratio {1 - extra / batch:.3f} without the noise of the forward)")
    if args.filter:
        filter_cost(cfg, args.layer, args.reps, args.batches)


if __name__ == "__main__":
    main()
