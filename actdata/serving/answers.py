"""What every route shares: the state of one HTTP process's routes (`RouteContext`), error answers in
one shape (`{"detail": ...}`, documented in OpenAPI as `Error`), and the 422 handler for bad parameters."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Optional

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import Config
from ..generation.status import read_statuses
from ..host import host_identity
from ..shm import BufferSpec, NotReady, SharedActivationBuffer
from .limits import RowLimits, row_limits
from .responses import MemoryBudget, ResponseBodies
from .selection import served_point_names


class Error(BaseModel):
    """Every error answer: one readable line."""

    detail: str


BAD_INPUT = {422: {"model": Error, "description": "A bad query parameter (named in `detail`)"}}
NOT_READY = {503: {"model": Error, "description": "Not enough rows ready yet; retry after `Retry-After` s",
                   "headers": {"Retry-After": {"schema": {"type": "integer"}}}}}


def error(status: int, detail: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


@dataclass
class RouteContext:
    """What the routes of one app share: the buffer, the config, the limits and the response memory."""

    buffer: SharedActivationBuffer
    cfg: Config
    limits: RowLimits
    budget: MemoryBudget
    pool: ResponseBodies
    same_host: dict  # the buffer file a reader on this host may open (actdata.reading.samehost)
    started: float = field(default_factory=time.time)
    points: list = field(default_factory=list)  # names of a row's points (actdata.serving.selection)

    @classmethod
    def create(cls, buffer: SharedActivationBuffer, cfg: Config) -> "RouteContext":
        # the pool keeps up to one request's maximum (half the budget), so an answer at the maximum is
        # not allocated and faulted in anew each time
        spec = buffer.spec
        same_host = {"path": spec.path, "host": host_identity(), "pid": os.getpid(), "nonce": buffer.nonce,
                     "nbytes": spec.nbytes, "data_offset": buffer.data_offset, "capacity": spec.capacity,
                     "sample_shape": list(spec.sample_shape), "dtype": spec.dtype, "min_fill": spec.min_fill,
                     "max_reads": spec.max_reads, "provenance": spec.provenance, "max_groups": spec.max_groups}
        return cls(buffer, cfg, row_limits(cfg, spec), MemoryBudget(cfg.server.response_memory_bytes),
                   ResponseBodies(keep_bytes=cfg.server.response_memory_bytes // 2), same_host,
                   points=served_point_names(cfg, spec.sample_shape))

    @property
    def spec(self) -> BufferSpec:
        return self.buffer.spec

    @property
    def retry(self) -> dict:
        return {"Retry-After": str(self.cfg.server.retry_after_s)}

    def busy(self, nbytes: int) -> JSONResponse:
        return error(503, f"server busy: {nbytes:,} more bytes of responses would exceed this process's "
                          f"server.response_memory_bytes={self.cfg.server.response_memory_bytes:,}; retry",
                     self.retry)

    def not_ready(self, e: NotReady) -> JSONResponse:
        gens = read_statuses(self.spec)
        errors = "; ".join(f"generator {g['name']} {g['state']}: {g.get('last_error')}" for g in gens
                           if g["state"] in ("failed", "dead", "restarting"))
        return error(503, f"{e}; {errors}" if errors else str(e), self.retry)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "body", "path"))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return error(422, "; ".join(parts) or "invalid request")


async def _not_allowed(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's 405 names only the methods of the first route of the path: name those of every route
    (GET and POST /groups are two routes)."""
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        methods = set()
        for route in request.app.router.routes:
            if getattr(route, "path_regex", None) is not None and route.path_regex.match(request.url.path):
                methods |= set(getattr(route, "methods", None) or ())
        headers["Allow"] = ", ".join(sorted(methods)) or headers.get("Allow", "")
    return error(exc.status_code, str(exc.detail), headers)


def add_error_handler(app) -> None:
    """Bad query parameters answer 422 with one line naming them; a 405 names every method of its path."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _not_allowed)
