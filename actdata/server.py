"""The LitServe server: generators in LitServe's device workers, the data plane on plain routes.

- `GeneratorWorker` (a LitAPI): LitServe starts one per device; its `setup(device)` starts the
  generation loop (actdata.generator) in a background thread, so there is one generator per GPU (or one
  on the CPU) for free. LitServe's request path to it is not exposed: nothing needs to cross it.
- The data plane: GET routes added to LitServe's FastAPI app. They run in every HTTP process (LitServe
  forks `server.workers` of them on one port), each reading the shared buffer directly: a request never
  crosses a process boundary, is never pickled, JSON-encoded or gzipped on the tensor route.

Routes: GET / (health), GET /stats, GET /activations (JSON), GET /activations/tensor (raw bytes, see
actdata.wire), POST /refresh, GET /metrics (Prometheus).
"""
from __future__ import annotations

import logging
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
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.middleware.gzip import GZipMiddleware

from . import __version__, wire
from .buffer import BufferSpec, NotReady, SharedActivationBuffer
from .config import Config
from .generator import read_statuses, run_supervised
from .metrics import MetricsMiddleware, ServingMetrics
from .metrics import render as render_metrics

log = logging.getLogger("actdata.server")


class GeneratorWorker(ls.LitAPI):
    """LitServe's device worker, used for what needs a device: it runs one generator."""

    def __init__(self, cfg: Config, spec: BufferSpec):
        super().__init__(api_path="/generator")
        self.cfg, self.buffer_spec = cfg, spec
        self.local_generators = 1  # set by build_server once LitServe has resolved the devices

    def setup(self, device: str) -> None:
        from .logs import setup_logging, die_with_parent

        die_with_parent()
        setup_logging(self.cfg.log_level, self.cfg.server.log_file)
        self._stop = threading.Event()
        index = int(os.environ.get("LITSERVE_WORKER_ID", "0"))
        self._thread = threading.Thread(target=run_supervised, name="actdata-generator", daemon=True,
                                        args=(self.cfg, self.buffer_spec, str(device), index, self._stop),
                                        kwargs={"local_generators": self.local_generators})
        self._thread.start()

        def _exit(signum, frame):  # stop the loop so it publishes 'stopped', then leave
            self._stop.set()
            self._thread.join(timeout=2.0)
            os._exit(0)

        signal.signal(signal.SIGTERM, _exit)
        signal.signal(signal.SIGINT, _exit)
        log.info("generator worker %d started on %s (pid %d)", index, device, os.getpid())

    def predict(self, x):  # LitAPI's request path is unused: the data plane reads the buffer directly
        raise NotImplementedError


class _ResponseTensors:
    """Reusable response tensors for one HTTP process. A fresh 12 MB tensor per request costs ~1 ms of
    page faults. A tensor is lent out with the body made from it, and reused only once nothing refers to
    that body any more: the transport may still be sending it after the response has 'completed', so
    this is tracked with a weak reference to the exported array, not with a callback."""

    def __init__(self, sample_shape: tuple, dtype: torch.dtype, keep: int = 8):
        self.sample_shape, self.dtype, self.keep = sample_shape, dtype, keep
        self.lent: list[tuple[torch.Tensor, weakref.ref]] = []

    def get(self, k: int) -> torch.Tensor:
        free = [i for i, (t, ref) in enumerate(self.lent) if ref() is None and len(t) >= k]
        if free:
            return self.lent.pop(min(free, key=lambda i: len(self.lent[i][0])))[0]
        return torch.empty((k, *self.sample_shape), dtype=self.dtype)

    def lend(self, t: torch.Tensor, body: memoryview) -> None:
        """`t` is in use for as long as `body` (or any view of its array) is alive."""
        try:
            self.lent.append((t, weakref.ref(body.obj)))
        except TypeError:  # an empty body (no array behind it): nothing to track
            return
        if len(self.lent) > self.keep:  # forget the oldest: it is freed when its last view goes
            self.lent.pop(0)


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
    max_rows = max(1, min(cfg.server.max_samples_per_request, spec.capacity,
                          cfg.server.max_bytes_per_request // spec.row_bytes))
    pool = _ResponseTensors(spec.sample_shape, buffer.data.dtype)
    started = time.time()
    retry = {"Retry-After": str(cfg.server.retry_after_s)}
    NumSamples = Query(1, ge=1, le=max_rows, description=f"rows to return (1..{max_rows})")

    def not_ready(e: NotReady) -> JSONResponse:
        gens = read_statuses(spec)
        errors = "; ".join(f"generator {g['name']} {g['state']}: {g.get('last_error')}" for g in gens
                           if g["state"] in ("failed", "dead", "restarting"))
        return _error(503, f"{e}; {errors}" if errors else str(e), retry)

    def health_status(st: dict, gens: list[dict]) -> str:
        states = {g["state"] for g in gens}
        if gens and states <= {"failed", "dead", "stopped"} and not st["serving"]:
            return "failed"
        if not st["serving"]:
            return "filling"
        if states & {"failed", "dead", "restarting"}:
            return "degraded"
        return "ok"

    @app.get("/", summary="Health and status")
    def health():
        st, gens = buffer.stats(), read_statuses(spec)
        status = health_status(st, gens)
        return {"status": status, "serving": st["serving"], "fill": st["fill"], "ready": st["ready"],
                "capacity": st["capacity"], "sample_shape": st["sample_shape"], "dtype": st["dtype"],
                "generators": [{k: g.get(k) for k in ("name", "device", "state", "last_error")} for g in gens],
                "version": __version__}

    @app.get("/stats", summary="Buffer, generator and serving statistics")
    def stats():
        st = buffer.stats()
        st["generators"] = read_statuses(spec)
        st["server"] = {"pid": os.getpid(), "http_workers": cfg.server.workers, "uptime_s": time.time() - started,
                        "max_samples_per_request": max_rows,
                        "bytes_per_s_out": st["reads_per_s"] * st["row_bytes"]}
        return st

    @app.get(wire.TENSOR_PATH, summary="Random rows as raw tensor bytes (see X-Tensor-Shape/-Dtype)",
             response_class=Response,
             responses={200: {"content": {wire.MEDIA_TYPE: {}}}, **_BAD_INPUT, **_NOT_READY})
    async def activations_tensor(num_samples: int = NumSamples):
        out = pool.get(num_samples)
        try:
            _, rows = buffer.read(num_samples, out=out)
        except NotReady as e:
            return not_ready(e)
        body, headers = wire.encode(rows)
        pool.lend(out, body)
        return Response(content=body, media_type=wire.MEDIA_TYPE, headers=headers)

    @app.get(wire.JSON_PATH, summary="Random rows as JSON (slow; for inspection and small clients)",
             responses={**_BAD_INPUT, **_NOT_READY})
    def activations_json(num_samples: int = NumSamples):
        try:
            ids, rows = buffer.read(num_samples)
        except NotReady as e:
            return not_ready(e)
        return {"activations": rows.float().tolist(), "shape": list(rows.shape), "dtype": spec.dtype,
                "num_samples": len(ids), "indices": ids.tolist(), "buffer_stats": buffer.stats()}

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
    """ASGI middleware in front of every route: requests whose headers exceed `max_header_bytes` get 431,
    and when an API key is set, every route but `GET /` needs `Authorization: Bearer <key>` (401)."""

    def __init__(self, app, key: Optional[str], max_header_bytes: int = 64 << 10):
        self.app, self.max_header_bytes = app, max_header_bytes
        self.expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = None
            if sum(len(k) + len(v) for k, v in scope["headers"]) > self.max_header_bytes:
                refusal = JSONResponse({"detail": f"request headers exceed {self.max_header_bytes} bytes"},
                                       status_code=431)
            elif self.expected and not (scope["path"] == "/" and scope["method"] in ("GET", "HEAD")):
                if dict(scope["headers"]).get(b"authorization", b"") != self.expected:
                    refusal = JSONResponse({"detail": "missing or wrong API key: send 'Authorization: Bearer <key>'"},
                                           status_code=401, headers={"WWW-Authenticate": "Bearer"})
            if refusal is not None:
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)


def build_server(cfg: Config, buffer: SharedActivationBuffer, metrics: ServingMetrics,
                 api_key: Optional[str] = None) -> ls.LitServer:
    """A LitServer with one generator worker per device and the data-plane routes."""
    api = GeneratorWorker(cfg, buffer.spec)
    server = ls.LitServer(api, accelerator=cfg.server.accelerator,
                          devices=cfg.server.devices, workers_per_device=1, timeout=30, track_requests=False,
                          restart_workers=True)  # a killed generator worker is started again
    api.local_generators = max(1, len(server.devices))  # for the global generator numbering
    server.uvicorn_graceful_timeout = 2  # keep-alive clients must not hold a shutdown for 30 s
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

    app.add_middleware(_Guard, key=api_key)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts refused requests too
    return server
