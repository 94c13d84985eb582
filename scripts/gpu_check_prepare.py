"""Build what the GPU check needs into an ignored folder small enough to carry to a bare device machine.

    python scripts/gpu_check_prepare.py [--out .gpu_check]

A device machine has torch, transformers, tokenizers and safetensors but none of the packages that ship
the embedded model and corpus (and no network), so this writes, once, on a machine that has them:

  corpus/kjv.txt   the embedded corpus (one chapter a paragraph) as plain text, for the tokenizer-only figure
  site/bible/data/kjv.jsonl   the embedded corpus where actdata looks for it (`site` goes on PYTHONPATH)
  tokenizer/       a byte-level BPE tokenizer trained on that corpus with `tokenizers` (BOS, EOS, PAD)
  tiny/            a 4-block Llama-like model with random weights and that tokenizer (a few MB)

The ~1B model of the overlap and end-to-end checks is built on the device from a config (random weights).
Everything here is a few MB; the folder is in .gitignore.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VOCAB = 4096
SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>"]


def tiny_config(vocab: int, bos: int, eos: int, pad: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=True)


def build_tokenizer(corpus_txt: str, out: str):
    """A byte-level BPE of VOCAB tokens trained on the corpus, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([corpus_txt], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[1],
                                   pad_token=SPECIALS[2])
    fast.save_pretrained(out)
    return fast


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, ".gpu_check"))
    a = ap.parse_args()
    import torch

    from actdata.generation.embedded import corpus_path, kjv_chapters

    tmp = a.out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "corpus"))
    os.makedirs(os.path.join(tmp, "site", "bible", "data"))
    shutil.copyfile(corpus_path(), os.path.join(tmp, "site", "bible", "data", "kjv.jsonl"))
    txt = os.path.join(tmp, "corpus", "kjv.txt")
    with open(txt, "w", encoding="utf-8") as f:
        f.write("\n\n".join(kjv_chapters()))
    tok = build_tokenizer(txt, os.path.join(tmp, "tokenizer"))
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    conf = tiny_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    model = LlamaForCausalLM(conf)
    model.save_pretrained(os.path.join(tmp, "tiny"))
    tok.save_pretrained(os.path.join(tmp, "tiny"))
    with open(os.path.join(tmp, "README.json"), "w") as f:
        json.dump({"made_by": "scripts/gpu_check_prepare.py", "vocab": len(tok)}, f)
    shutil.rmtree(a.out, ignore_errors=True)
    os.rename(tmp, a.out)
    size = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(a.out) for n in ns)
    print(f"{a.out}: {size / 1e6:.1f} MB (tokenizer of {len(tok)} tokens, tiny model, corpus)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
