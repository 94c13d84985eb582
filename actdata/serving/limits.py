"""What one request may ask for: rows per tensor answer and per JSON answer, from the config and the buffer."""
from __future__ import annotations

import math
from typing import NamedTuple

from .. import points, wire
from ..config import Config
from ..shm import BufferSpec

# Longest JSON text of one value (a float32 widened to float64 and printed by repr, e.g.
# "-1.1754943508222875e-38") plus its separator: the JSON route's rows follow from server.max_json_bytes.
JSON_BYTES_PER_VALUE = 25


class RowLimits(NamedTuple):
    max_rows: int  # rows of one tensor answer
    max_json: int  # rows of one JSON answer
    prov_bytes: int  # provenance bytes per row (doc id, token id, position)
    request: dict  # what one tensor answer may hold, for rows of any size (actdata.points.rows_per_request)

    def max_rows_for(self, row_bytes: int) -> int:
        """Rows of one tensor answer whose rows (a selection of points) take `row_bytes` each."""
        return points.rows_per_request(self.request, row_bytes)


def json_max_rows(cfg: Config, spec: BufferSpec) -> int:
    """Rows whose JSON text fits `server.max_json_bytes`."""
    return max(1, cfg.server.max_json_bytes // (math.prod(spec.sample_shape) * JSON_BYTES_PER_VALUE + 64))


def row_limits(cfg: Config, spec: BufferSpec) -> RowLimits:
    """The per-request maxima. A tensor answer costs its rows twice while sent (the body, and the
    transport's copy of what the socket has not taken yet), so one request may use at most half of the
    response memory, provenance included when the buffer keeps it."""
    prov_bytes = wire.PROVENANCE_BYTES
    request = {"rows": min(cfg.server.max_samples_per_request, spec.capacity),
               "bytes": cfg.server.max_bytes_per_request, "memory": cfg.server.response_memory_bytes // 2,
               "extra": prov_bytes if spec.provenance else 0}
    max_rows = points.rows_per_request(request, spec.row_bytes)
    return RowLimits(max_rows, min(max_rows, json_max_rows(cfg, spec)), prov_bytes, request)
