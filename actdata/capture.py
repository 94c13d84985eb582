"""Model + hooks -> activation rows: loading, capture sites, early stopping, token filtering.

Sites. A named point at block i of a GPT-2 or Llama-family model means:

    resid_pre   the residual stream entering block i          (= hidden_states[i])
    attn_out    the attention sublayer's output, before it is added to the residual
    mlp_in      the MLP's input: the normalised residual after attention (ln_2 / post_attention_layernorm)
    mlp_out     the MLP's output, before it is added to the residual
    resid_post  the residual stream leaving block i           (= hidden_states[i+1], before any final norm)

A raw site `module.path:input|output` names any module of the model (paths as printed by the causal-LM
model, e.g. `model.layers.3.mlp.act_fn:output`, or of its base model, `layers.3.mlp.act_fn:output`);
`{layer}` in the path expands over `generator.layers`. A raw site without `{layer}` is captured once.

A row holds every site at every layer for one token: shape `[n_points, n_layers, width]`, squeezed to
`[width]` when `generator.squeeze` and there is one point at one layer. The width is the model's
hidden size for named points; every site must have the same width.

Forward. One forward captures all sites (hooks copy the kept positions straight into the output rows,
already in the buffer dtype). It stops, by raising a private exception from the hook of the last site
to fire, right after the last needed module: later blocks, the final norm and the LM head never run
(the LM head is not even loaded: the base model is). No KV cache, no autograd.

Kept positions: attention mask 1, minus position 0 (the BOS every block starts with) when
`generator.drop_bos`, minus tokens in the tokenizer's special ids when `generator.drop_special`; then,
with `generator.outlier_factor`, minus rows with a vector whose norm exceeds that multiple of the
running median norm of its site (attention sinks and the like).

Pipeline (`ModelSource`). On CUDA: a thread tokenises and packs text into a small queue; a second
thread runs the forwards and puts finished rows into another small queue; the consumer (the buffer
write) reads them. So tokenisation and buffer writes overlap the next forward. Rows go device -> host
through pinned staging buffers with non-blocking copies; a staging buffer is reused only after the
consumer has asked for the next item, so the rows of an item stay valid until then. On the CPU the
same three steps run one after the other in the consumer's thread: the forward's intra-op threads
already use every core, the other steps take milliseconds per batch, and threads competing with the
forward's OpenMP workers cost more than the overlap would gain.
"""
from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from .config import SITES, Config, ConfigError
from .wire import DTYPES as TORCH_DTYPES

log = logging.getLogger("actdata.capture")

# per layout: (attribute names of the attention sublayer, of the MLP)
ATTN_NAMES, MLP_NAMES = ("attn", "self_attn", "attention"), ("mlp", "feed_forward")
OUTLIER_MEMORY = 0.05  # weight of a new batch in the running median norm


class _Stop(Exception):
    """Raised by the last capture hook to end the forward early."""


# -- model and config ---------------------------------------------------------------------------------
def model_path(name: str) -> str:
    """`embedded` -> the cached safetensors copy of the shipped SmolLM2; otherwise unchanged."""
    if name == "embedded":
        from .embedded import model_dir

        return model_dir()
    return name


def load_config(cfg: Config):
    from transformers import AutoConfig

    m = cfg.model
    path = model_path(m.name)
    try:
        return AutoConfig.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except Exception as e:
        raise ConfigError(f"model.name: cannot load the config of {m.name!r}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e


def meta_model(hf_config, trust_remote_code: bool = False) -> torch.nn.Module:
    """The base model's module tree without weights (meta tensors): for planning, costs no memory."""
    from transformers import AutoModel

    with torch.device("meta"):
        return AutoModel.from_config(hf_config, trust_remote_code=trust_remote_code)


def load_model(cfg: Config, device: str) -> torch.nn.Module:
    """The base model (no LM head) in `model.dtype` on `device`, in eval mode, without gradients."""
    from transformers import AutoModel

    m = cfg.model
    kw = dict(dtype=TORCH_DTYPES[m.dtype], revision=m.revision, trust_remote_code=m.trust_remote_code)
    if device.startswith("cuda"):
        kw["device_map"] = device
    try:
        model = AutoModel.from_pretrained(model_path(m.name), **kw)
    except Exception as e:
        raise ConfigError(f"model.name: cannot load {m.name!r}: {type(e).__name__}: {e}") from e
    if not device.startswith("cuda"):
        model.to(device)
    model.eval().requires_grad_(False)
    return model


def load_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    m = cfg.model
    return AutoTokenizer.from_pretrained(model_path(m.name), revision=m.revision,
                                         trust_remote_code=m.trust_remote_code)


# -- the capture plan -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Site:
    point: int  # index into the row's first axis
    layer: int  # index into the row's second axis (not the block number)
    module: str  # module path in the base model
    where: str  # "input" | "output"


@dataclass(frozen=True)
class Plan:
    sites: tuple[Site, ...]
    shape: tuple[int, ...]  # row shape, after squeezing
    full: tuple[int, int, int]  # (n_points, n_layers, width)


def blocks_path(model: torch.nn.Module, n_layers: int) -> Optional[str]:
    """Path of the ModuleList holding the transformer blocks (GPT-2: `h`, Llama: `layers`)."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n_layers and name.count(".") <= 1:
            return name
    return None


def _child(block: torch.nn.Module, names: tuple[str, ...]) -> Optional[str]:
    return next((n for n in names if hasattr(block, n)), None)


def _resolve(model: torch.nn.Module, path: str, prefix: str) -> Optional[str]:
    """A module path of the base model for `path` (which may carry the causal-LM prefix)."""
    names = dict(model.named_modules())
    if path in names:
        return path
    if prefix and path.startswith(prefix + ".") and path[len(prefix) + 1:] in names:
        return path[len(prefix) + 1:]
    return None


def _width(mod: torch.nn.Module, where: str, hidden: int) -> int:
    if isinstance(mod, torch.nn.Linear):
        return mod.in_features if where == "input" else mod.out_features
    if isinstance(mod, torch.nn.Embedding) and where == "output":
        return mod.embedding_dim
    if type(mod).__name__ == "Conv1D":  # GPT-2's linear layers: weight [in, out]
        return mod.weight.shape[0] if where == "input" else mod.weight.shape[1]
    return hidden


def make_plan(cfg: Config, model: torch.nn.Module, hf_config) -> Plan:
    """Map generator.sites x generator.layers onto modules of `model` (real or meta); check them."""
    g = cfg.generator
    n_blocks = int(hf_config.num_hidden_layers)
    hidden = int(hf_config.hidden_size)
    layers = list(range(n_blocks)) if g.layers == "all" else [int(x) for x in g.layers]
    for i in layers:
        if not 0 <= i < n_blocks:
            raise ConfigError(f"generator.layers: block {i} does not exist; the model has {n_blocks} blocks "
                              f"(0..{n_blocks - 1})")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"generator.layers: {layers} lists a block twice")
    sites = [str(s) for s in g.sites]
    if len(set(sites)) != len(sites):
        raise ConfigError(f"generator.sites: {sites} lists a site twice")
    layered = [s for s in sites if s in SITES or "{layer}" in s]
    if not layered:
        layers = [None]  # raw sites only, each captured once
    elif len(layered) < len(sites) and len(layers) != 1:
        raise ConfigError("generator.sites: a raw site without '{layer}' can be combined with layered sites "
                          f"only at a single layer, got generator.layers={layers}")

    blocks = blocks_path(model, n_blocks)
    prefix = getattr(model, "base_model_prefix", "") or ""
    modules = dict(model.named_modules())
    out, widths = [], {}
    for p, site in enumerate(sites):
        for li, layer in enumerate(layers):
            if site in SITES:
                if blocks is None:
                    raise ConfigError(f"generator.sites: named point {site!r} needs a GPT-2 or Llama-family "
                                      f"layout, not found in {type(model).__name__}; use 'module.path:input|output'")
                block = f"{blocks}.{layer}" if blocks else str(layer)
                attn, mlp = _child(modules[block], ATTN_NAMES), _child(modules[block], MLP_NAMES)
                if attn is None or mlp is None:
                    raise ConfigError(f"generator.sites: named point {site!r}: block {block!r} of "
                                      f"{type(model).__name__} has no attention/MLP submodule this code knows")
                module, where = {"resid_pre": (block, "input"), "resid_post": (block, "output"),
                                 "attn_out": (f"{block}.{attn}", "output"), "mlp_in": (f"{block}.{mlp}", "input"),
                                 "mlp_out": (f"{block}.{mlp}", "output")}[site]
                width = hidden
            else:
                raw, where = site.rsplit(":", 1)
                raw = raw.replace("{layer}", str(layer if layer is not None else 0))
                module = _resolve(model, raw, prefix)
                if module is None:
                    hint = f"; blocks are at '{blocks}.<i>'" if blocks else ""
                    raise ConfigError(f"generator.sites: {site!r}: no module {raw!r} in {type(model).__name__}{hint}")
                width = _width(modules[module], where, hidden)
            widths[site] = width
            out.append(Site(p, li, module, where))
    if len(set(widths.values())) > 1:
        raise ConfigError(f"generator.sites: all sites of a row need one width, got {widths}")
    width = next(iter(widths.values()))
    full = (len(sites), len(layers), width)
    shape = (width,) if g.squeeze and full[:2] == (1, 1) else full
    return Plan(tuple(out), shape, full)


def check_buffer(cfg: Config, plan: Plan) -> None:
    b = cfg.buffer
    if b.sample_shape is not None:
        raise ConfigError(f"buffer.sample_shape: only for the synthetic source; with a model the row shape "
                          f"follows from the model and generator.sites/layers (here {list(plan.shape)}); set it to null")
    if b.activation_dim is not None and int(b.activation_dim) != plan.full[2]:
        raise ConfigError(f"buffer.activation_dim: {b.activation_dim} contradicts the model's width "
                          f"{plan.full[2]} for generator.sites={list(cfg.generator.sites)}; set it to null or "
                          f"{plan.full[2]}")


def sample_shape(cfg: Config) -> tuple[int, ...]:
    """The row shape for this config, from the model's config alone (no weights, no CUDA).
    Raises ConfigError naming the key when the config contradicts the model."""
    hf_config = load_config(cfg)
    plan = make_plan(cfg, meta_model(hf_config, cfg.model.trust_remote_code), hf_config)
    check_buffer(cfg, plan)
    return plan.shape


# -- one forward ----------------------------------------------------------------------------------------
def keep_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids, drop_bos: bool,
              drop_special: bool) -> torch.Tensor:
    """bool [batch, T]: positions whose activations are kept (see the module docstring)."""
    keep = attention_mask.bool().clone()
    if drop_special and len(special_ids):
        special = torch.isin(input_ids, torch.as_tensor(sorted(special_ids), dtype=input_ids.dtype))
        special[:, 0] &= drop_bos  # the leading BOS is governed by drop_bos alone
        keep &= ~special
    if drop_bos:
        keep[:, 0] = False
    return keep


def _tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


class Capture:
    """Hooks that copy the plan's sites at given positions into preallocated rows, then stop the forward."""

    def __init__(self, model: torch.nn.Module, plan: Plan, dtype: torch.dtype):
        self.model, self.plan, self.dtype = model, plan, dtype
        modules = dict(model.named_modules())
        self.rows: Optional[torch.Tensor] = None  # [k, n_points, n_layers, width] during a forward
        self.index: Optional[torch.Tensor] = None  # flat positions to keep, on the model's device
        self._done: set[int] = set()
        self._handles = []
        for i, s in enumerate(plan.sites):
            mod = modules[s.module]
            if s.where == "input":
                h = mod.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True)
            else:
                h = mod.register_forward_hook(self._post_hook(i))
            self._handles.append(h)

    def _pre_hook(self, i):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
            self._take(i, x)
        return hook

    def _post_hook(self, i):
        def hook(module, args, output):
            self._take(i, _tensor(output))
        return hook

    def _take(self, i: int, x: torch.Tensor) -> None:
        if self.rows is None or i in self._done:
            return
        s = self.plan.sites[i]
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[-1] != self.rows.shape[-1]:
            raise RuntimeError(f"site {s.module}:{s.where} has width {flat.shape[-1]}, expected {self.rows.shape[-1]}")
        dst = self.rows[:, s.point, s.layer]
        if dst.is_contiguous() and dst.dtype == flat.dtype:  # one site, same dtype: gather straight into the rows
            torch.index_select(flat, 0, self.index, out=dst)
        else:
            dst.copy_(flat.index_select(0, self.index))
        self._done.add(i)
        if len(self._done) == len(self.plan.sites):
            raise _Stop

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], index: torch.Tensor,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows [len(index), n_points, n_layers, width] at flat positions `index` of the batch."""
        if out is None:
            out = torch.empty((len(index), *self.plan.full), dtype=self.dtype, device=input_ids.device)
        self.rows, self.index, self._done = out, index, set()
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Stop:
            pass
        finally:
            self.rows, self.index = None, None
        if len(self._done) != len(self.plan.sites):
            missing = [f"{s.module}:{s.where}" for i, s in enumerate(self.plan.sites) if i not in self._done]
            raise RuntimeError(f"the forward never reached {missing}")
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def compile_blocks(model: torch.nn.Module, plan: Plan) -> int:
    """torch.compile the forward of every block that holds no capture site inside it (hooks on the
    block itself stay outside the compiled code, so resid_pre/resid_post and early stopping still
    work). Compilation happens lazily on the first forward. Returns the number of blocks compiled."""
    import torch._dynamo

    n_blocks = int(model.config.num_hidden_layers)
    path = blocks_path(model, n_blocks)
    if path is None:
        return 0
    cfg = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):  # one compiled entry per block instance
        if hasattr(cfg, limit):
            setattr(cfg, limit, max(getattr(cfg, limit), 2 * n_blocks + 8))
    modules = dict(model.named_modules())
    compiled = 0
    for i in range(n_blocks):
        name = f"{path}.{i}" if path else str(i)
        if any(s.module.startswith(name + ".") for s in plan.sites):
            continue
        block = modules[name]
        block.forward = torch.compile(block.forward, dynamic=False)
        compiled += 1
    return compiled


class OutlierFilter:
    """Drops rows with a vector whose norm exceeds `factor` x the running median norm of its site."""

    def __init__(self, factor: float):
        self.factor, self.median = factor, None

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """bool [k]: rows to keep. rows: [k, n_points, n_layers, width]."""
        norms = rows.float().norm(dim=-1)  # [k, P, L]
        if len(rows) == 0:
            return torch.ones(0, dtype=torch.bool)
        med = norms.median(dim=0).values
        self.median = med if self.median is None else (1 - OUTLIER_MEMORY) * self.median + OUTLIER_MEMORY * med
        return (norms <= self.factor * self.median).flatten(1).all(dim=1)


# -- the source -----------------------------------------------------------------------------------------
class ModelSource:
    """Endless (rows, origin, info) items from a model over a text corpus on one device.

    rows: CPU tensor [k, *sample_shape] in buffer.dtype; valid until the next item is requested.
    origin: int64 [k], the context each row comes from: (index << 40) | context counter.
    info: {"contexts": contexts in this item, "tokens": tokens forwarded for it, "corpus_passes": passes so far}.
    The model and tokenizer load in the constructor; iterating starts the pipeline threads.
    """

    QUEUE_DEPTH = 3  # token batches waiting for a forward; finished items waiting for the consumer

    def __init__(self, cfg: Config, device: str, index: int = 0, loop: bool = True):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # keep the cores for the forward
        g = cfg.generator
        self.cfg, self.index, self.loop = cfg, index, loop
        self.device = torch.device(device if cfg.model.device in ("auto", "", None) else cfg.model.device)
        t0 = time.perf_counter()
        self.tokenizer = load_tokenizer(cfg)
        self.model = load_model(cfg, str(self.device))
        self.plan = make_plan(cfg, self.model, self.model.config)
        check_buffer(cfg, self.plan)
        self.dtype = TORCH_DTYPES[cfg.buffer.dtype]
        if g.compile:
            compile_blocks(self.model, self.plan)
        self.capture = Capture(self.model, self.plan, self.dtype)
        self.special_ids = set(self.tokenizer.all_special_ids)
        self.outliers = OutlierFilter(g.outlier_factor) if g.outlier_factor else None
        self.contexts = 0
        log.info("model %s on %s (%s) loaded in %.1f s; rows %s %s from %d sites", cfg.model.name, self.device,
                 cfg.model.dtype, time.perf_counter() - t0, list(self.plan.shape), cfg.buffer.dtype,
                 len(self.plan.sites))

    def blocks(self):
        from .text import TokenBlocks

        g = self.cfg.generator
        return TokenBlocks(self.cfg.dataset, self.tokenizer, g.context_length, g.batch_size, loop=self.loop)

    def keep(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        g = self.cfg.generator
        return keep_mask(input_ids, attention_mask, self.special_ids, g.drop_bos, g.drop_special)

    # Stage 1 (thread): text -> (input ids, mask, kept flat positions, origin ids) on the host.
    def _prepare(self) -> Iterator[tuple]:
        pin = self.device.type == "cuda"
        for b in self.blocks():
            keep = self.keep(b.input_ids, b.attention_mask)
            flat = keep.view(-1).nonzero().squeeze(1)
            n, T = b.input_ids.shape
            ctx = (self.index << 40) | (self.contexts + np.arange(n, dtype=np.int64))
            self.contexts += n
            origin = ctx[(flat // T).numpy()]
            mask = None if bool(b.attention_mask.all()) else b.attention_mask  # None: plain causal attention
            tensors = [b.input_ids, mask, flat]
            if pin:
                tensors = [t.pin_memory() if t is not None else None for t in tensors]
            tokens = int(b.attention_mask.sum())
            yield (*tensors, origin, {"contexts": n, "tokens": tokens, "corpus_passes": b.corpus_passes})

    # Stage 2 (thread): forward -> rows on the host.
    def _forward(self, item, staging: Optional[torch.Tensor]):
        ids, mask, flat, origin, info = item
        dev = self.device
        rows = self.capture(ids.to(dev, non_blocking=True),
                            None if mask is None else mask.to(dev, non_blocking=True),
                            flat.to(dev, non_blocking=True))
        event = None
        if staging is not None:  # CUDA: copy to pinned memory on a side stream; the next forward overlaps it
            host = staging[:len(rows)]
            self._copy_stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(self._copy_stream):
                host.copy_(rows, non_blocking=True)
                rows.record_stream(self._copy_stream)  # not reused by the allocator before the copy ends
                event = torch.cuda.Event()
                event.record(self._copy_stream)
            rows = host
        return rows, origin, info, event

    def _finish(self, rows: torch.Tensor, origin: np.ndarray, info: dict):
        if self.outliers is not None and len(rows):
            ok = self.outliers(rows)
            if not bool(ok.all()):
                rows, origin = rows[ok], origin[ok.numpy()]
        return rows.reshape(len(rows), *self.plan.shape), origin, info

    def __iter__(self):
        if self.device.type != "cuda":
            return self._iter_inline()
        return self._iter_threaded()

    def _iter_inline(self):
        """Not CUDA: prepare -> forward -> finish in the consumer's own thread. A CPU forward keeps every
        core busy with its intra-op threads; tokenising and writing a batch take milliseconds against a
        forward of ~0.5 s, so overlapping them gains nothing, while extra busy Python threads preempt the
        forward's OpenMP workers (which spin at their barriers) and slow every forward down."""
        for item in self._prepare():
            rows, origin, info, _ = self._forward(item, None)
            yield self._finish(rows, origin, info)

    def _iter_threaded(self):
        stop = threading.Event()
        prepared: queue.Queue = queue.Queue(self.QUEUE_DEPTH)
        done: queue.Queue = queue.Queue(self.QUEUE_DEPTH)
        cuda = self.device.type == "cuda"
        g = self.cfg.generator
        pool: queue.Queue = queue.Queue()
        if cuda:  # one staging buffer per item that can be in flight, plus the one the consumer holds
            for _ in range(self.QUEUE_DEPTH + 2):
                pool.put(torch.empty((g.batch_size * g.context_length, *self.plan.full), dtype=self.dtype,
                                     pin_memory=True))

        def put(q, item):
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def run_prepare():
            try:
                for item in self._prepare():
                    if not put(prepared, item):
                        return
                put(prepared, None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                put(prepared, e)

        def run_forward():
            try:
                if cuda:
                    torch.cuda.set_device(self.device)
                    self._copy_stream = torch.cuda.Stream(self.device)
                pending = None  # CUDA: the item whose copy is in flight while the next forward runs
                while not stop.is_set():
                    try:
                        item = prepared.get(timeout=0.1)
                    except queue.Empty:
                        continue
                    if item is None or isinstance(item, BaseException):
                        if pending is not None:
                            pending[3].synchronize()
                            put(done, (pending[:3], pending[4]))
                        put(done, item)
                        return
                    staging = pool.get() if cuda else None
                    result = self._forward(item, staging)
                    if not cuda:
                        put(done, (result[:3], None))
                        continue
                    if pending is not None:
                        pending[3].synchronize()
                        put(done, (pending[:3], pending[4]))
                    pending = (*result, staging)
            except BaseException as e:  # noqa: BLE001
                put(done, e)

        threads = [threading.Thread(target=run_prepare, name="actdata-tokenize", daemon=True),
                   threading.Thread(target=run_forward, name="actdata-forward", daemon=True)]
        for t in threads:
            t.start()
        try:
            while True:
                item = done.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                (rows, origin, info), staging = item
                yield self._finish(rows, origin, info)
                if staging is not None:
                    pool.put(staging)  # the consumer is done with these rows
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=10)
