"""ModelSource: text -> token blocks -> forward with capture hooks -> rows on the host, on one device.

Pipeline. On CUDA: a thread tokenises and packs text into a small queue; a second
thread runs the forwards and puts finished rows into another small queue; the consumer (the buffer
write) reads them. So tokenisation and buffer writes overlap the next forward. Rows go device -> host
through host staging buffers (pinned on CUDA) with non-blocking copies on a side stream, waited for with
blocking events (the waiting thread sleeps instead of spinning a core); a staging buffer is reused only
after the consumer has asked for the next item, so the rows of an item stay valid until then. On the CPU the
same three steps run one after the other in the consumer's thread: the forward's intra-op threads
already use every core, the other steps take milliseconds per batch, and threads competing with the
forward's OpenMP workers cost more than the overlap would gain. `threaded=True` forces the threaded
pipeline on the CPU (staging buffers in ordinary memory, copies synchronous): the same queues, pool and
stop handling, testable without a GPU.

Filtering on the device. Positions are chosen before the forward (BOS, special tokens: on the host, as
flat indices); rows with an outlier norm (`generator.outlier_factor`) and, for a float16 buffer fed by a
wider model dtype, rows that overflowed float16 (|x| > 65504 becomes inf) are dropped on the device, so
only kept rows are copied to the host. Dropped overflow rows are counted in `info["rows_overflowed"]`.

Stopping. Every wait of the pipeline threads (queues, the staging pool) is a short timed wait that
gives up once the pipeline is stopped; closing the iterator stops and joins both threads (at most
JOIN_S seconds in all) and puts every staging buffer back in the pool, on every path (normal end,
error, close while the consumer is blocked on a full buffer). `close()` frees the model.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Iterator, NamedTuple, Optional, Union

import numpy as np
import torch

from ..config import Config
from ..wire import DTYPES as TORCH_DTYPES
from .loading import load_config, load_model, load_tokenizer, meta_model
from .placement import bind, check_fits, describe_dtype, estimate, max_rows, resolve_dtype
from .sites import (
    Capture,
    OutlierFilter,
    blocks_needed,
    check_buffer,
    check_model,
    compile_blocks,
    finite_rows,
    keep_mask,
    make_plan,
)
from .source import BatchInfo, RowBatch
from .text import TokenBlocks, check_corpus

log = logging.getLogger(__name__)
_STOPPED = object()  # what a wait returns once the pipeline is stopped


class _HostEvent:
    """The stand-in for a CUDA copy event when the threaded pipeline runs on the CPU: copies are
    synchronous there, so the copy is complete when the event exists."""

    def synchronize(self) -> None:
        pass


class Prepared(NamedTuple):
    """Stage 1's output: one batch of token blocks on the host (pinned on CUDA), ready for the forward."""

    input_ids: torch.Tensor  # int64 [batch, context_length]
    mask: Optional[torch.Tensor]  # the attention mask; None when every position attends (plain causal)
    flat: torch.Tensor  # int64 [k]: the flat positions whose rows are kept
    origin: np.ndarray  # int64 [k]: the context id of each kept position
    info: BatchInfo


class Forwarded(NamedTuple):
    """Stage 2's output: the rows kept by the device filter, on the host."""

    rows: torch.Tensor  # [k', n_points, n_layers, width]; in a staging buffer, valid once `event` completed
    origin: np.ndarray  # as Prepared.origin, before `kept` is applied
    info: BatchInfo  # Prepared.info plus rows_overflowed
    event: Optional[Union[torch.cuda.Event, _HostEvent]]  # the copy to staging (None: no staging)
    kept: Optional[np.ndarray]  # host bool mask over `origin`; None when every row was kept


class Staged(NamedTuple):
    """A forward's result with the staging buffer holding its rows (back to the pool once consumed)."""

    result: Forwarded
    staging: torch.Tensor


class ModelSource:
    """Endless `RowBatch`es (generation.source) from a model over a text corpus on one device.

    rows are in buffer.dtype and valid until the next batch is requested; origin = (g << 40) | context
    counter; info has contexts, tokens, corpus_passes, rows_overflowed, position (generation.text),
    next_context and, with generator.provenance, provenance (doc_ids = origin).
    `index` is the generator's global number g of `count` = G: it reads only its share of the corpus
    (generation.text); `count=None` reads the whole corpus (index then only numbers the context ids). `start` = a
    saved state {"position", "next_context"} to continue from.
    The model and tokenizer load in the constructor (only the blocks up to the last captured one); iterating
    starts the pipeline threads (CUDA, or `threaded=True`). `close()` frees the model.
    """

    QUEUE_DEPTH = 3  # token batches waiting for a forward; finished items waiting for the consumer
    STAGING = QUEUE_DEPTH + 2  # staging buffers: one per item that can be in flight, plus the consumer's
    JOIN_S = 1.0  # closing the iterator waits at most this long for the pipeline threads
    POLL_S = 0.05  # every wait of a pipeline thread re-checks `stop` this often

    def __init__(self, cfg: Config, device: str, index: int = 0, loop: bool = True, count: Optional[int] = None,
                 start: Optional[dict] = None, threaded: Optional[bool] = None):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # keep the cores for the forward
        g = cfg.generator
        self.cfg, self.index, self.loop, self.count = cfg, index, loop, count
        self.start_position = (start or {}).get("position")
        self.provenance = bool(g.provenance)
        torch.manual_seed((g.seed * 1_000_003 + index) % (1 << 63))  # the generator's randomness, if any
        # the current device of this thread before anything touches CUDA (no context on GPU 0 by accident)
        self.device = bind(device if cfg.model.device in ("auto", "", None) else cfg.model.device)
        self.threaded = self.device.type == "cuda" if threaded is None else bool(threaded)
        self.model_dtype = resolve_dtype(cfg.model.dtype, self.device)
        self.dtype = TORCH_DTYPES[cfg.buffer.dtype]
        t0 = time.perf_counter()
        hf_config = load_config(cfg)
        check_model(cfg, hf_config)
        meta = meta_model(hf_config, cfg.model.trust_remote_code)
        plan = make_plan(cfg, meta, hf_config)
        check_buffer(cfg, plan)
        n_blocks = blocks_needed(plan, meta, int(hf_config.num_hidden_layers))
        self.memory = estimate(cfg, hf_config, meta, n_blocks, int(np.prod(plan.full)), self.model_dtype,
                               self.STAGING if self.threaded else 0)
        del meta
        check_fits(self.memory, self.device)  # before loading anything: a config that cannot fit fails here
        precision = describe_dtype(self.model_dtype, self.device)
        check_corpus(cfg.dataset, index if count else 0, count or 1)  # a bad dataset fails before the model loads
        self.tokenizer = load_tokenizer(cfg)
        self.model = load_model(cfg, str(self.device), self.model_dtype, n_blocks)
        self.plan = make_plan(cfg, self.model, self.model.config)
        if g.compile:
            compile_blocks(self.model, self.plan)
        self.capture = Capture(self.model, self.plan, self.dtype)
        self.special_ids = set(self.tokenizer.all_special_ids)
        self.outliers = OutlierFilter(g.outlier_factor) if g.outlier_factor else None
        # a float16 buffer fed by a wider dtype overflows above 65504: such rows are dropped and counted
        self.check_overflow = self.dtype == torch.float16 and self.model_dtype != "float16"
        self.max_rows = max_rows(cfg)
        self.contexts = int((start or {}).get("next_context", 0))
        self.pipeline: dict = {}  # the last threaded pipeline: threads, staging buffers (for tests, stats)
        kept = "all" if n_blocks is None else f"{n_blocks} of {hf_config.num_hidden_layers}"
        log.info("model %s on %s (%s) loaded in %.1f s, %s blocks; rows %s %s from %d sites", cfg.model.name,
                 self.device, precision, time.perf_counter() - t0, kept, list(self.plan.shape), cfg.buffer.dtype,
                 len(self.plan.sites))
        log.info("%s", self.memory.line())

    def blocks(self):
        g = self.cfg.generator
        return TokenBlocks(self.cfg.dataset, self.tokenizer, g.context_length, g.batch_size, loop=self.loop,
                           g=self.index if self.count else 0, G=self.count or 1, start=self.start_position)

    def keep(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        g = self.cfg.generator
        return keep_mask(input_ids, attention_mask, self.special_ids, g.drop_bos, g.drop_special)

    # Stage 1 (thread): text -> token ids, mask, kept flat positions and origin ids on the host.
    def _prepare(self) -> Iterator[Prepared]:
        pin = self.device.type == "cuda"
        for b in self.blocks():
            keep = self.keep(b.input_ids, b.attention_mask)
            flat = keep.view(-1).nonzero().squeeze(1)
            n, T = b.input_ids.shape
            ctx = (self.index << 40) | (self.contexts + np.arange(n, dtype=np.int64))
            self.contexts += n
            origin = ctx[(flat // T).numpy()]
            info: BatchInfo = {"contexts": n, "tokens": int(b.attention_mask.sum()), "corpus_passes": b.corpus_passes,
                               "position": b.position, "next_context": self.contexts}
            if self.provenance:
                info["provenance"] = {"token_ids": b.input_ids.view(-1)[flat].numpy().astype(np.int32),
                                      "positions": (flat % T).numpy().astype(np.int32), "doc_ids": origin}
            mask = None if bool(b.attention_mask.all()) else b.attention_mask  # None: plain causal attention
            ids = b.input_ids
            if pin:
                ids, flat = ids.pin_memory(), flat.pin_memory()
                mask = None if mask is None else mask.pin_memory()
            yield Prepared(ids, mask, flat, origin, info)

    # Stage 2 (thread): forward -> filter on the device -> kept rows to the host.
    def _forward(self, item: Prepared, staging: Optional[torch.Tensor]) -> Forwarded:
        """The kept rows of `item` on the host: in `staging` when given (valid once the result's event
        has completed), else as a new CPU tensor."""
        dev = self.device
        rows = self.capture(item.input_ids.to(dev, non_blocking=True),
                            None if item.mask is None else item.mask.to(dev, non_blocking=True),
                            item.flat.to(dev, non_blocking=True))
        rows, kept, overflowed = self._filter(rows)
        info = {**item.info, "rows_overflowed": overflowed}
        event = None
        if staging is not None:
            host = staging[:len(rows)]
            if dev.type == "cuda":  # copy on a side stream: the next forward overlaps it
                self._copy_stream.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(self._copy_stream):
                    host.copy_(rows, non_blocking=True)
                    rows.record_stream(self._copy_stream)  # not reused by the allocator before the copy ends
                    event = torch.cuda.Event(blocking=True)  # a waiting thread sleeps, it does not spin
                    event.record(self._copy_stream)
            else:  # the threaded pipeline forced on the CPU: the same staging, copied at once
                host.copy_(rows)
                event = _HostEvent()
            rows = host
        elif rows.device.type != "cpu":
            rows = rows.cpu()
        return Forwarded(rows, item.origin, info, event, kept)

    def _filter(self, rows: torch.Tensor):
        """Drop, on the rows' device, float16 overflow rows and outlier rows; only the kept rows remain.
        Returns (rows, kept: host bool mask over the input rows or None when all are kept, rows dropped
        for overflow). The decision costs one small device->host copy (the masks): the host needs the
        count of kept rows to copy exactly those."""
        if len(rows) == 0 or not (self.check_overflow or self.outliers is not None):
            return rows, None, 0
        finite = finite_rows(rows) if self.check_overflow else None
        ok = finite
        if self.outliers is not None:  # an inf/nan row has no finite norm: it fails this test too
            out = self.outliers(rows)
            ok = out if ok is None else ok & out
        masks = (torch.stack([ok, finite]) if finite is not None else ok[None]).cpu().numpy()
        kept = masks[0]
        overflowed = int(len(kept) - masks[1].sum()) if finite is not None else 0
        if kept.all():
            return rows, None, overflowed
        return rows[ok], kept, overflowed

    # Stage 3 (the consumer's thread): rows in the row shape, with what belongs to them.
    def _finish(self, out: Forwarded) -> RowBatch:
        origin, info = out.origin, out.info
        if out.kept is not None:  # rows were filtered on the device; filter what belongs to them the same way
            origin = origin[out.kept]
            if "provenance" in info:
                info = {**info, "provenance": {k: v[out.kept] for k, v in info["provenance"].items()}}
        return RowBatch(out.rows.reshape(len(out.rows), *self.plan.shape), origin, info)

    def __iter__(self) -> Iterator[RowBatch]:
        if not self.threaded:
            return self._iter_inline()
        return self._iter_threaded()

    def _iter_inline(self) -> Iterator[RowBatch]:
        """Not CUDA: prepare -> forward -> finish in the consumer's own thread. A CPU forward keeps every
        core busy with its intra-op threads and the other steps are short beside it, so overlapping them
        gains nothing, while extra busy Python threads preempt the forward's OpenMP workers (which spin at
        their barriers) and slow every forward down."""
        for item in self._prepare():
            yield self._finish(self._forward(item, None))

    def _staging(self) -> torch.Tensor:
        """One staging buffer: the most rows a batch can keep (every position but each context's BOS),
        in the buffer dtype; pinned on CUDA."""
        return torch.empty((self.max_rows, *self.plan.full), dtype=self.dtype,
                           pin_memory=self.device.type == "cuda")

    def _iter_threaded(self) -> Iterator[RowBatch]:
        pipe = _Pipeline(self)
        self.pipeline = {"threads": pipe.threads, "pool": pipe.pool, "staging": self.STAGING}
        pipe.start()
        try:
            for staged in pipe.results():
                try:
                    yield self._finish(staged.result)
                finally:
                    pipe.pool.put(staged.staging)  # the consumer is done with these rows (or gone)
        finally:
            pipe.close()

    def close(self) -> None:
        """Free the model and everything that refers to it (hooks, compiled blocks, staging buffers)."""
        if getattr(self, "capture", None) is not None:
            self.capture.remove()
        self.capture = self.model = self.outliers = None
        self.pipeline = {}
        self.__dict__.pop("_copy_stream", None)


class _Pipeline:
    """One run of the threaded pipeline (see the module docstring): the tokenize and forward threads,
    the queues between them and the consumer, and the pool of staging buffers."""

    def __init__(self, src: ModelSource):
        self.src = src
        self.stop = threading.Event()
        self.prepared: queue.Queue = queue.Queue(src.QUEUE_DEPTH)  # Prepared, then None or an exception
        self.done: queue.Queue = queue.Queue(src.QUEUE_DEPTH)  # Staged, then None or an exception
        self.pool: queue.Queue = queue.Queue()
        for _ in range(src.STAGING):
            self.pool.put(src._staging())
        self.threads = [threading.Thread(target=self._run_tokenize, name="actdata-tokenize", daemon=True),
                        threading.Thread(target=self._run_forward, name="actdata-forward", daemon=True)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _put(self, q: queue.Queue, item) -> bool:
        """Put `item` in `q`, waiting while it is full; False when the pipeline stopped first."""
        while not self.stop.is_set():
            try:
                q.put(item, timeout=self.src.POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def _get(self, q: queue.Queue):
        """The next item of `q`, waiting while it is empty; _STOPPED when the pipeline stopped first."""
        while not self.stop.is_set():
            try:
                return q.get(timeout=self.src.POLL_S)
            except queue.Empty:
                pass
        return _STOPPED

    def _run_tokenize(self) -> None:
        try:
            bind(self.src.device)  # pinned allocations use this thread's current device
            for item in self.src._prepare():
                if not self._put(self.prepared, item):
                    return
            self._put(self.prepared, None)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(self.prepared, e)

    def _run_forward(self) -> None:
        src, held = self.src, []  # what this thread owns: the result whose copy is in flight, the new one
        try:
            bind(src.device)
            if src.device.type == "cuda":
                src._copy_stream = torch.cuda.Stream(src.device)
            while True:
                item = self._get(self.prepared)
                if item is _STOPPED:
                    return
                if item is None or isinstance(item, BaseException):  # the end, or stage 1 failed: pass it on last
                    while held:
                        if not self._hand_over(held):
                            return
                    self._put(self.done, item)
                    return
                staging = self._get(self.pool)
                if staging is _STOPPED:
                    return
                try:
                    held.append(Staged(src._forward(item, staging), staging))
                except BaseException:
                    self.pool.put(staging)
                    raise
                if len(held) == 2 and not self._hand_over(held):  # the previous copy ran beside this forward
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(self.done, e)
        finally:
            for staged in held:  # stopped: wait for copies in flight, give their buffers back
                staged.result.event.synchronize()
                self.pool.put(staged.staging)

    def _hand_over(self, held: list[Staged]) -> bool:
        """Wait for the oldest held result's copy and pass it to the consumer; False when stopped first."""
        held[0].result.event.synchronize()
        if not self._put(self.done, held[0]):
            return False
        held.pop(0)
        return True

    def results(self) -> Iterator[Staged]:
        """The forward thread's results, in order, until the end; its exception (or stage 1's) is raised."""
        while True:
            try:
                item = self.done.get(timeout=self.src.POLL_S)
            except queue.Empty:  # only the consumer stops the pipeline: wait while the forward lives
                if not self.threads[1].is_alive() and self.done.empty():
                    raise RuntimeError("the forward thread ended without handing over a result")
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop both threads and join them (at most JOIN_S seconds in all); every staging buffer goes back."""
        self.stop.set()
        self._drain()
        deadline = time.monotonic() + self.src.JOIN_S
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._drain()
        alive = [t.name for t in self.threads if t.is_alive()]
        if alive:
            log.error("pipeline threads %s did not stop within %.1f s", alive, self.src.JOIN_S)

    def _drain(self) -> None:
        """Results finished but never consumed: their staging buffers go back to the pool."""
        while True:
            try:
                left = self.done.get_nowait()
            except queue.Empty:
                return
            if isinstance(left, Staged):
                self.pool.put(left.staging)
