"""Where and how a generator's model runs: the device it binds to, the dtype `auto` stands for, the
memory it will take, and which errors leave the device unusable.

Binding. `bind(device)` makes a CUDA device the calling thread's current device before anything else
touches CUDA, so nothing (a pinned allocation, a stream, a `.cuda()` without an index) opens a context
on GPU 0 by accident. The current device is per thread: every thread of the pipeline calls it.

Dtype. `model.dtype: auto` is bfloat16 on CUDA; on the CPU, bfloat16 where the CPU has native bf16
matmuls and float32 elsewhere (`cpu_auto_dtype`). An explicit float32 on CUDA runs its matmuls in TF32
(`torch.set_float32_matmul_precision("high")`); `describe_dtype` says which in the start-up log.

Devices. `resolve_accelerator` turns `server.accelerator` / `server.devices` into what LitServe is given
(an accelerator and a device count, never `auto`), counting GPUs with `torch.cuda.device_count()` through
NVML (`PYTORCH_NVML_BASED_CUDA_CHECK`): no CUDA context in the parent, and CUDA_VISIBLE_DEVICES holding
UUIDs or MIG names is understood, where LitServe's own count parses `nvidia-smi -L` (absent from many
containers). `accelerator=cuda` with no GPU visible is refused before anything starts. `device_identity`
is what a generator publishes in its status: the device it actually runs on and that GPU's UUID.

Memory. `estimate` adds up what one generator keeps: the weights of the blocks it keeps (blocks after
the last captured one are not loaded), a bound on the forward's working set, the captured rows on the
device, and the pinned host memory (`pinned_bytes`: PyTorch's caching host allocator rounds every pinned
block up to a power of two, and the estimate rounds the same way). `check_fits` refuses, with the
numbers, a config whose device share exceeds the device's free memory (where CUDA can be asked);
`check_pinned` refuses, in the parent before any generator starts, one whose pinned memory for all of
this host's generators together exceeds the host's available memory.

Poisoned context. After a device-side assert or an illegal memory access every later CUDA call of the
process fails: `poisons_context(e)` recognises those errors, and the generator then ends its worker
process so that a fresh one (with a fresh context) is started.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .. import wire
from ..config import Config, ConfigError, human_bytes
from ..host import mem_available

log = logging.getLogger(__name__)

CUDA_AUTO_DTYPE = "bfloat16"


def cpu_auto_dtype() -> str:
    """bfloat16 on a CPU with native bf16 matmuls (AMX / AVX512-BF16), where it is the faster dtype;
    float32 elsewhere, where bf16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return "float32"
    return "bfloat16" if {"amx_bf16", "avx512_bf16"} & set(flags) else "float32"


def bind(device: str | torch.device) -> torch.device:
    """The device as a torch.device; a CUDA device becomes this thread's current device (index filled in)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev


def resolve_dtype(name: str, device: str | torch.device) -> str:
    """`model.dtype` for `device`: `auto` -> bfloat16 on CUDA, cpu_auto_dtype() elsewhere; others unchanged."""
    if name not in ("auto", "", None):
        return name
    return CUDA_AUTO_DTYPE if torch.device(device).type == "cuda" else cpu_auto_dtype()


def buffer_dtype(cfg: Config, accelerator: str) -> str:
    """What `buffer.dtype: auto` stands for: the model's dtype where it is bfloat16 or float16 (rows keep
    the precision they were computed in, at half the bytes of float32 through every later stage), float32
    for a float32 model and for the synthetic source."""
    if cfg.buffer.dtype != "auto":
        return cfg.buffer.dtype
    if cfg.generator.source != "model":
        return "float32"
    model = resolve_dtype(cfg.model.dtype, "cuda" if accelerator == "cuda" else "cpu")
    return model if model in ("bfloat16", "float16") else "float32"


def describe_dtype(name: str, device: str | torch.device) -> str:
    """Apply and describe the matmul precision: float32 on CUDA -> TF32 matmuls (precision 'high')."""
    if torch.device(device).type == "cuda" and name == "float32":
        torch.set_float32_matmul_precision("high")
        return "float32 weights, TF32 matmuls"
    return name


# -- memory ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Memory:
    weights: int  # bytes of the parameters that are loaded (kept blocks, embeddings, norms)
    working: int  # bound on the forward's activations for one batch
    rows: int  # captured rows of the batches in flight, on the device
    pinned: int  # host staging buffers (pinned on CUDA)

    @property
    def device(self) -> int:
        return self.weights + self.working + self.rows

    def line(self) -> str:
        return (f"expected device memory {human_bytes(self.device)} (weights {human_bytes(self.weights)}, "
                f"forward {human_bytes(self.working)}, rows {human_bytes(self.rows)}); pinned host memory "
                f"{human_bytes(self.pinned)}")


def max_rows(cfg: Config) -> int:
    """The most rows one batch can keep: every position but the leading BOS of each context."""
    g = cfg.generator
    return g.batch_size * (g.context_length - (1 if g.drop_bos else 0))


def estimate(cfg: Config, hf_config, meta: torch.nn.Module, n_blocks: Optional[int], row_values: int,
             model_dtype: str, staging_buffers: int) -> Memory:
    """Memory of one generator (see the module docstring). `meta`: the full model on the meta device;
    `n_blocks`: blocks kept (None = all); `row_values`: values per captured row."""
    g = cfg.generator
    total = int(hf_config.num_hidden_layers)
    kept = total if n_blocks is None else n_blocks
    nbytes = wire.DTYPES[model_dtype].itemsize
    weights = 0
    for name, p in meta.named_parameters():
        block = _block_index(name)
        if block is None or block < kept:
            weights += p.numel() * nbytes
    hidden = int(hf_config.hidden_size)
    inter = int(getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "n_inner", None) or 4 * hidden)
    heads = int(getattr(hf_config, "num_attention_heads", 1) or 1)
    bt = g.batch_size * g.context_length
    # residual, normed input, q/k/v/attention output, MLP intermediates (gate, up, act) and one score
    # matrix per head: a bound for one block at a time (nothing is kept for backward)
    working = bt * (6 * hidden + 3 * inter) * nbytes + g.batch_size * heads * g.context_length ** 2 * 4
    row_bytes = wire.row_bytes((row_values,), cfg.buffer.dtype)
    rows = 3 * max_rows(cfg) * row_bytes  # the batch being captured, the one awaiting its mask, the one copied out
    return Memory(weights, working, rows, pinned_bytes(cfg, row_values, staging_buffers))


TOKENS_PER_FORWARD = 32768  # a CUDA forward of fewer tokens leaves the GPU waiting on kernel launches
DEVICE_SHARE = 0.6  # the most of the device's free memory a grown batch may be estimated to take


def with_batch(cfg: Config, batch_size: int) -> Config:
    """`cfg` with generator.batch_size replaced."""
    import dataclasses

    return dataclasses.replace(cfg, generator=dataclasses.replace(cfg.generator, batch_size=int(batch_size)))


def forward_batch(cfg: Config, device_bytes, free: int) -> int:
    """generator.batch_size for a CUDA forward (generator.auto_batch): grown towards TOKENS_PER_FORWARD
    tokens, as far as `device_bytes(batch)` (the memory estimate) stays within DEVICE_SHARE of `free`;
    never below the configured batch_size."""
    g = cfg.generator
    lo, hi, best = g.batch_size + 1, max(g.batch_size, -(-TOKENS_PER_FORWARD // g.context_length)), g.batch_size
    while lo <= hi:
        mid = (lo + hi) // 2
        if device_bytes(mid) <= DEVICE_SHARE * free:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    if best != g.batch_size:
        log.info("generator.batch_size %d -> %d on CUDA (%d tokens per forward; generator.auto_batch)",
                 g.batch_size, best, best * g.context_length)
    return best


def largest_batch(cfg: Config) -> int:
    """The largest batch_size `forward_batch` may pick (for the parent's pinned-memory check)."""
    g = cfg.generator
    return max(g.batch_size, -(-TOKENS_PER_FORWARD // g.context_length)) if g.auto_batch else g.batch_size


STAGING_BUFFERS = 5  # a CUDA generator's host staging buffers (generation.model_source)
TOKEN_BATCHES = 6  # token batches pinned at once: the queue's 3, one being made, the launched one, the forward's


def pinned_block(nbytes: int) -> int:
    """What PyTorch's caching host allocator pins for a request of `nbytes`: the next power of two."""
    return 0 if nbytes <= 0 else 1 << (int(nbytes) - 1).bit_length()


def pinned_bytes(cfg: Config, row_values: int, staging_buffers: int = STAGING_BUFFERS) -> int:
    """Pinned host memory of one CUDA generator, as the allocator rounds it: its staging buffers, the
    token batches in flight (ids, flat positions, attention mask) and each batch's statistics sums. This is
    the estimate `torch.cuda.host_memory_stats()` can be compared with (scripts/gpu_check)."""
    if staging_buffers == 0:
        return 0
    g = cfg.generator
    staging = staging_buffers * pinned_block(max_rows(cfg) * wire.row_bytes((row_values,), cfg.buffer.dtype))
    tokens = TOKEN_BATCHES * 3 * pinned_block(g.batch_size * g.context_length * 8)
    sums = (staging_buffers + 1) * 3 * pinned_block(row_values * 8)  # Moments: shift, s1, s2 (and small norms)
    return staging + tokens + sums


def check_pinned(cfg: Config, row_values: int, generators: int) -> int:
    """In the parent, before any generator starts: the pinned memory of all `generators` of this host
    (CUDA ones; 0 on the CPU) against MemAvailable; ConfigError naming the key when it does not fit."""
    each = pinned_bytes(with_batch(cfg, largest_batch(cfg)), row_values)
    total = generators * each
    avail = mem_available()
    if avail is not None and total > avail:
        raise ConfigError(
            f"generator.batch_size: {generators} generator(s) need {human_bytes(total)} of pinned host memory "
            f"({human_bytes(each)} each, staging rounded to powers of two) but only {human_bytes(avail)} is "
            "available; lower generator.batch_size or generator.context_length, or run fewer generators")
    return total


def _block_index(param_name: str) -> Optional[int]:
    """The block a parameter belongs to (`layers.3.mlp...` / `h.3...` -> 3), or None outside the blocks."""
    parts = param_name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a in ("layers", "h", "blocks", "layer") and b.isdigit():
            return int(b)
    return None


def check_fits(mem: Memory, device: torch.device) -> None:
    """Raise ConfigError, with the numbers, when `mem` cannot fit on `device` / in the host's memory."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        if mem.device > free:
            raise ConfigError(
                f"generator.batch_size: this config needs about {human_bytes(mem.device)} on {device} "
                f"(weights {human_bytes(mem.weights)}, forward {human_bytes(mem.working)}, rows "
                f"{human_bytes(mem.rows)}) but only {human_bytes(free)} of {human_bytes(total)} is free; "
                "lower generator.batch_size or generator.context_length, capture earlier layers, or use "
                "model.dtype=bfloat16")
    avail = mem_available()
    if avail is not None and mem.pinned > avail:
        raise ConfigError(
            f"generator.batch_size: the staging buffers need {human_bytes(mem.pinned)} of pinned host memory "
            f"but only {human_bytes(avail)} is available; lower generator.batch_size or generator.context_length")


# -- devices --------------------------------------------------------------------------------------------
def count_gpus() -> int:
    """CUDA devices visible to this process, counted through NVML: no CUDA context is created (the
    parent forks its HTTP processes), and UUIDs or MIG names in CUDA_VISIBLE_DEVICES are understood."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    try:
        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no driver, no NVML: no GPU
        return 0


def resolve_accelerator(accelerator: str, devices, gpus: Optional[int] = None) -> tuple[str, int]:
    """(accelerator, devices) for LitServe: `auto` resolved with `count_gpus()` (or `gpus`). Raises
    ConfigError for accelerator=cuda with no GPU visible, or more devices asked for than are visible."""
    acc = "cuda" if accelerator == "gpu" else accelerator
    if acc == "mps":
        return acc, 1 if devices == "auto" else int(devices)
    n = count_gpus() if acc in ("auto", "cuda") and gpus is None else (gpus or 0)
    if acc == "auto":
        acc = "cuda" if n > 0 else "cpu"
    if acc == "cpu":
        return acc, 1 if devices == "auto" else int(devices)
    if n == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError("server.accelerator: cuda, but no CUDA device is visible to this process"
                          + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
                          + "; use server.accelerator=cpu or auto")
    if devices == "auto":
        return acc, n
    if int(devices) > n:
        raise ConfigError(f"server.devices: {devices} asked for, but only {n} CUDA device(s) are visible")
    return acc, int(devices)


def device_identity(device: torch.device | str) -> dict:
    """{"device", "gpu_uuid"}: the device this thread actually runs on ("cuda:<current_device()>", or
    "cpu") and that GPU's UUID where PyTorch reports one (else None), for the generator's status."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return {"device": str(dev), "gpu_uuid": None}
    i = torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(i), "uuid", None)
    return {"device": f"cuda:{i}", "gpu_uuid": None if uuid is None else str(uuid)}


# -- errors ---------------------------------------------------------------------------------------------
_POISON = ("device-side assert", "illegal memory access", "illegal instruction", "misaligned address",
           "unspecified launch failure", "uncorrectable ecc", "an illegal", "cuda error: launch failure",
           "cudaerrorlaunchfailure", "hardware stack error", "context is destroyed")


def poisons_context(e: BaseException) -> bool:
    """Whether `e` is a CUDA error after which this process's CUDA context is unusable (every later
    call fails the same way): a device-side assert, an illegal access or instruction, a launch failure."""
    for err in _chain(e):
        text = f"{type(err).__name__}: {err}".lower()
        if ("cuda" in text or type(err).__name__ == "AcceleratorError") and any(p in text for p in _POISON):
            return True
    return False


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__
