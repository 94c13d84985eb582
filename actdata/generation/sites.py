"""Capture sites: where in the model a row's vectors come from, the hooks that take them, and which
token positions are kept.

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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import SITES, Config, ConfigError

# per layout: (attribute names of the attention sublayer, of the MLP)
ATTN_NAMES, MLP_NAMES = ("attn", "self_attn", "attention"), ("mlp", "feed_forward")
OUTLIER_MEMORY = 0.05  # weight of a new batch in the running median norm


class _Stop(Exception):
    """Raised by the last capture hook to end the forward early."""


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
                          f"follows from the model and generator.sites/layers (here {list(plan.shape)}); "
                          "set it to null")
    if b.activation_dim is not None and int(b.activation_dim) != plan.full[2]:
        raise ConfigError(f"buffer.activation_dim: {b.activation_dim} contradicts the model's width "
                          f"{plan.full[2]} for generator.sites={list(cfg.generator.sites)}; set it to null or "
                          f"{plan.full[2]}")


def max_positions(hf_config) -> Optional[int]:
    """The longest context the model's position embeddings cover (None when the config does not say)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_model(cfg: Config, hf_config) -> None:
    """Config values the model cannot serve: a context longer than its position embeddings."""
    limit, T = max_positions(hf_config), cfg.generator.context_length
    if limit is not None and T > limit:
        raise ConfigError(f"generator.context_length: {T} exceeds the model's maximum of {limit} positions "
                          f"({cfg.model.name}); set it to {limit} or less")


def blocks_needed(plan: Plan, model: torch.nn.Module, n_blocks: int) -> Optional[int]:
    """How many leading blocks the plan needs (last captured block + 1), or None when a site lies outside
    the blocks (e.g. the final norm) and every block must stay."""
    path = blocks_path(model, n_blocks)
    if path is None:
        return None
    prefix = f"{path}." if path else ""
    last = -1
    for s in plan.sites:
        rest = s.module[len(prefix):] if s.module.startswith(prefix) else ""
        head = rest.split(".", 1)[0]
        if not head.isdigit():
            return None
        last = max(last, int(head))
    return last + 1


def sample_shape(cfg: Config) -> tuple[int, ...]:
    """The row shape for this config, from the model's config alone (no weights, no CUDA).
    Raises ConfigError naming the key when the config contradicts the model."""
    from .loading import load_config, meta_model

    hf_config = load_config(cfg)
    check_model(cfg, hf_config)
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
    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                 index: torch.Tensor) -> torch.Tensor:
        """Rows [len(index), n_points, n_layers, width] at flat positions `index` of the batch."""
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
    """Drops rows with a vector whose norm exceeds `factor` x the running median norm of its site.

    Everything stays on the rows' device (norms, the running median, the mask): nothing is copied to
    the host to decide, and the caller copies only the rows kept."""

    def __init__(self, factor: float):
        self.factor, self.median = factor, None

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """bool [k] on rows' device: rows to keep. rows: [k, n_points, n_layers, width]."""
        if len(rows) == 0:
            return torch.ones(0, dtype=torch.bool, device=rows.device)
        norms = torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32)  # [k, P, L], no float copy of rows
        med = norms.median(dim=0).values
        if self.median is None or self.median.device != med.device:
            self.median = med
        else:
            self.median.mul_(1 - OUTLIER_MEMORY).add_(med, alpha=OUTLIER_MEMORY)
        return (norms <= self.factor * self.median).flatten(1).all(dim=1)


def finite_rows(rows: torch.Tensor) -> torch.Tensor:
    """bool [k] on rows' device: rows without inf/nan (a float16 buffer overflows above 65504)."""
    return torch.isfinite(rows).flatten(1).all(dim=1)
