"""Model loading: a Hugging Face id, a local directory or the embedded SmolLM2 -> config, tokenizer and
the base model (no LM head) in `model.dtype` on a device, in eval mode without gradients.

`load_model(..., n_blocks=n)` loads only the first n transformer blocks (a config with
`num_hidden_layers=n`; the checkpoint's later blocks are skipped, never allocated): used when every
capture site lies in those blocks, so the blocks the early stop skips take no memory either. Block i's
output is unchanged (it depends on blocks 0..i only), so resid_post@L is still exactly
hidden_states[L+1] of the full model.

`meta_model` builds the same module tree without weights, so the main process can plan capture sites and
check the config against the model before anything is allocated (and without touching CUDA).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

from ..config import Config, ConfigError
from ..wire import DTYPES as TORCH_DTYPES


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


def truncated_config(hf_config, n_blocks: int):
    """A copy of `hf_config` with only the first `n_blocks` blocks (per-block lists cut to match)."""
    old = int(hf_config.num_hidden_layers)
    out = copy.deepcopy(hf_config)
    for key, value in list(vars(out).items()):
        if isinstance(value, (list, tuple)) and len(value) == old and key not in ("architectures",):
            setattr(out, key, type(value)(value[:n_blocks]))
    out.num_hidden_layers = n_blocks
    return out


def load_model(cfg: Config, device: str, dtype: Optional[str] = None,
               n_blocks: Optional[int] = None) -> torch.nn.Module:
    """The base model (no LM head) in `dtype` (default: `model.dtype`, `auto` resolved for `device`) on
    `device`, in eval mode, without gradients; only its first `n_blocks` blocks when given."""
    from transformers import AutoModel

    from .placement import resolve_dtype

    m = cfg.model
    dtype = dtype or resolve_dtype(m.dtype, device)
    kw = dict(dtype=TORCH_DTYPES[dtype], revision=m.revision, trust_remote_code=m.trust_remote_code)
    if n_blocks is not None:
        hf_config = load_config(cfg)
        if n_blocks < int(hf_config.num_hidden_layers):
            kw["config"] = truncated_config(hf_config, n_blocks)
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
