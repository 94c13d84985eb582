"""The LitServe app: the generator worker in LitServe's device workers, the data plane on plain routes.

The data plane is GET routes added to LitServe's FastAPI app. They run in every HTTP process (LitServe
forks `server.workers` of them on one port), each reading the shared buffer directly: a request never
crosses a process boundary, is never pickled, JSON-encoded or gzipped on the tensor route.

Routes: GET / (health), GET /stats, GET /activations (JSON), GET /activations/tensor (raw bytes, see
actdata.wire; with `provenance=1` a safetensors body of rows + provenance), GET /statistics (running
statistics of the rows generated, merged over generators; JSON or `format=safetensors`), POST /refresh,
GET /metrics (Prometheus).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Optional

import litserve as ls
import torch
from fastapi import Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.middleware.gzip import GZipMiddleware

from .. import __version__, wire
from ..host import host_identity, pid_alive
from ..shm import NotReady, SharedActivationBuffer, sidefiles
from .httpguard import Counters
from ..shm.sidefiles import read_json
from ..config import Config
from ..generation.loop import read_statistics, read_statuses, statistics_enabled
from .guard import Guard
from .limits import json_max_rows
from .litserve_compat import ActdataLitServer
from .metrics import MetricsMiddleware, ServingMetrics
from .metrics import render as render_metrics
from .responses import BudgetedResponse, BudgetedStream, MemoryBudget, ResponseBodies
from .worker import GeneratorWorker

log = logging.getLogger(__name__)


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
    budget = MemoryBudget(cfg.server.response_memory_bytes)
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
    pool = ResponseBodies(keep_bytes=cfg.server.response_memory_bytes // 2)
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
        return BudgetedResponse(content=body, media_type=media, headers=headers, budget=budget, cost=cost)

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

        return BudgetedStream(text(), media_type="application/json", budget=budget, cost=cost)

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

    app.add_middleware(Guard, key=api_key, max_header_bytes=cfg.server.max_header_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts refused requests too
    return server
