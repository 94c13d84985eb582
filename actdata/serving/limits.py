"""What one request may ask for: rows per tensor answer and per JSON answer."""
from __future__ import annotations

import math

from ..config import Config
from ..shm import BufferSpec

# Longest JSON text of one value (a float32 widened to float64 and printed by repr, e.g.
# "-1.1754943508222875e-38") plus its separator: the JSON route's rows follow from server.max_json_bytes.
JSON_BYTES_PER_VALUE = 25


def json_max_rows(cfg: Config, spec: BufferSpec) -> int:
    """Rows whose JSON text fits `server.max_json_bytes`."""
    return max(1, cfg.server.max_json_bytes // (math.prod(spec.sample_shape) * JSON_BYTES_PER_VALUE + 64))


