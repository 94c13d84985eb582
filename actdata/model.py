"""Model loading: a Hugging Face id, a local directory or the embedded SmolLM2 -> config, tokenizer and
the base model (no LM head) in `model.dtype` on a device, in eval mode without gradients.

`meta_model` builds the same module tree without weights, so the main process can plan capture sites and
check the config against the model before anything is allocated (and without touching CUDA).
"""
from __future__ import annotations

import torch

from .config import Config, ConfigError
from .wire import DTYPES as TORCH_DTYPES

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
