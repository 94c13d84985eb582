"""The LitServe server: generators in LitServe's device workers, the data plane on plain routes.

- `GeneratorWorker` (a LitAPI): LitServe starts one per device; its `setup(device)` starts the
  generation loop (actdata.generator) in a background thread, so there is one generator per GPU (or one
  on the CPU) for free. LitServe's request path to it is not exposed: nothing needs to cross it.
- The data plane: GET routes added to LitServe's FastAPI app. They run in every HTTP process (LitServe
  forks `server.workers` of them on one port), each reading the shared buffer directly: a request never
  crosses a process boundary, is never pickled, JSON-encoded or gzipped on the tensor route.

Routes: GET / (health), GET /stats, GET /activations (JSON), GET /activations/tensor (raw bytes, see
actdata.wire; with `provenance=1` a safetensors body of rows + provenance), GET /statistics (running
statistics of the rows generated, merged over generators; JSON or `format=safetensors`), POST /refresh,
GET /metrics (Prometheus).
"""
from __future__ import annotations

import asyncio
import faulthandler
import json
import logging
import math
import os
import signal
import threading
import time
import weakref
from typing import Optional

import litserve as ls
import torch
from fastapi import Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.middleware.gzip import GZipMiddleware

from .. import __version__, wire
from ..auth import CHALLENGE, WRONG_KEY, authorized
from ..host import host_identity, pid_alive
from ..shm import BufferSpec, NotReady, SharedActivationBuffer, sidefiles
from .httpguard import Counters
from ..shm.sidefiles import read_json
from ..config import Config
from ..generation.loop import read_statistics, read_statuses, run_supervised, statistics_enabled
from .metrics import MetricsMiddleware, ServingMetrics
from .metrics import render as render_metrics

log = logging.getLogger(__name__)
STOP_GRACE_S = 0.5  # a generator worker told to stop leaves after at most this long (see GeneratorWorker.setup)


class GeneratorWorker(ls.LitAPI):
    """LitServe's device worker, used for what needs a device: it runs one generator."""

    def __init__(self, cfg: Config, spec: BufferSpec, local_generators: int = 1):
        super().__init__(api_path="/generator")
        self.cfg, self.buffer_spec, self.local_generators = cfg, spec, local_generators

    def setup(self, device: str) -> None:
        from .procs import setup_logging, die_with_parent

        die_with_parent()
        setup_logging(self.cfg.log_level, self.cfg.server.log_file)
        self._stop = threading.Event()
        local = int(os.environ.get("LITSERVE_WORKER_ID", "0"))
        s = self.cfg.server  # the global numbering: generator g of G across every node
        index, count = s.node_rank * self.local_generators + local, s.num_nodes * self.local_generators
        device = str(device)
        if self.cfg.model.device not in ("auto", "", None):
            device = self.cfg.model.device  # config validation allows this only with server.devices=1
        if device.startswith("cuda"):  # this worker's GPU is the current device before anything touches CUDA
            torch.cuda.set_device(device)
        name = f"{device.replace(':', '')}-w{index}"
        try:  # a fatal signal (SIGBUS, SIGSEGV) leaves its traceback where the supervisor reads it
            self._crash_file = open(sidefiles.generator_crash(self.buffer_spec.path, name), "w")
            faulthandler.enable(file=self._crash_file)
        except OSError:
            pass

        def generate():  # the current device is per thread: bind the generator's thread too
            if device.startswith("cuda"):
                torch.cuda.set_device(device)
            try:
                run_supervised(self.cfg, self.buffer_spec, device, index, self._stop, count=count)
            except BaseException:  # logged and published by run_supervised: let the supervisor restart us
                os._exit(3)

        self._thread = threading.Thread(target=generate, name="actdata-generator", daemon=True)
        self._thread.start()

        # SIGTERM: stop the loop (it flushes the store's open shard and saves the statistics), then leave
        # within STOP_GRACE_S even if it has not finished: the handler runs once this process's main
        # thread gets the interpreter back. Nothing is lost by leaving early: slots it was writing are
        # reclaimed by the server (or removed with the buffer on a stop) and the corpus position was saved
        # before each batch. Ctrl-C reaches the whole process group: the server stops its workers itself.
        def _exit(signum, frame):
            self._stop.set()
            self._thread.join(timeout=STOP_GRACE_S)
            os._exit(0)

        signal.signal(signal.SIGTERM, _exit)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        log.info("generator worker %d (generator %d of %d) started on %s (pid %d)", local, index, count, device,
                 os.getpid())

    def predict(self, x):  # LitAPI's request path is unused: the data plane reads the buffer directly
        raise NotImplementedError


class _ResponseBodies:
    """Reusable response memory for one HTTP process, as uint8 tensors that both tensor answers (rows, and
    the safetensors body with provenance) are built in. A fresh 12 MB body per request costs ~1 ms of page
    faults (a 75 MB one, ~30 ms). A tensor is lent out with the body made from it, and reused only once
    nothing refers to that body any more: the transport may still be sending it after the response has
    'completed', so this is tracked with a weak reference to the exported array, not with a callback. At
    most `keep` tensors and `keep_bytes` bytes are retained (by default one request's maximum); larger or
    older ones are left to be freed."""

    def __init__(self, keep: int = 8, keep_bytes: int = 64 << 20):
        self.keep, self.keep_bytes = keep, keep_bytes
        self.lent: list[tuple[torch.Tensor, weakref.ref]] = []

    def get(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of at least nbytes (the smallest free one, else a new one of nbytes)."""
        free = [i for i, (t, ref) in enumerate(self.lent) if ref() is None and t.numel() >= nbytes]
        if free:
            return self.lent.pop(min(free, key=lambda i: self.lent[i][0].numel()))[0]
        return torch.empty(nbytes, dtype=torch.uint8)

    def rows(self, k: int, sample_shape: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(memory to lend, a [k, *sample_shape] tensor of dtype over its start)."""
        nbytes = k * math.prod(sample_shape) * dtype.itemsize
        t = self.get(nbytes)
        return t, t[:nbytes].view(dtype).view(k, *sample_shape)

    def lend(self, t: torch.Tensor, body: memoryview) -> None:
        """`t` is in use for as long as `body` (or any view of its array) is alive."""
        if t.nbytes > self.keep_bytes:  # too big to keep: freed with its last view
            return
        try:
            self.lent.append((t, weakref.ref(body.obj)))
        except TypeError:  # an empty body (no array behind it): nothing to track
            return
        while len(self.lent) > self.keep or sum(x.nbytes for x, _ in self.lent) > self.keep_bytes:
            self.lent.pop(0)  # forget the oldest: it is freed when its last view goes

    def retained_bytes(self) -> int:
        return sum(t.nbytes for t, _ in self.lent)


class _MemoryBudget:
    """Bytes of response memory one HTTP process holds at once (bodies being built or sent). A request
    takes its share before it reads rows and gives it back when its response is done (sent, or aborted
    by the send timeout); a request that does not fit gets 503 + Retry-After instead of memory. The tensor
    route first waits for it, up to the Retry-After it would send (`wait_take`): a request at the
    per-request maximum takes the whole budget while it is sent, so a second one to the same process
    would otherwise stall its client for a full Retry-After where a few tens of ms suffice."""

    def __init__(self, limit: int):
        self.limit, self.used, self._lock = int(limit), 0, threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    async def wait_take(self, n: int, wait_s: float) -> bool:
        """take(n), polling while the event loop sends the answers holding the budget, for up to wait_s."""
        deadline, pause = time.monotonic() + wait_s, 0.001
        while not self.take(n):
            if n > self.limit or time.monotonic() + pause > deadline:
                return False
            await asyncio.sleep(pause)
            pause = min(0.02, pause * 2)
        return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n
            idle = self.used == 0
        if idle and n >= 8 << 20:
            _trim_heap()


def _trim_heap() -> None:
    """Hand freed heap back to the kernel (glibc malloc_trim) once no response is in flight. The JSON
    route's Python objects are made in the thread pool's per-thread malloc arenas, which otherwise keep
    their pages after a flood (+163 MB per process measured in R7)."""
    global _LIBC
    try:
        if _LIBC is None:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        _LIBC = False


_LIBC = None


class _BudgetedResponse(Response):
    """A Response that gives its bytes back to the budget once sent (or once sending failed). The body
    goes out in chunks of `CHUNK` bytes: uvicorn copies what the socket does not take at once into the
    transport's buffer and returns, and waits for the client only before the next write, so a single
    write let a client that never reads pin a full copy of the body after the response had 'completed'
    (20 such clients: +1.2 GB in one process, with the budget already given back). In chunks, at most
    one chunk is copied, and the response completes only when the client has taken the rest (or the
    send timeout has aborted the connection)."""

    CHUNK = 4 << 20

    def __init__(self, *a, budget: _MemoryBudget, cost: int, **kw):
        super().__init__(*a, **kw)
        self._budget, self._cost = budget, cost

    async def __call__(self, scope, receive, send):
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            body = memoryview(self.body).cast("B") if len(self.body) else memoryview(b"")
            for i in range(0, max(len(body), 1), self.CHUNK):
                last = i + self.CHUNK >= len(body)
                await send({"type": "http.response.body", "body": body[i:i + self.CHUNK], "more_body": not last})
        finally:
            cost, self._cost = self._cost, 0
            self._budget.give(cost)
            self.body = b""


# Longest JSON text of one value (a float32 widened to float64 and printed by repr, e.g.
# "-1.1754943508222875e-38") plus its separator: the JSON route's rows follow from server.max_json_bytes.
JSON_BYTES_PER_VALUE = 25


def json_max_rows(cfg: Config, spec: BufferSpec) -> int:
    """Rows whose JSON text fits `server.max_json_bytes`."""
    return max(1, cfg.server.max_json_bytes // (math.prod(spec.sample_shape) * JSON_BYTES_PER_VALUE + 64))


class _BudgetedStream(StreamingResponse):
    """A StreamingResponse that gives its bytes back to the budget once done (or aborted)."""

    def __init__(self, *a, budget: _MemoryBudget, cost: int, **kw):
        super().__init__(*a, **kw)
        self._budget, self._cost = budget, cost

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            cost, self._cost = self._cost, 0
            self._budget.give(cost)


class Error(BaseModel):
    """Every error answer: one readable line."""

    detail: str


_BAD_INPUT = {422: {"model": Error, "description": "A bad query parameter (named in `detail`)"}}
_NOT_READY = {503: {"model": Error, "description": "Not enough rows ready yet; retry after `Retry-After` s",
                    "headers": {"Retry-After": {"schema": {"type": "integer"}}}}}


def _error(status: int, detail: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def add_routes(app, buffer: SharedActivationBuffer, cfg: Config) -> None:
    """The data plane and control routes, on LitServe's FastAPI app (before it is run)."""
    spec = buffer.spec
    budget = _MemoryBudget(cfg.server.response_memory_bytes)
    # a tensor response costs its rows twice while sent (the body, and the transport's copy of what the
    # socket has not taken yet), so one request may use at most half of the budget; with provenance a row
    # brings its doc id, token id and position too, also at the published maximum
    prov_bytes = sum(t.itemsize for t in wire.PROVENANCE.values())
    row_cost = spec.row_bytes + (prov_bytes if spec.provenance else 0)
    max_rows = max(1, min(cfg.server.max_samples_per_request, spec.capacity,
                          cfg.server.max_bytes_per_request // spec.row_bytes,
                          cfg.server.response_memory_bytes // (2 * row_cost)))
    max_json = min(max_rows, json_max_rows(cfg, spec))
    # keeps up to one request's maximum (half the budget; a body above a smaller cap was allocated and
    # faulted in anew for every request: CLT rows, 75 MB bodies, spent 4x the kernel time of their send)
    pool = _ResponseBodies(keep_bytes=cfg.server.response_memory_bytes // 2)
    started = time.time()
    retry = {"Retry-After": str(cfg.server.retry_after_s)}
    same_host = {"path": spec.path, "host": host_identity(), "pid": os.getpid(), "nonce": buffer.nonce,
                 "nbytes": spec.nbytes, "data_offset": buffer.data_offset, "capacity": spec.capacity,
                 "sample_shape": list(spec.sample_shape), "dtype": spec.dtype, "min_fill": spec.min_fill,
                 "max_reads": spec.max_reads}
    NumSamples = Query(1, ge=1, le=max_rows, description=f"rows to return (1..{max_rows})")
    # the JSON route's own maximum is published in the schema; above it a 422 names server.max_json_bytes
    NumSamplesJson = Query(1, ge=1, le=max_rows, description=f"rows to return (1..{max_json})",
                           json_schema_extra={"maximum": max_json})
    Provenance = Query(False, description="1 = rows + provenance as one safetensors body" + (
        "" if spec.provenance else " (this server keeps none: start it with generator.provenance=true)"),
                       json_schema_extra=None if spec.provenance else {"enum": [False]})

    def busy(nbytes: int) -> JSONResponse:
        return _error(503, f"server busy: {nbytes:,} more bytes of responses would exceed this process's "
                           f"server.response_memory_bytes={cfg.server.response_memory_bytes:,}; retry", retry)

    def not_ready(e: NotReady) -> JSONResponse:
        gens = read_statuses(spec)
        errors = "; ".join(f"generator {g['name']} {g['state']}: {g.get('last_error')}" for g in gens
                           if g["state"] in ("failed", "dead", "restarting"))
        return _error(503, f"{e}; {errors}" if errors else str(e), retry)

    def health_status(st: dict, gens: list[dict], http: dict) -> str:
        states = {g["state"] for g in gens}
        if gens and states <= {"failed", "dead", "stopped", "crashed"} and not st["serving"]:
            return "failed"
        if not st["serving"]:
            return "filling"
        if states & {"failed", "dead", "restarting", "paused", "crashed"} or http["alive"] < http["configured"]:
            return "degraded"
        return "ok"

    def http_processes() -> dict:
        """The HTTP processes as the main process's supervisor last published them (pids checked live)."""
        info = read_json(sidefiles.http_processes(spec.path)) or {}
        pids = info.get("pids") or []
        alive = sum(pid_alive(p) for p in pids) if pids else cfg.server.workers
        return {"configured": cfg.server.workers, "alive": alive, "pids": pids,
                "restarts": info.get("restarts", 0), "last_death": info.get("last_death")}

    @app.get("/", summary="Health and status")
    def health(request: Request):
        st, gens, http = buffer.stats(), read_statuses(spec), http_processes()
        status = health_status(st, gens, http)
        trusted = request.scope.get("actdata.authenticated", True)  # error texts only for key holders
        keys = ("name", "device", "state", "last_error") if trusted else ("name", "device", "state")
        return {"status": status, "serving": st["serving"], "fill": st["fill"], "ready": st["ready"],
                "capacity": st["capacity"], "sample_shape": st["sample_shape"], "dtype": st["dtype"],
                "generators": [{k: g.get(k) for k in keys} for g in gens],
                "http_workers": {"configured": http["configured"], "alive": http["alive"]},
                "version": __version__}

    @app.get("/stats", summary="Buffer, generator and serving statistics")
    def stats():
        st = buffer.stats()
        st["generators"] = read_statuses(spec)
        http = http_processes()
        st["server"] = {"pid": os.getpid(), "http_workers": http["alive"], "http_workers_configured": http["configured"],
                        "http_pids": http["pids"], "http_restarts": http["restarts"],
                        "http_last_death": http["last_death"], "uptime_s": time.time() - started,
                        "max_samples_per_request": max_rows, "max_samples_json": max_json,
                        "bytes_per_s_out": st["reads_per_s"] * st["row_bytes"],
                        "response_memory": {"budget": budget.limit, "used": budget.used,
                                            "pool_retained": pool.retained_bytes()},
                        "refused": Counters.as_dict(),
                        "same_host": same_host}  # actdata.local: the buffer file a reader on this host may open
        return st

    no_provenance = ("provenance: this server keeps no provenance; start it with generator.provenance=true "
                     "to ask for provenance=1")

    def provenance_body(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(memory to lend, a safetensors body over its start) for k rows + provenance, filled in place
        (see wire.tensors_layout)."""
        specs = [(n, t, (k,)) for n, t in wire.PROVENANCE.items()] + [("activations", buffer.data.dtype,
                                                                        (k, *spec.sample_shape))]
        prefix, offsets, total = wire.tensors_layout(specs, {"dtype": spec.dtype})
        mem = pool.get(total)
        body = mem[:total]
        body[:len(prefix)] = torch.frombuffer(bytearray(prefix), dtype=torch.uint8)
        views = wire.tensor_views(body, specs, offsets)
        rows = views.pop("activations")
        buffer.read_provenance(k, out=rows, prov_out=views)
        return mem, body

    @app.get(wire.TENSOR_PATH, summary="Random rows as raw tensor bytes (see X-Tensor-Shape/-Dtype); "
             "with provenance=1 a safetensors body: activations, token_ids, positions, doc_ids",
             response_class=Response,
             responses={200: {"content": {wire.MEDIA_TYPE: {}, wire.SAFETENSORS_MEDIA_TYPE: {}}},
                        **_BAD_INPUT, **_NOT_READY})
    async def activations_tensor(num_samples: int = NumSamples, provenance: bool = Provenance):
        if provenance and not spec.provenance:
            return _error(422, no_provenance)
        cost = 2 * num_samples * (spec.row_bytes + (prov_bytes if provenance else 0))
        if not await budget.wait_take(cost, cfg.server.retry_after_s):
            return busy(cost)
        try:
            if provenance:  # one safetensors body: rows and provenance gathered into place
                t, filled = provenance_body(num_samples)
                body, media = filled.numpy().data, wire.SAFETENSORS_MEDIA_TYPE
                headers = {wire.TENSORS_FORMAT: "safetensors", "Content-Encoding": "identity"}
                pool.lend(t, body)
            else:
                t, out = pool.rows(num_samples, spec.sample_shape, buffer.data.dtype)
                _, rows = buffer.read(num_samples, out=out)
                (body, headers), media = wire.encode(rows), wire.MEDIA_TYPE
                pool.lend(t, body)
        except NotReady as e:
            budget.give(cost)
            return not_ready(e)
        except BaseException:
            budget.give(cost)
            raise
        # this HTTP process, as index/count (LitServe sets the index on the app before forking each one)
        headers[wire.PROCESS] = f"{getattr(app, 'response_queue_id', 0)}/{cfg.server.workers}"
        return _BudgetedResponse(content=body, media_type=media, headers=headers, budget=budget, cost=cost)

    @app.get(wire.JSON_PATH, summary="Random rows as JSON (slow; for inspection and small clients)",
             description=f"At most {max_json} rows: the JSON text of one answer stays within "
                         f"server.max_json_bytes = {cfg.server.max_json_bytes:,} bytes.",
             responses={**_BAD_INPUT, **_NOT_READY})
    def activations_json(num_samples: int = NumSamplesJson):
        prov = None
        if num_samples > max_json:
            return _error(422, f"num_samples: at most {max_json} rows as JSON (server.max_json_bytes="
                               f"{cfg.server.max_json_bytes:,} bytes of text); use {wire.TENSOR_PATH} for more")
        cost = num_samples * (spec.row_bytes + 4 * math.prod(spec.sample_shape)) + (4 << 20)
        if not budget.take(cost):
            return busy(cost)
        try:
            if spec.provenance:
                ids, rows, prov = buffer.read_provenance(num_samples)
            else:
                ids, rows = buffer.read(num_samples)
        except NotReady as e:
            budget.give(cost)
            return not_ready(e)
        except BaseException:
            budget.give(cost)
            raise
        meta = {"shape": list(rows.shape), "dtype": spec.dtype, "num_samples": len(ids), "indices": ids.tolist(),
                "buffer_stats": buffer.stats()}
        if prov is not None:  # generator.provenance=true: token id, position and context id of each row
            meta.update({k: prov[k].tolist() for k in ("token_ids", "positions", "doc_ids")})
        tail = json.dumps(meta)

        def text():  # row by row: the JSON text is never held whole (uvicorn waits for the client per chunk)
            yield b'{"activations": ['
            for i in range(0, len(rows), 8):  # few Python floats alive at once: they fragment the heap
                part = json.dumps(rows[i:i + 8].float().tolist())[1:-1]
                yield (part if i == 0 else ", " + part).encode()
            yield b"], " + tail[1:].encode()

        return _BudgetedStream(text(), media_type="application/json", budget=budget, cost=cost)

    @app.get("/statistics", summary="Running statistics of every row generated, per capture point, merged over "
             "generators (JSON summary; format=safetensors for the per-dimension tensors)",
             responses={200: {"content": {wire.SAFETENSORS_MEDIA_TYPE: {}}}, **_BAD_INPUT})
    def statistics(format: str = Query("json", pattern="^(json|safetensors)$",
                                       description="json (summary) or safetensors (full tensors)")):
        from ..stats import RunningStats, merged

        per = read_statistics(spec)
        total = merged([st for _, st in per]) or RunningStats(spec.sample_shape)
        if format == "safetensors":
            meta = {"sample_shape": ",".join(map(str, total.sample_shape)), "generators": str(len(per)),
                    "enabled": str(statistics_enabled(cfg)).lower()}
            return Response(content=wire.encode_tensors(total.tensors(), meta), media_type=wire.SAFETENSORS_MEDIA_TYPE,
                            headers={wire.TENSORS_FORMAT: "safetensors", "Content-Encoding": "identity"})
        return {**total.summary(), "enabled": statistics_enabled(cfg), "dtype": spec.dtype,
                "generators": [{"name": name, "count": st.count} for name, st in per]}

    @app.post("/refresh", summary="Drop every ready row so that it is regenerated")
    def refresh():
        n = buffer.refresh()
        log.info("refresh: %d ready rows marked for regeneration", n)
        return {"refreshed": n, "status": "ok"}

    async def validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "body", "path"))
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return _error(422, "; ".join(parts) or "invalid request")

    app.add_exception_handler(RequestValidationError, validation_error)


class _Guard:
    """ASGI middleware in front of every route: requests whose headers exceed `max_header_bytes` get 431
    (the HTTP layer, actdata.httpguard, already closes a connection whose head grows past it while being
    read), and when an API key is set, every route but `GET /` needs `Authorization: Bearer <key>` (401;
    compared in constant time). `GET /` is answered to anyone, with error texts only for key holders."""

    def __init__(self, app, key: Optional[str], max_header_bytes: int = 64 << 10):
        self.app, self.max_header_bytes = app, max_header_bytes
        self.key = key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = None
            ok = authorized(dict(scope["headers"]).get(b"authorization"), self.key)
            scope["actdata.authenticated"] = ok
            if sum(len(k) + len(v) for k, v in scope["headers"]) > self.max_header_bytes:
                refusal = JSONResponse({"detail": f"request headers exceed {self.max_header_bytes} bytes"},
                                       status_code=431)
            elif not ok and not (scope["path"] == "/" and scope["method"] in ("GET", "HEAD")):
                refusal = JSONResponse({"detail": WRONG_KEY}, status_code=401, headers=CHALLENGE)
            if refusal is not None:
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)


class ActdataLitServer(ls.LitServer):
    """LitServer that keeps its HTTP processes (`http_workers`, index -> Process) where actdata's
    supervisor (actdata.serve) can see them, and can start a replacement for one that died
    (`restart_http_worker`: the same steps as LitServe's `_start_server` for one process, forked from
    this process onto the same listening socket). LitServe itself does not watch them. Generator
    workers are supervised there too (LitServe's own monitor is turned off)."""

    http_workers: dict = {}

    def _start_server(self, port, num_uvicorn_servers, log_level, sockets, uvicorn_worker_type, **kwargs):
        self._http_args = (port, log_level, sockets, kwargs)
        self.http_workers = super()._start_server(port, num_uvicorn_servers, log_level, sockets,
                                                  uvicorn_worker_type, **kwargs)
        return self.http_workers  # the same dict: LitServe's shutdown terminates replacements too

    def restart_http_worker(self, i: int):
        import copy
        import multiprocessing as mp

        import uvicorn
        from litserve.server import _Server

        port, log_level, sockets, kwargs = self._http_args
        self.app.response_queue_id = i
        for lit_api in self.litapi_connector:
            if lit_api.spec:
                lit_api.spec.response_queue_id = i
        app = copy.copy(self.app)
        self._prepare_app_run(app)
        config = uvicorn.Config(app=app, host="0.0.0.0", port=port, log_level=log_level,
                                timeout_graceful_shutdown=self.uvicorn_graceful_timeout, **kwargs)
        w = mp.get_context("fork").Process(target=_Server(config=config).run, args=(i, sockets), name=f"LitServer-{i}")
        w.start()
        self.http_workers[i] = w
        return w


def build_server(cfg: Config, buffer: SharedActivationBuffer, metrics: ServingMetrics,
                 api_key: Optional[str] = None) -> ls.LitServer:
    """A LitServer with one generator worker per device and the data-plane routes."""
    worker = GeneratorWorker(cfg, buffer.spec)
    server = ActdataLitServer(worker, accelerator=cfg.server.accelerator, devices=cfg.server.devices,
                              workers_per_device=cfg.server.generators_per_device, timeout=30, track_requests=False,
                              restart_workers=True)  # a killed generator worker is started again (actdata.serve)
    worker.local_generators = len(server.devices) * cfg.server.generators_per_device  # before the workers spawn
    server._monitor_workers = False  # actdata.serve supervises generator and HTTP processes, and logs deaths
    server.uvicorn_graceful_timeout = 1  # keep-alive clients must not hold a shutdown
    app = server.app
    # LitServe gzips every response when no API streams; tensor bytes do not compress and JSON is
    # for inspection only, so drop the middleware from the data path entirely.
    app.user_middleware = [m for m in app.user_middleware if m.cls is not GZipMiddleware]
    # GET / (ours) is the health route; LitServe's /health, /info and the LitAPI's POST endpoint are not
    # part of actdata's API (generator status is in /stats), so they are not exposed.
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) not in ("/", "/health", "/info", "/generator")]
    add_routes(app, buffer, cfg)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    def prometheus():
        return PlainTextResponse(render_metrics(buffer, metrics), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_Guard, key=api_key, max_header_bytes=cfg.server.max_header_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts refused requests too
    return server
