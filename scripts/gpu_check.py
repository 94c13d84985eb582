"""The GPU check (issue 10): one run that proves on a CUDA machine what the CPU tests cannot.

Each check prints one table row (value, goal, PASS/FAIL/skip); the script exits 1 if any check fails.
`scripts/gpu_check.sh` runs it, then the model tests on the GPU. Checks:

  placement   two generators (a real server) on two devices when there are two, each worker process
              with memory on its own GPU only (nvidia-smi); with one GPU: a source with generator
              index 1 on cuda:0 (its rows carry index 1 in their origin ids)
  dtype       model.dtype=auto is bfloat16 on CUDA; float32 asked -> TF32 matmuls ("high")
  bf16->f32   bf16 model into a float32 buffer: rows finite, close to the float32 model's rows
  bf16->f16   bf16 model into a float16 buffer: rows finite (overflow rows dropped and counted)
  outliers    outlier filter on the device: fewer rows, origin ids filtered alike
  compile     generator.compile=true: rows equal to eager within bf16 tolerance
  event       a thread waiting for the pipeline's copy event sleeps (thread CPU time / wall < 0.2)
  stop        a full buffer, then stop: the threaded pipeline ends with no thread left, staging all back
  free        close() + release_source frees the device memory of the model (back to the baseline)
  poisoned    a device-side assert inside run_supervised ends the process with POISONED_EXIT
  memory      expected device memory (estimate) next to the measured peak; a config that cannot fit
              is refused with the numbers
  overlap     pipelined run under the CUDA profiler: fraction of GPU time outside the forward's kernels
              (copies, gaps), goal <= 10 %
  ~1B ratio   tokens/s of a ~1.2B Llama (random weights, built here: no network) at one residual site,
              actdata -> buffer, / the bare forward stopped at that block; goal >= 0.95

    python scripts/gpu_check.py [--device cuda:0] [--small]       (--device cpu: the CPU-capable checks)
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from actdata.config import Config, ConfigError
from actdata.generation.model_source import ModelSource
from actdata.generation.sites import sample_shape
from actdata.shm.buffer import SharedActivationBuffer

ROWS: list[tuple[str, str, str, str]] = []


def row(name: str, value: str, goal: str, ok) -> None:
    verdict = "skip" if ok is None else ("PASS" if ok else "FAIL")
    ROWS.append((name, value, goal, verdict))
    print(f"  {name:11s} {verdict:4s} {value}  [{goal}]", file=sys.stderr, flush=True)


def check(name: str, goal: str, needs_cuda: bool = False):
    def wrap(fn):
        def run(args):
            if needs_cuda and not args.cuda:
                return row(name, "needs CUDA", goal, None)
            try:
                fn(args, lambda value, ok: row(name, value, goal, ok))
            except Exception as e:  # noqa: BLE001 - one failing check must not hide the others
                row(name, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160], goal, False)
            finally:
                gc.collect()
                if args.cuda:
                    torch.cuda.empty_cache()
        run.check_name = name
        return run
    return wrap


def cfg(args, **gen) -> Config:
    c = Config()
    g = c.generator
    g.source, g.batch_size, g.context_length, g.layers = "model", args.batch, args.ctx, [args.layer]
    for k, v in gen.items():
        setattr(g, k, v)
    return c


def first_items(src: ModelSource, n: int) -> list:
    items = iter(src)
    out = [(r.clone(), o.copy(), i) for (r, o, i), _ in zip(items, range(n))]
    items.close()
    return out


@check("placement", "each generator on its own device")
def check_placement(args, report):
    n = torch.cuda.device_count() if args.cuda else 0
    if n >= 2:
        from actdata.serving.process import ServerProcess

        with ServerProcess(["+preset=test", "server.accelerator=cuda", "server.devices=2", "buffer.size=20000",
                            "generator.batch_size=8"], timeout=240) as srv:
            import urllib.request

            deadline, gens = time.time() + 180, []
            while time.time() < deadline:
                with urllib.request.urlopen(srv.url + "/stats") as r:
                    gens = json.load(r)["generators"]
                if len(gens) == 2 and all(g["state"] == "running" and g["rows_written"] for g in gens):
                    break
                time.sleep(1)
            apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader"],
                                  capture_output=True, text=True).stdout.strip().splitlines()
            gpus = {}
            for line in apps:
                pid, uuid = [x.strip() for x in line.split(",")]
                gpus.setdefault(int(pid), set()).add(uuid)
            worker = {g["pid"]: g["device"] for g in gens}
            own = all(len(gpus.get(pid, ())) == 1 for pid in worker)
            devices = sorted(worker.values())
            report(f"{len(gens)} generators on {devices}, GPUs per worker pid "
                   f"{ {p: len(gpus.get(p, ())) for p in worker} }", own and devices == ["cuda:0", "cuda:1"])
        return
    dev = args.device
    src = ModelSource(cfg(args), dev, index=1)
    rows, origin, _ = first_items(src, 1)[0]
    ok = bool(len(origin)) and set((origin >> 40).tolist()) == {1}
    if args.cuda:
        ok = ok and torch.cuda.current_device() == torch.device(dev).index
    report(f"one device: generator index 1 on {dev}, origin index {sorted(set((origin >> 40).tolist()))}", ok)
    src.close()


@check("dtype", "auto -> bf16 on CUDA; fp32 -> TF32")
def check_dtype(args, report):
    from actdata.generation.placement import describe_dtype, resolve_dtype

    auto = resolve_dtype("auto", args.device)
    text = describe_dtype("float32", args.device)
    if args.cuda:
        report(f"auto={auto}; float32 -> {text!r}, matmul precision {torch.get_float32_matmul_precision()}",
               auto == "bfloat16" and torch.get_float32_matmul_precision() == "high")
    else:
        report(f"auto={auto} on {args.device}; float32 -> {text!r}", auto in ("bfloat16", "float32"))


@check("bf16->f32", "finite, close to fp32 rows")
def check_bf16_f32(args, report):
    c32 = cfg(args)
    c32.model.dtype = "float32"
    ref = first_items(ModelSource(c32, args.device), 2)
    c = cfg(args)
    c.model.dtype = "bfloat16"
    got = first_items(ModelSource(c, args.device), 2)
    err = max(float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-6)).median())
              for (a, _, _), (b, _, _) in zip(got, ref))
    finite = all(bool(torch.isfinite(r).all()) for r, _, _ in got)
    report(f"median relative row error vs fp32 {err:.4f}, dtype {got[0][0].dtype}", finite and err < 0.1
           and got[0][0].dtype == torch.float32)


@check("bf16->f16", "finite; overflow counted")
def check_bf16_f16(args, report):
    c = cfg(args)
    c.model.dtype, c.buffer.dtype = "bfloat16", "float16"
    got = first_items(ModelSource(c, args.device), 3)
    finite = all(bool(torch.isfinite(r).all()) for r, _, _ in got)
    over = sum(i["rows_overflowed"] for _, _, i in got)
    report(f"{sum(len(r) for r, _, _ in got)} rows float16, all finite={finite}, rows overflowed {over}",
           finite and got[0][0].dtype == torch.float16)


@check("outliers", "filtered on the device")
def check_outliers(args, report):
    plain = first_items(ModelSource(cfg(args), args.device), 3)
    filt = first_items(ModelSource(cfg(args, outlier_factor=1.5), args.device), 3)
    n0, n1 = sum(len(r) for r, _, _ in plain), sum(len(r) for r, _, _ in filt)
    same = all(set(o1.tolist()) <= set(o0.tolist()) for (_, o0, _), (_, o1, _) in zip(plain, filt))
    report(f"{n1} of {n0} rows kept at factor 1.5", n1 < n0 and same)


@check("compile", "compiled rows == eager", needs_cuda=True)
def check_compile(args, report):
    eager = first_items(ModelSource(cfg(args), args.device), 2)
    comp = first_items(ModelSource(cfg(args, compile=True), args.device), 2)
    ok = all(torch.allclose(a.float(), b.float(), atol=0.1, rtol=0.05) for (a, _, _), (b, _, _) in zip(eager, comp))
    report(f"{len(comp)} batches compared", ok)


@check("event", "waiting thread sleeps (cpu/wall < 0.2)", needs_cuda=True)
def check_event(args, report):
    src = ModelSource(cfg(args), args.device)
    src._copy_stream = torch.cuda.Stream(src.device)
    item = next(src._prepare())
    staging = src._staging()
    torch.cuda._sleep(int(2e9))  # ~1 s of GPU time queued before the forward and its copy
    rows, _, _, event, _ = src._forward(item, staging)
    t0, c0 = time.perf_counter(), time.thread_time()
    event.synchronize()
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    report(f"waited {wall:.2f} s for the copy event using {cpu:.3f} s of CPU", wall > 0.2 and cpu / wall < 0.2)
    src.close()


@check("stop", "ends with no thread left, staging back", needs_cuda=False)
def check_stop(args, report):
    src = ModelSource(cfg(args), args.device, threaded=True)
    buf = SharedActivationBuffer.create(args.batch * args.ctx, src.plan.shape, src.cfg.buffer.dtype)
    stop = threading.Event()
    items = iter(src)
    for rows, origin, _ in items:  # fill the buffer (never waiting: nothing reads it)
        free = buf.stats()["free"]
        buf.write(rows[:free], origin[:free], stop)
        if free <= len(rows):
            break
    time.sleep(1.0)  # the pipeline fills its queues and staging behind the full buffer
    t0 = time.perf_counter()
    stop.set()
    items.close()
    took = time.perf_counter() - t0
    left = [t.name for t in src.pipeline["threads"] if t.is_alive()]
    back = src.pipeline["pool"].qsize()
    report(f"closed in {took:.2f} s, threads left {left}, staging back {back}/{src.STAGING}",
           not left and back == src.STAGING and took < 2.0)
    buf.close()
    src.close()


@check("free", "device memory back to baseline", needs_cuda=True)
def check_free(args, report):
    from actdata.generation.loop import release_source

    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(args.device)
    src = ModelSource(cfg(args), args.device)
    first_items(src, 1)
    loaded = torch.cuda.memory_allocated(args.device)
    release_source(src)
    del src
    gc.collect()
    after = torch.cuda.memory_allocated(args.device)
    report(f"allocated {base / 1e6:.0f} -> {loaded / 1e6:.0f} -> {after / 1e6:.0f} MB",
           after - base < 0.05 * (loaded - base))


POISON = r"""
import sys, threading, torch
from actdata.generation import loop as gen
from actdata.shm import BufferSpec
from actdata.config import Config
class Src:
    def __iter__(self):
        x = torch.zeros(4, device="cuda:0")
        x[torch.tensor([10], device="cuda:0")] = 1  # out of range: device-side assert
        torch.cuda.synchronize()
        yield from ()
gen.make_source = lambda *a: Src()
gen.run_supervised(Config(), BufferSpec(sys.argv[1], 100, (16,), "float32"), "cuda:0", 0, threading.Event())
"""


@check("poisoned", "process exits with POISONED_EXIT", needs_cuda=True)
def check_poisoned(args, report):
    from actdata.generation.loop import POISONED_EXIT
    from actdata.generation.status import read_statuses

    buf = SharedActivationBuffer.create(100, (16,), "float32")
    try:
        r = subprocess.run([sys.executable, "-c", POISON, buf.spec.path], capture_output=True, text=True, timeout=120)
        st = read_statuses(buf.spec)
        err = st[0]["last_error"] if st else None
        report(f"exit code {r.returncode}, last_error {str(err)[:60]!r}", r.returncode == POISONED_EXIT)
    finally:
        buf.close()


@check("memory", "estimate printed; too big refused", needs_cuda=False)
def check_memory(args, report):
    src = ModelSource(cfg(args), args.device)
    if args.cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    first_items(src, 2)
    peak = torch.cuda.max_memory_allocated(args.device) if args.cuda else 0
    line = src.memory.line()
    src.close()
    try:
        ModelSource(cfg(args, batch_size=10 ** 7), args.device, threaded=True)
        refused = "not refused"
    except ConfigError as e:
        refused = str(e)
    print(f"    estimate: {line}; measured peak {peak / 1e9:.2f} GB\n    refusal: {refused}")
    report(f"estimate {src.memory.device / 1e9:.2f} GB, measured peak {peak / 1e9:.2f} GB",
           refused.startswith("generator.batch_size") and (not args.cuda or peak <= 1.5 * src.memory.device))


def _gpu_busy(prof, window=None):
    """(kernel intervals, copy intervals) in microseconds from a torch profiler run."""
    kernels, copies = [], []
    for e in prof.events():
        if getattr(e, "device_type", None) is None or not str(e.device_type).endswith("CUDA"):
            continue
        span = (e.time_range.start, e.time_range.end)
        (copies if "Memcpy" in e.name or "Memset" in e.name or "DtoH" in e.name else kernels).append(span)
    return sorted(kernels), sorted(copies)


def _union(spans):
    total, end = 0.0, -1e30
    for s, e in spans:
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


@check("overlap", "GPU time outside the forward <= 10 %", needs_cuda=True)
def check_overlap(args, report):
    from torch.profiler import ProfilerActivity, profile

    c = cfg(args)
    buf = SharedActivationBuffer.create(args.batch * args.ctx * 12, sample_shape(c), c.buffer.dtype)
    src = ModelSource(c, args.device)
    items = iter(src)
    for _ in range(2):
        buf.write(*next(items)[:2])
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(8):
            buf.write(*next(items)[:2])
        torch.cuda.synchronize()
    items.close()
    kernels, copies = _gpu_busy(prof)
    spans = kernels + copies
    t0, t1 = min(s for s, _ in spans), max(e for _, e in spans)
    outside = 1 - _union(kernels) / (t1 - t0)
    hidden = sum(min(e - s, sum(max(0, min(e, k1) - max(s, k0)) for k0, k1 in kernels)) for s, e in copies)
    ctime = sum(e - s for s, e in copies)
    report(f"{100 * outside:.1f} % of {(t1 - t0) / 1e3:.0f} ms without a forward kernel; copies {ctime / 1e3:.1f} ms, "
           f"{100 * hidden / max(ctime, 1e-9):.0f} % of it beside a kernel", outside <= 0.10)
    buf.close()
    src.close()


def build_1b(path: str, small: bool, device: str) -> str:
    """A Llama of ~1.2B parameters (or a small one) with random weights and the embedded tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from actdata.generation.embedded import model_dir

    tok = AutoTokenizer.from_pretrained(model_dir())
    tok.save_pretrained(path)
    if small:
        conf = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    else:
        conf = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                           tie_word_embeddings=True)
    conf.bos_token_id, conf.eos_token_id = tok.bos_token_id, tok.eos_token_id
    with torch.device(device):
        model = LlamaForCausalLM(conf).to(torch.bfloat16)
    model.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    del model
    return f"{n / 1e9:.2f}B"


@check("~1B ratio", "actdata / bare forward >= 0.95")
def check_ratio(args, report):
    from transformers import AutoModel

    path = tempfile.mkdtemp(prefix="actdata-1b-")
    try:
        size = build_1b(path, args.small, args.device if args.cuda else "cpu")
        layer = 1 if args.small else 8
        c = cfg(args, layers=[layer])
        c.model.name, c.dataset.name = path, "embedded"
        batch, T = c.generator.batch_size, c.generator.context_length
        buf = SharedActivationBuffer.create(batch * T * 6, sample_shape(c), c.buffer.dtype)
        src = ModelSource(c, args.device)
        bare = AutoModel.from_pretrained(path, dtype=torch.bfloat16).to(args.device).eval()

        class Stop(Exception):
            pass

        def stop(m, a, o):
            raise Stop

        bare.layers[layer].register_forward_hook(stop)
        ids = torch.randint(100, 40000, (batch, T), device=args.device)
        sync = torch.cuda.synchronize if args.cuda else (lambda: None)

        def bare_rate(n):
            t0 = time.perf_counter()
            for _ in range(n):
                with torch.inference_mode():
                    try:
                        bare(input_ids=ids, use_cache=False)
                    except Stop:
                        pass
            sync()
            return n * batch * T / (time.perf_counter() - t0)

        items = iter(src)

        def actdata_rate(n):
            buf.refresh()
            sync()
            t0, tokens = time.perf_counter(), 0
            for _ in range(n):
                rows, origin, info = next(items)
                buf.write(rows, origin)
                tokens += info["tokens"]
            return tokens / (time.perf_counter() - t0)

        n = 2 if args.small else 10
        bare_rate(2)
        actdata_rate(2)
        a, b = [], []
        for _ in range(3):
            b.append(bare_rate(n))
            a.append(actdata_rate(n))
        items.close()
        ma, mb = statistics.median(a), statistics.median(b)
        report(f"{size} params, resid_post@{layer}, batch {batch}x{T}: actdata {ma:,.0f} tok/s, bare {mb:,.0f} "
               f"tok/s, ratio {ma / mb:.2f}", (ma / mb >= 0.95) if args.cuda else None)
        buf.close()
        src.close()
    finally:
        shutil.rmtree(path, ignore_errors=True)


CHECKS = [check_placement, check_dtype, check_bf16_f32, check_bf16_f16, check_outliers, check_compile, check_event,
          check_stop, check_free, check_poisoned, check_memory, check_overlap, check_ratio]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="small batches and a small stand-in for the 1B model")
    ap.add_argument("--only", default="", help="comma-separated check names")
    args = ap.parse_args()
    args.cuda = args.device.startswith("cuda")
    args.batch, args.ctx, args.layer = (2, 32, 3) if args.small else (32, 256, 14)
    logging.basicConfig(level=logging.WARNING)
    if args.cuda:
        print(f"torch {torch.__version__}, {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}")
    t0 = time.perf_counter()
    only = [x for x in args.only.split(",") if x]
    for fn in CHECKS:
        if not only or fn.check_name in only:
            fn(args)
    print(f"\nGPU check on {args.device} ({time.perf_counter() - t0:.0f} s), load average {os.getloadavg()[0]:.2f}")
    print(f"{'check':11s} {'':4s} {'value':90s} goal")
    for name, value, goal, verdict in ROWS:
        print(f"{name:11s} {verdict:4s} {value[:90]:90s} {goal}")
    failed = [r[0] for r in ROWS if r[3] == "FAIL"]
    print("FAILED: " + ", ".join(failed) if failed else "all checks passed (or skipped)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
