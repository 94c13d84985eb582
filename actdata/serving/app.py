"""The LitServe app: the generator worker in LitServe's device workers, the data plane on plain routes.

The routes are added to LitServe's FastAPI app before it runs, so they run in every HTTP process
(LitServe forks `server.workers` of them on one port), each reading the shared buffer directly: a
request never crosses a process boundary, is never pickled, JSON-encoded or gzipped on the tensor route.

Routes: GET / (health), GET /stats, GET /activations/tensor, GET /activations (actdata.serving.routes_data),
GET /statistics, POST /refresh (actdata.serving.routes_status), GET/POST /groups and DELETE /groups/NAME
(actdata.serving.routes_groups), GET /metrics (Prometheus). In front of
them: the header-size and API-key guard (actdata.serving.guard), outermost the request metrics.
"""
from __future__ import annotations

from typing import Optional

from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..config import Config
from ..shm import SharedActivationBuffer
from . import routes_data, routes_groups, routes_status
from .answers import RouteContext, add_error_handler
from .guard import Guard
from .litserve_compat import ActdataLitServer
from .metrics import MetricsMiddleware, ServingMetrics
from .metrics import render as render_metrics
from .worker import STOP_GRACE_S, STORE_FLUSH_S, GeneratorWorker


def add_routes(app, buffer: SharedActivationBuffer, cfg: Config) -> None:
    """The data plane and control routes, on LitServe's FastAPI app (before it is run)."""
    ctx = RouteContext.create(buffer, cfg)
    routes_status.add_health_routes(app, ctx)
    routes_data.add_tensor_route(app, ctx)
    routes_data.add_json_route(app, ctx)
    routes_status.add_control_routes(app, ctx)
    routes_groups.add_group_routes(app, ctx)
    add_error_handler(app)


def build_server(cfg: Config, buffer: SharedActivationBuffer, metrics: ServingMetrics,
                 api_key: Optional[str] = None) -> ActdataLitServer:
    """A LitServer with one generator worker per device and the data-plane routes."""
    worker = GeneratorWorker(cfg, buffer.spec)
    server = ActdataLitServer(worker, accelerator=cfg.server.accelerator, devices=cfg.server.devices,
                              workers_per_device=cfg.server.generators_per_device, timeout=30, track_requests=False,
                              restart_workers=True)  # a killed generator worker is started again (supervisor)
    worker.local_generators = len(server.devices) * cfg.server.generators_per_device  # before the workers spawn
    server.worker_grace_s = STORE_FLUSH_S if cfg.store.write else STOP_GRACE_S
    server.strip_app()
    app = server.app
    add_routes(app, buffer, cfg)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    def prometheus():
        return PlainTextResponse(render_metrics(buffer, metrics), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(Guard, key=api_key, max_header_bytes=cfg.server.max_header_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts refused requests too
    return server
