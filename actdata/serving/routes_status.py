"""Status and control routes: GET / (health; the status page for a browser), GET /stats, GET /stats/history
(rows/s in and out and fill over the last minutes), GET /statistics (running statistics of the rows
generated, merged over generators; JSON or safetensors), POST /refresh."""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

from fastapi import Query, Request
from fastapi.responses import Response

from .. import __version__, wire
from ..generation.progress import read_statistics, statistics_enabled
from ..generation.status import read_statuses
from ..host import pid_alive
from ..shm import sidefiles
from ..shm.sidefiles import read_json
from ..stats import RunningStats, merged
from .answers import BAD_INPUT, RouteContext
from .history import read_history
from .httpguard import Counters
from .page import MEDIA_TYPE, page, page_headers, wants_page

log = logging.getLogger(__name__)
_DOWN = {"failed", "dead", "stopped", "crashed"}
_TROUBLE = {"failed", "dead", "restarting", "paused", "crashed"}


def health_status(st: dict, gens: list[dict], http: dict) -> str:
    """failed (every generator down before serving), filling, degraded (a generator or HTTP process down), ok."""
    states = {g["state"] for g in gens}
    if gens and states <= _DOWN and not st["serving"]:
        return "failed"
    if not st["serving"]:
        return "filling"
    if states & _TROUBLE or http["alive"] < http["configured"]:
        return "degraded"
    return "ok"


def http_processes(ctx: RouteContext) -> dict:
    """The HTTP processes as the main process's supervisor last published them (pids checked live)."""
    workers = ctx.cfg.server.workers
    info = read_json(sidefiles.http_processes(ctx.spec.path)) or {}
    pids = info.get("pids") or []
    alive = sum(pid_alive(p) for p in pids) if pids else workers
    return {"configured": workers, "alive": alive, "pids": pids,
            "restarts": info.get("restarts", 0), "last_death": info.get("last_death")}


def add_health_routes(app, ctx: RouteContext) -> None:
    buffer, spec = ctx.buffer, ctx.spec

    @app.get("/", summary="Health and status (JSON; a browser asking for text/html first gets the status page)")
    def health(request: Request):
        if wants_page(request.headers.get("accept")):
            return Response(page(), media_type=MEDIA_TYPE, headers=page_headers())
        st, gens, http = buffer.stats(), read_statuses(spec), http_processes(ctx)
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
        st["points"] = ctx.points  # what ?points= selects by name (actdata.points)
        st["generators"] = read_statuses(spec)
        http = http_processes(ctx)
        st["server"] = {"pid": os.getpid(), "http_workers": http["alive"],
                        "http_workers_configured": http["configured"],
                        "http_pids": http["pids"], "http_restarts": http["restarts"],
                        "http_last_death": http["last_death"], "uptime_s": time.time() - ctx.started,
                        "max_samples_per_request": ctx.limits.max_rows, "max_samples_json": ctx.limits.max_json,
                        "request_limits": ctx.limits.request,
                        "bytes_per_s_out": st["reads_per_s"] * st["row_bytes"],
                        "response_memory": {"budget": ctx.budget.limit, "used": ctx.budget.used,
                                            "pool_retained": ctx.pool.retained_bytes()},
                        "refused": Counters.as_dict(),
                        "same_host": ctx.same_host}
        return st

    @app.get("/stats/history", summary="Rows/s in and out and fill, one sample a second for the last 15 minutes",
             responses=BAD_INPUT)
    def stats_history(since: Optional[float] = Query(None, description="only samples after this unix time")):
        return read_history(spec.path, since)


def add_control_routes(app, ctx: RouteContext) -> None:
    buffer, spec, cfg = ctx.buffer, ctx.spec, ctx.cfg

    @app.get("/statistics", summary="Running statistics of every row generated, per capture point, merged over "
             "generators (JSON summary; format=safetensors for the per-dimension tensors)",
             responses={200: {"content": {wire.SAFETENSORS_MEDIA_TYPE: {}}}, **BAD_INPUT})
    def statistics(format: str = Query("json", pattern="^(json|safetensors)$",
                                       description="json (summary) or safetensors (full tensors)")):
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
