"""ModelSource: text -> token blocks -> forward with capture hooks -> rows on the host, on one device.

Pipeline. On CUDA: a thread tokenises and packs text into a small queue; a second
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
import threading
import time
from typing import Iterator, Optional

import numpy as np
import torch

from .config import Config
from .model import load_model, load_tokenizer
from .sites import Capture, OutlierFilter, check_buffer, compile_blocks, keep_mask, make_plan
from .wire import DTYPES as TORCH_DTYPES

log = logging.getLogger("actdata.pipeline")


class ModelSource:
    """Endless (rows, origin, info) items from a model over a text corpus on one device.

    rows: CPU tensor [k, *sample_shape] in buffer.dtype; valid until the next item is requested.
    origin: int64 [k], the context each row comes from: (g << 40) | context counter, unique across generators.
    info: {"contexts": contexts in this item, "tokens": tokens forwarded for it, "corpus_passes": passes so far,
           "position": the corpus position right after this item (actdata.text), "next_context": the context
           counter after it, and with generator.provenance "provenance": {"token_ids": int32 [k] (the token at
           the row's position), "positions": int32 [k] (0 = BOS), "doc_ids": int64 [k] (= origin)}}.
    `index` is the generator's global number g of `count` = G: it reads only its share of the corpus
    (actdata.text); `count=None` reads the whole corpus (index then only numbers the context ids). `start` = a saved state {"position", "next_context"} to continue from.
    The model and tokenizer load in the constructor; iterating starts the pipeline threads.
    """

    QUEUE_DEPTH = 3  # token batches waiting for a forward; finished items waiting for the consumer

    def __init__(self, cfg: Config, device: str, index: int = 0, loop: bool = True, count: Optional[int] = None,
                 start: Optional[dict] = None):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # keep the cores for the forward
        g = cfg.generator
        self.cfg, self.index, self.loop, self.count = cfg, index, loop, count
        self.start_position = (start or {}).get("position")
        self.provenance = bool(g.provenance)
        torch.manual_seed((g.seed * 1_000_003 + index) % (1 << 63))  # the generator's randomness, if any
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
        self.contexts = int((start or {}).get("next_context", 0))
        log.info("model %s on %s (%s) loaded in %.1f s; rows %s %s from %d sites", cfg.model.name, self.device,
                 cfg.model.dtype, time.perf_counter() - t0, list(self.plan.shape), cfg.buffer.dtype,
                 len(self.plan.sites))

    def blocks(self):
        from .text import TokenBlocks

        g = self.cfg.generator
        return TokenBlocks(self.cfg.dataset, self.tokenizer, g.context_length, g.batch_size, loop=self.loop,
                           g=self.index if self.count else 0, G=self.count or 1, start=self.start_position)

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
            info = {"contexts": n, "tokens": int(b.attention_mask.sum()), "corpus_passes": b.corpus_passes,
                    "position": b.position, "next_context": self.contexts}
            if self.provenance:
                info["provenance"] = {"token_ids": b.input_ids.view(-1)[flat].numpy().astype(np.int32),
                                      "positions": (flat % T).numpy().astype(np.int32), "doc_ids": origin}
            mask = None if bool(b.attention_mask.all()) else b.attention_mask  # None: plain causal attention
            tensors = [b.input_ids, mask, flat]
            if pin:
                tensors = [t.pin_memory() if t is not None else None for t in tensors]
            yield (*tensors, origin, info)

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
                keep = ok.numpy()
                rows, origin = rows[ok], origin[keep]
                if "provenance" in info:
                    info = {**info, "provenance": {k: v[keep] for k, v in info["provenance"].items()}}
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
