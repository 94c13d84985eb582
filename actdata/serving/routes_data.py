"""The data plane: GET /activations/tensor (raw bytes, or with provenance=1 one safetensors body) and
GET /activations (JSON, streamed row by row). Each answer takes its bytes from the process's response
budget first (503 + Retry-After when they do not fit) and builds its body in reusable memory."""
from __future__ import annotations

import json
import math
from typing import Optional

import torch
from fastapi import Query
from fastapi.responses import Response

from .. import points as pts
from .. import wire
from ..shm import GroupRefused, NotReady
from .answers import BAD_INPUT, NOT_READY, RouteContext, error
from .responses import BudgetedResponse, BudgetedStream
from .routes_groups import GROUP_REFUSED, group_query
from .selection import selected

NO_PROVENANCE = ("provenance: this server keeps no provenance; start it with generator.provenance=true "
                 "to ask for provenance=1")


def _provenance_body(ctx: RouteContext, k: int, row_shape: tuple, points: Optional[list[int]],
                     group: Optional[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(memory to lend, a safetensors body over its start) for k rows (of `row_shape`: only `points`
    when given) + provenance, filled in place (see wire.tensors_layout)."""
    buffer, spec = ctx.buffer, ctx.spec
    specs = [(n, t, (k,)) for n, t in wire.PROVENANCE.items()] + [("activations", buffer.data.dtype,
                                                                    (k, *row_shape))]
    prefix, offsets, total = wire.tensors_layout(specs, {"dtype": spec.dtype})
    mem = ctx.pool.get(total)
    body = mem[:total]
    body[:len(prefix)] = torch.frombuffer(bytearray(prefix), dtype=torch.uint8)
    views = wire.tensor_views(body, specs, offsets)
    rows = views.pop("activations")
    buffer.read_provenance(k, out=rows, prov_out=views, group=group, points=points)
    return mem, body


def add_tensor_route(app, ctx: RouteContext) -> None:
    spec, cfg, budget, pool, buffer = ctx.spec, ctx.cfg, ctx.budget, ctx.pool, ctx.buffer
    max_rows, prov_bytes = ctx.limits.max_rows, ctx.limits.prov_bytes
    most = ctx.limits.max_rows_for(spec.row_bytes // pts.count(spec.sample_shape))  # rows of one point
    NumSamples = Query(1, ge=1, le=most, description=f"rows to return (1..{max_rows} whole rows; more of a "
                                                     f"selection of points, up to {most} of one point)")
    Points = _points_query(ctx)
    Provenance = Query(False, description="1 = rows + provenance as one safetensors body" + (
        "" if spec.provenance else " (this server keeps none: start it with generator.provenance=true)"),
                       json_schema_extra=None if spec.provenance else {"enum": [False]})

    @app.get(wire.TENSOR_PATH, summary="Random rows as raw tensor bytes (see X-Tensor-Shape/-Dtype); "
             "with provenance=1 a safetensors body: activations, token_ids, positions, doc_ids",
             response_class=Response,
             responses={200: {"content": {wire.MEDIA_TYPE: {}, wire.SAFETENSORS_MEDIA_TYPE: {}}},
                        **BAD_INPUT, **NOT_READY, **GROUP_REFUSED})
    async def activations_tensor(num_samples: int = NumSamples, provenance: bool = Provenance,
                                 group: Optional[str] = group_query(spec), points: Optional[str] = Points):
        if provenance and not spec.provenance:
            return error(422, NO_PROVENANCE)
        try:
            sel = selected(points, ctx.points)
        except pts.PointsError as e:
            return error(422, str(e))
        row_shape = spec.sample_shape if sel is None else pts.shape(spec.sample_shape, sel)
        row_bytes = wire.row_bytes(row_shape, spec.dtype)
        if sel is not None and num_samples > (limit := ctx.limits.max_rows_for(row_bytes)):
            return error(422, f"num_samples: at most {limit} rows of {len(sel)} point(s) per request")
        if sel is None and num_samples > max_rows:
            return error(422, f"num_samples: at most {max_rows} whole rows per request (more with points=)")
        cost = 2 * num_samples * (row_bytes + (prov_bytes if provenance else 0))
        if not await budget.wait_take(cost, cfg.server.retry_after_s):
            return ctx.busy(cost)
        try:
            with budget.held(cost):
                if provenance:  # one safetensors body: rows and provenance gathered into place
                    t, filled = _provenance_body(ctx, num_samples, row_shape, sel, group)
                    body, media = filled.numpy().data, wire.SAFETENSORS_MEDIA_TYPE
                    headers = {wire.TENSORS_FORMAT: "safetensors", "Content-Encoding": "identity"}
                else:
                    t, out = pool.rows(num_samples, row_shape, buffer.data.dtype)
                    _, rows = buffer.read(num_samples, out=out, group=group, points=sel)
                    (body, headers), media = wire.encode(rows), wire.MEDIA_TYPE
                pool.lend(t, body)
        except NotReady as e:
            return ctx.not_ready(e)
        except GroupRefused as e:
            return error(e.status, str(e))
        # this HTTP process, as index/count (LitServe sets the index on the app before forking each one)
        headers[wire.PROCESS] = f"{getattr(app, 'response_queue_id', 0)}/{cfg.server.workers}"
        return BudgetedResponse(content=body, media_type=media, headers=headers, budget=budget, cost=cost)


def add_json_route(app, ctx: RouteContext) -> None:
    spec, cfg, budget, buffer = ctx.spec, ctx.cfg, ctx.budget, ctx.buffer
    max_rows, max_json = ctx.limits.max_rows, ctx.limits.max_json
    # the JSON route's own maximum is published in the schema; above it a 422 names server.max_json_bytes
    NumSamplesJson = Query(1, ge=1, le=max_rows, description=f"rows to return (1..{max_json})",
                           json_schema_extra={"maximum": max_json})
    Points = _points_query(ctx)

    @app.get(wire.JSON_PATH, summary="Random rows as JSON (slow; for inspection and small clients)",
             description=f"At most {max_json} rows: the JSON text of one answer stays within "
                         f"server.max_json_bytes = {cfg.server.max_json_bytes:,} bytes.",
             responses={**BAD_INPUT, **NOT_READY, **GROUP_REFUSED})
    def activations_json(num_samples: int = NumSamplesJson, group: Optional[str] = group_query(spec),
                         points: Optional[str] = Points):
        prov = None
        try:
            sel = selected(points, ctx.points)
        except pts.PointsError as e:
            return error(422, str(e))
        if num_samples > max_json:
            return error(422, f"num_samples: at most {max_json} rows as JSON (server.max_json_bytes="
                              f"{cfg.server.max_json_bytes:,} bytes of text); use {wire.TENSOR_PATH} for more")
        cost = num_samples * (spec.row_bytes + 4 * math.prod(spec.sample_shape)) + (4 << 20)
        if not budget.take(cost):
            return ctx.busy(cost)
        try:
            with budget.held(cost):
                if spec.provenance:
                    ids, rows, prov = buffer.read_provenance(num_samples, group=group, points=sel)
                else:
                    ids, rows = buffer.read(num_samples, group=group, points=sel)
        except NotReady as e:
            return ctx.not_ready(e)
        except GroupRefused as e:
            return error(e.status, str(e))
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


def _points_query(ctx: RouteContext):
    """The `points` parameter, documented with the names of this server's points."""
    return Query(None, description="only these points of each row, in this order: indices or names, "
                                   "comma-separated; the rows are then [N, points, width] (actdata.points). "
                                   f"This server's rows have {pts.listing(ctx.points)}",
                 json_schema_extra={"pattern": pts.pattern(ctx.points)})  # documents; resolve() checks
