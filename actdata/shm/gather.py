"""Copying claimed rows out of the buffer, whole or only some of their points (actdata.points), straight
from the slots into the caller's memory: a selection is one gather of (slot, point) vectors, never a copy
of whole rows followed by a slice, so it moves only the bytes it returns."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .. import points as pts


def gather(data: torch.Tensor, ids: np.ndarray, points: Optional[Sequence[int]] = None,
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows `ids` of `data` [capacity, *sample_shape], or with `points` only those points of each, as
    [k, len(points), width], copied into `out` (made when None; any shape of k x that many values, e.g.
    [k, width] for one point); returns the filled part of `out`."""
    k, idx = len(ids), torch.from_numpy(ids)
    if points is None:
        if out is None:
            out = torch.empty((k, *data.shape[1:]), dtype=data.dtype)
        torch.index_select(data, 0, idx, out=out[:k])
        return out[:k]
    width, n = int(data.shape[-1]), pts.count(tuple(data.shape[1:]))
    sel = torch.as_tensor(list(points), dtype=torch.int64)
    if len(sel) == 0 or int(sel.min()) < 0 or int(sel.max()) >= n:  # else a row's neighbour would be read
        raise ValueError(f"points {list(points)} do not select among the row's {n} points")
    if out is None:
        out = torch.empty((k, len(sel), width), dtype=data.dtype)
    flat = (idx[:, None] * n + sel[None, :]).reshape(-1)  # vector (slot, point) of the [capacity * n, width] view
    torch.index_select(data.view(-1, width), 0, flat, out=out[:k].view(-1, width))
    return out[:k]
