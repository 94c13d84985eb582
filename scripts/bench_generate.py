"""Generator throughput: bare transformers forwards vs actdata writing into a real shared buffer.

Same model (the embedded SmolLM2-135M, 30 blocks), same batch and context, one run:

  (a) bare   model(input_ids), full depth                      [base model, no LM head, torch.no_grad]
  (b) bare   forward stopped after block L by a hook that raises
  (c) actdata ModelSource -> SharedActivationBuffer.write, resid_post of the last block (full depth)
  (d0) actdata, resid_post of block L, eager blocks
  (d) actdata, resid_post of block L, generator.compile=true (blocks under torch.compile)
  (e) (d) with model.dtype=bfloat16

The bare forwards get pre-tokenised blocks (no text work at all); actdata pays for tokenising,
packing, filtering and the buffer write (overlapped with the forward). Tokens/s = tokens forwarded /
wall time, median of --reps timings of --batches batches each, after a warm-up. The runs are
interleaved rep by rep (and each actdata rep starts a fresh pipeline), so load from other processes
on the machine hits every run alike.

    python scripts/bench_generate.py [--threads 2] [--batch 8] [--ctx 128] [--layer 14] [--reps 3]
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

from actdata.buffer import SharedActivationBuffer
from actdata.capture import ModelSource, load_model, load_tokenizer, sample_shape
from actdata.config import Config
from actdata.text import TokenBlocks


class _Stop(Exception):
    pass


class Bare:
    """A bare forward of pre-tokenised blocks, optionally stopped after block `layer` by a hook."""

    def __init__(self, cfg: Config, blocks: list, layer: int | None):
        self.model, self.blocks, self.i = load_model(cfg, "cpu"), blocks, 0
        if layer is not None:
            def stop(module, args, output):
                raise _Stop
            self.model.layers[layer].register_forward_hook(stop)
        self.time(1)  # warm-up

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

    def __init__(self, cfg: Config, batches: int):
        shape = sample_shape(cfg)
        rows = cfg.generator.batch_size * cfg.generator.context_length
        self.buf = SharedActivationBuffer.create(rows * (batches + 2), shape, cfg.buffer.dtype)
        self.source = ModelSource(cfg, "cpu", 0)
        self.time(1)  # warm-up (and compilation, when asked)

    def time(self, batches: int) -> float:
        self.buf.refresh()  # every slot FREE again (outside the timing)
        items = iter(self.source)  # a fresh pipeline: nothing computed while other runs were timed
        rows, origin, _ = next(items)
        self.buf.write(rows, origin)
        t0, tokens = time.perf_counter(), 0
        for _ in range(batches):
            rows, origin, info = next(items)
            self.buf.write(rows, origin)
            tokens += info["tokens"]
        rate = tokens / (time.perf_counter() - t0)
        items.close()
        return rate

    def close(self):
        self.buf.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--layer", type=int, default=14)
    ap.add_argument("--batches", type=int, default=3, help="batches per timed rep")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = Config()
    g = cfg.generator
    g.source, g.batch_size, g.context_length = "model", args.batch, args.ctx
    n_layers = 30
    blocks = [b.input_ids for _, b in zip(range(args.batches + 1),
                                          TokenBlocks(cfg.dataset, load_tokenizer(cfg), args.ctx, args.batch))]

    def at(layer, dtype="float32", compile=False):
        return Config(model=type(cfg.model)(**{**vars(cfg.model), "dtype": dtype}), dataset=cfg.dataset,
                      generator=type(g)(**{**vars(g), "layers": [layer], "compile": compile}))

    L, last = args.layer, n_layers - 1
    runs = {
        "a": ("(a) bare model(input_ids), full depth", lambda: Bare(cfg, blocks, None)),
        "b": (f"(b) bare, stopped after block {L} by a hook", lambda: Bare(cfg, blocks, L)),
        "c": (f"(c) actdata -> buffer, resid_post@{last} (full depth)", lambda: Actdata(at(last), args.batches)),
        "d0": (f"(d0) actdata -> buffer, resid_post@{L}, no compile", lambda: Actdata(at(L), args.batches)),
        "d": (f"(d) actdata -> buffer, resid_post@{L}, generator.compile", lambda: Actdata(at(L, compile=True),
                                                                                        args.batches)),
        "e": ("(e) (d) with model.dtype=bfloat16", lambda: Actdata(at(L, "bfloat16", compile=True), args.batches)),
    }
    runners, rates = {}, {k: [] for k in runs}
    for k, (name, make) in runs.items():
        t0 = time.perf_counter()
        runners[k] = make()
        print(f"set up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    for rep in range(args.reps):  # interleaved, so a neighbour's load hits every run alike
        for k, r in runners.items():
            rates[k].append(r.time(args.batches))
        print(f"rep {rep + 1}: " + "  ".join(f"{k}={v[-1]:,.0f}" for k, v in rates.items()), flush=True)
    for r in runners.values():
        if isinstance(r, Actdata):
            r.close()
    m = {k: statistics.median(v) for k, v in rates.items()}
    ratios = {"c": ("(c)/(a)", m["c"] / m["a"], 1.0), "d0": ("(d0)/(b)", m["d0"] / m["b"], None),
              "d": ("(d)/(b)", m["d"] / m["b"], 1.1), "e": ("(e)/(b)", m["e"] / m["b"], None)}
    rows = [(runs[k][0], m[k], ratios.get(k)) for k in runs]
    print(f"\nSmolLM2-135M (embedded), fp32 unless noted, torch threads={args.threads}, batch {args.batch} x "
          f"{args.ctx}, medians of {args.reps} reps x {args.batches} batches")
    print(f"load average during the run: {os.getloadavg()[0]:.2f} (2 = both cores busy before we started)")
    print(f"{'run':58s} {'tokens/s':>10s}   ratio")
    for name, rate, ratio in rows:
        r = "" if ratio is None else f"{ratio[0]} = {ratio[1]:.2f}" + (f" (target >= {ratio[2]})" if ratio[2] else "")
        print(f"{name:58s} {rate:10,.0f}   {r}")


if __name__ == "__main__":
    main()
