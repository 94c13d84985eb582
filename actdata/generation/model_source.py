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
The host needs the mask to know how many rows to copy, so the decision is made one batch late: a forward
is launched (`_launch`: its masks are computed and copied to the host without waiting), then the next
forward is launched, and only then are the first batch's masks read and its kept rows gathered and
copied (`_complete`). Reading the masks waits only for their own copy, queued before the next forward,
so the device always has a forward queued and the host never waits for one.

Statistics on CUDA. When the generator keeps statistics, a batch's kept rows are reduced on the device
(stats.reduce_rows) before their copy, and only those sums travel with the rows (`info["moments"]`).

Stopping. Every wait of the pipeline threads (queues, the staging pool) is a short timed wait that
gives up once the pipeline is stopped; closing the iterator stops both threads and joins them, waiting as
long as a forward or a compile in progress takes (up to CLOSE_WAIT_S, with a log line each JOIN_S), so a
restarted source never loads its model beside one still in use; every staging buffer goes back to the
pool, on every path (normal end, error, close while the consumer is blocked on a full buffer). `close()`
frees the model.
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
from ..stats import reduce_rows
from ..wire import DTYPES as TORCH_DTYPES
from .loading import load_config, load_model, load_tokenizer, meta_model
from .placement import (
    STAGING_BUFFERS,
    bind,
    check_fits,
    describe_dtype,
    estimate,
    forward_batch,
    max_rows,
    resolve_dtype,
    with_batch,
)
from .progress import statistics_enabled
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


class Launched(NamedTuple):
    """A forward launched, its filter decision not yet read: the rows on the device and their masks on
    their way to the host."""

    item: "Prepared"
    rows: torch.Tensor  # [k, ...] on the device, every row of the batch
    masks: Optional[torch.Tensor]  # bool [1 or 2, k] (kept, finite) on the host once `ready`; None: keep all
    ready: Optional[torch.cuda.Event]  # the masks' copy (None: already on the host)


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
    STAGING = STAGING_BUFFERS  # QUEUE_DEPTH + 2: one per item that can be in flight, plus the consumer's
    JOIN_S = 1.0  # closing the iterator logs every JOIN_S while it waits for a pipeline thread
    CLOSE_WAIT_S = 600.0  # ... and gives up after this long (a forward or compile that never ends)
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
        values, staging = int(np.prod(plan.full)), self.STAGING if self.threaded else 0
        if self.device.type == "cuda" and g.auto_batch:  # enough tokens per forward to keep the GPU busy
            def fit(b: int, c=cfg, m=meta) -> int:
                return estimate(with_batch(c, b), hf_config, m, n_blocks, values, self.model_dtype, staging).device

            cfg = with_batch(cfg, forward_batch(cfg, fit, torch.cuda.mem_get_info(self.device)[0]))
            g, self.cfg = cfg.generator, cfg
        self.memory = estimate(cfg, hf_config, meta, n_blocks, values, self.model_dtype, staging)
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
        self.points = int(np.prod(self.plan.shape[:-1])) if len(self.plan.shape) > 1 else 1
        self.device_stats = self.device.type == "cuda" and statistics_enabled(cfg)
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

    # Stage 2 (thread): forward -> filter on the device -> kept rows to the host, one batch late.
    def _forward(self, item: Prepared, staging: Optional[torch.Tensor]) -> Forwarded:
        """`_launch` then `_complete` at once (the CPU path, and tests)."""
        return self._complete(self._launch(item), staging)

    def _launch(self, item: Prepared) -> Launched:
        """Queue the forward of `item` and its filter masks' copy to the host; nothing waits for the device."""
        dev = self.device
        rows = self.capture(item.input_ids.to(dev, non_blocking=True),
                            None if item.mask is None else item.mask.to(dev, non_blocking=True),
                            item.flat.to(dev, non_blocking=True))
        if len(rows) == 0 or not (self.check_overflow or self.outliers is not None):
            return Launched(item, rows, None, None)
        finite = finite_rows(rows) if self.check_overflow else None
        ok = finite
        if self.outliers is not None:  # an inf/nan row has no finite norm: it fails this test too
            out = self.outliers(rows)
            ok = out if ok is None else ok & out
        masks = torch.stack([ok, finite]) if finite is not None else ok[None]
        if dev.type != "cuda":
            return Launched(item, rows, masks, None)
        masks = masks.to("cpu", non_blocking=True)  # into pinned memory, read after the next launch
        ready = torch.cuda.Event(blocking=True)
        ready.record(torch.cuda.current_stream(dev))
        return Launched(item, rows, masks, ready)

    def _complete(self, launched: Launched, staging: Optional[torch.Tensor]) -> Forwarded:
        """The kept rows of a launched forward on the host: in `staging` when given (valid once the
        result's event has completed), else as a new CPU tensor."""
        dev, item = self.device, launched.item
        rows, kept, overflowed = self._filter(launched)
        info = {**item.info, "rows_overflowed": overflowed}
        if self.device_stats:  # reduced where the rows are; only the sums travel with them
            info["moments"] = reduce_rows(rows, self.points, self.plan.shape[-1])
        event = None
        if staging is not None:
            host = staging[:len(rows)]
            if dev.type == "cuda":  # copy on a side stream: the next forward overlaps it
                self._copy_stream.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(self._copy_stream):
                    host.copy_(rows, non_blocking=True)
                    rows.record_stream(self._copy_stream)  # not reused by the allocator before the copy ends
                    if "moments" in info:
                        info["moments"] = info["moments"].to("cpu", non_blocking=True)
                    event = torch.cuda.Event(blocking=True)  # a waiting thread sleeps, it does not spin
                    event.record(self._copy_stream)
            else:  # the threaded pipeline forced on the CPU: the same staging, copied at once
                host.copy_(rows)
                event = _HostEvent()
            rows = host
        elif rows.device.type != "cpu":
            rows = rows.cpu()
            if "moments" in info:
                info["moments"] = info["moments"].to("cpu")
        return Forwarded(rows, item.origin, info, event, kept)

    def _filter(self, launched: Launched):
        """Drop float16 overflow rows and outlier rows on the rows' device, by the launched masks (read
        on the host now, one batch after they were queued). Returns (rows, kept: host bool mask over the
        input rows or None when all are kept, rows dropped for overflow)."""
        rows, masks = launched.rows, launched.masks
        if masks is None:
            return rows, None, 0
        if launched.ready is not None:
            launched.ready.synchronize()  # queued before the next forward: that forward is not waited for
        masks = masks.numpy()
        kept = masks[0]
        overflowed = int(len(kept) - masks[1].sum()) if len(masks) > 1 else 0
        if kept.all():
            return rows, None, overflowed
        index = torch.from_numpy(np.flatnonzero(kept)).to(rows.device, non_blocking=True)
        return rows.index_select(0, index), kept, overflowed

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
        self.pipeline = {"threads": pipe.threads, "pool": pipe.pool, "staging": self.STAGING, "pipe": pipe}
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
        self.token_wait_s = 0.0  # time the forward thread waited for tokens while a forward was queued
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
        """Launch each forward, then complete the one before it (its masks are read one batch late); a
        completed result's copy runs beside the next forward and is handed over after it."""
        src, held, launched = self.src, [], None  # owned here: the launched forward, results whose copy is in flight
        try:
            bind(src.device)
            if src.device.type == "cuda":
                src._copy_stream = torch.cuda.Stream(src.device)
            while True:
                t0 = time.perf_counter()
                item = self._get(self.prepared)
                if launched is not None:  # a forward was queued on the device while this thread waited
                    self.token_wait_s += time.perf_counter() - t0
                if item is _STOPPED:
                    return
                if item is None or isinstance(item, BaseException):  # the end, or stage 1 failed: pass it on last
                    if launched is not None and not self._complete(launched, held):
                        return
                    while held:
                        if not self._hand_over(held):
                            return
                    self._put(self.done, item)
                    return
                nxt = src._launch(item)  # queued before the previous batch's masks are read
                if launched is not None and not self._complete(launched, held):
                    return
                launched = nxt
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(self.done, e)
        finally:
            for staged in held:  # stopped: wait for copies in flight, give their buffers back
                staged.result.event.synchronize()
                self.pool.put(staged.staging)

    def _complete(self, launched: Launched, held: list[Staged]) -> bool:
        """Complete a launched forward into a staging buffer; hand the older result over once two are
        held (its copy ran beside this one's forward). False when the pipeline stopped first."""
        staging = self._get(self.pool)
        if staging is _STOPPED:
            return False
        try:
            held.append(Staged(self.src._complete(launched, staging), staging))
        except BaseException:
            self.pool.put(staging)
            raise
        return len(held) < 2 or self._hand_over(held)

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
        """Stop both threads and join them, as long as a forward in progress takes (up to CLOSE_WAIT_S):
        the model must be free when this returns. Every staging buffer goes back."""
        self.stop.set()
        t0 = time.monotonic()
        for t in self.threads:
            while t.is_alive() and time.monotonic() - t0 < self.src.CLOSE_WAIT_S:
                self._drain()  # a thread blocked on a full queue sees the stop at its next poll
                t.join(self.src.JOIN_S)
                if t.is_alive():
                    log.warning("waiting for pipeline thread %s to finish its step (%.0f s so far)", t.name,
                                time.monotonic() - t0)
        self._drain()
        alive = [t.name for t in self.threads if t.is_alive()]
        if alive:
            log.error("pipeline threads %s did not stop within %.0f s", alive, self.src.CLOSE_WAIT_S)

    def _drain(self) -> None:
        """Results finished but never consumed: their staging buffers go back to the pool."""
        while True:
            try:
                left = self.done.get_nowait()
            except queue.Empty:
                return
            if isinstance(left, Staged):
                self.pool.put(left.staging)
