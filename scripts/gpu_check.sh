#!/usr/bin/env bash
# One short GPU check (a few minutes), run from the repository root on a machine with a CUDA GPU:
#   1. the generator (embedded SmolLM2, model.dtype=bfloat16) writing into a real shared buffer: tokens/s,
#      next to the bare forward it is built on (same batch, stopped at the same block);
#   2. whether the device->host copy of one batch overlaps the next forward (CUDA profiler: share of
#      DtoH copy time during which a kernel was running);
#   3. the model tests and the end-to-end server test on the GPU.
# Environment: PYTHON (default: python), E2E (pytest selection, default: tests/test_server.py -k "embedded or model").
set -uo pipefail
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.."

$PY -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', ok,
        torch.cuda.get_device_name(0) if ok else ''); sys.exit(0 if ok else 1)" || { echo "no CUDA GPU"; exit 1; }

$PY - <<'EOF'
import statistics, time
import torch
from actdata.buffer import SharedActivationBuffer
from actdata.pipeline import ModelSource
from actdata.sites import Capture, sample_shape
from actdata.config import Config

B, T, L, N = 32, 256, 14, 12
cfg = Config()
g = cfg.generator
g.source, g.batch_size, g.context_length, g.layers = "model", B, T, [L]
cfg.model.dtype, cfg.buffer.dtype = "bfloat16", "bfloat16"
shape = sample_shape(cfg)
buf = SharedActivationBuffer.create(B * T * (N + 4), shape, cfg.buffer.dtype)
src = ModelSource(cfg, "cuda:0", 0)

def pipeline(n):
    items = iter(src)
    rows, origin, _ = next(items)
    buf.write(rows, origin)
    torch.cuda.synchronize()
    t0, tokens = time.perf_counter(), 0
    for _ in range(n):
        rows, origin, info = next(items)
        buf.write(rows, origin)
        tokens += info["tokens"]
    rate = tokens / (time.perf_counter() - t0)
    items.close()
    buf.refresh()
    return rate

def forward_only(n):  # the same capture, rows left on the GPU, no text, no copy, no buffer
    ids = torch.randint(100, 40000, (B, T), device="cuda:0")
    index = torch.arange(B * T, device="cuda:0")[T:]  # roughly what is kept
    src.capture(ids, None, index)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        src.capture(ids, None, index)
    torch.cuda.synchronize()
    return n * B * T / (time.perf_counter() - t0)

pipe = statistics.median(pipeline(N) for _ in range(3))
fwd = statistics.median(forward_only(N) for _ in range(3))
print(f"bf16 generator -> buffer: {pipe:,.0f} tokens/s   capture forward alone: {fwd:,.0f} tokens/s   "
      f"ratio {pipe / fwd:.2f} (near 1 = text, copies and buffer writes hidden behind the forward)")

# Does the DtoH copy overlap the next forward? Profile a few pipelined batches.
from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    pipeline(6)
events = [e for e in prof.events() if getattr(e, "device_type", None) is not None
          and str(e.device_type).endswith("CUDA")]
copies = [(e.time_range.start, e.time_range.end) for e in events if "DtoH" in e.name or "Device -> Pinned" in e.name]
kernels = sorted((e.time_range.start, e.time_range.end) for e in events if "Memcpy" not in e.name and "Memset" not in e.name)
def overlap(s, e):  # time of [s, e] during which some kernel ran (kernels may overlap each other: capped)
    return min(e - s, sum(max(0, min(e, k1) - max(s, k0)) for k0, k1 in kernels))
total = sum(e - s for s, e in copies)
hidden = sum(overlap(s, e) for s, e in copies)
print(f"DtoH copies: {len(copies)}, {total / 1e3:.2f} ms in all, {100 * hidden / max(total, 1e-9):.0f}% of it "
      f"while a kernel ran ({'OVERLAPS' if total and hidden / total > 0.5 else 'does NOT overlap'} the next forward)")
buf.close()
EOF

$PY -m pytest -q -x tests/test_capture.py tests/test_model_source.py
if [ -n "${E2E:-}" ]; then $PY -m pytest -q -x $E2E; else $PY -m pytest -q -x tests/test_server.py -k "embedded or model"; fi
