"""Running statistics of generated rows, per capture point (site x layer), mergeable across generators.

What it keeps, per point p of a row `[*points, width]` (a squeezed row `[width]` is one point):

    count          rows seen (the same for every point)
    mean   f64 [P, width]   running mean per dimension
    m2     f64 [P, width]   running sum of squared deviations per dimension (variance = m2 / count)
    sq_norm_sum  f64 [P]    sum of squared L2 norms        (mean squared norm = sq_norm_sum / count)
    norm_sum     f64 [P]    sum of L2 norms                (mean norm = norm_sum / count)

A batch is reduced on its own (in float64) and folded in with Chan et al.'s pairwise update, so the result
does not depend on how rows were batched, and two generators' statistics merge exactly the same way.
`scaling_factor` gives the usual "normalise activations" constant: sqrt(width / mean squared norm), the
factor that makes the mean squared norm of scaled rows equal to the row width.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch


class RunningStats:
    """Count, per-dimension mean and variance, mean squared norm and mean norm; see the module docstring."""

    def __init__(self, sample_shape: tuple, count: int = 0, mean=None, m2=None, sq_norm_sum=None, norm_sum=None):
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.width = self.sample_shape[-1]
        self.points = math.prod(self.sample_shape[:-1]) if len(self.sample_shape) > 1 else 1
        P, W = self.points, self.width
        self.count = int(count)
        self.mean = np.zeros((P, W)) if mean is None else np.asarray(mean, np.float64).reshape(P, W)
        self.m2 = np.zeros((P, W)) if m2 is None else np.asarray(m2, np.float64).reshape(P, W)
        self.sq_norm_sum = np.zeros(P) if sq_norm_sum is None else np.asarray(sq_norm_sum, np.float64).reshape(P)
        self.norm_sum = np.zeros(P) if norm_sum is None else np.asarray(norm_sum, np.float64).reshape(P)

    def update(self, rows: torch.Tensor) -> None:
        """Fold in rows [k, *sample_shape] (any float dtype, on the CPU)."""
        k = len(rows)
        if k == 0:
            return
        x = rows.reshape(k, self.points, self.width).to(torch.float64)
        var, mean = torch.var_mean(x, dim=0, correction=0)  # one fused pass (half the time of mean, then m2)
        norm = torch.linalg.vector_norm(x, dim=-1)  # [k, P]
        self._fold(k, mean.numpy(), (var * k).numpy(), (norm * norm).sum(dim=0).numpy(), norm.sum(dim=0).numpy())

    def merge(self, other: "RunningStats") -> "RunningStats":
        """Fold another generator's statistics into these (in place); returns self."""
        if other.sample_shape != self.sample_shape:
            raise ValueError(f"cannot merge statistics of rows {list(other.sample_shape)} "
                             f"into {list(self.sample_shape)}")
        if other.count:
            self._fold(other.count, other.mean, other.m2, other.sq_norm_sum, other.norm_sum)
        return self

    def _fold(self, n_b: int, mean_b, m2_b, sq_b, norm_b) -> None:
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta * delta * (n_a * n_b / n)
        self.sq_norm_sum = self.sq_norm_sum + sq_b
        self.norm_sum = self.norm_sum + norm_b
        self.count = n

    # -- derived ----------------------------------------------------------------------------------------
    @property
    def var(self) -> np.ndarray:
        """Population variance per dimension [P, width] (zeros before any row)."""
        return self.m2 / self.count if self.count else np.zeros_like(self.m2)

    @property
    def mean_sq_norm(self) -> np.ndarray:
        return self.sq_norm_sum / self.count if self.count else np.zeros_like(self.sq_norm_sum)

    @property
    def mean_norm(self) -> np.ndarray:
        return self.norm_sum / self.count if self.count else np.zeros_like(self.norm_sum)

    def scaling_factor(self) -> np.ndarray:
        """Per point: sqrt(width / mean squared norm), the factor that makes scaled rows' mean squared norm
        equal to the width (NaN before any row)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.sqrt(self.width / self.mean_sq_norm) if self.count else np.full(self.points, np.nan)

    def summary(self) -> dict:
        """Small JSON-able view: count, and per point the mean squared norm, mean norm, scaling factor and
        the mean over dimensions of the per-dimension mean and variance (None where undefined)."""
        def js(a):
            return [None if not math.isfinite(v) else v for v in np.asarray(a, np.float64).tolist()]

        return {"count": self.count, "sample_shape": list(self.sample_shape), "points": self.points,
                "width": self.width, "mean_sq_norm": js(self.mean_sq_norm),
                "mean_norm": js(self.mean_norm), "scaling_factor": js(self.scaling_factor()),
                "mean_of_mean": js(self.mean.mean(axis=1)), "mean_of_var": js(self.var.mean(axis=1))}

    def tensors(self) -> dict:
        """Everything, as float64 tensors (count as int64 [1]): the state (mean, m2, sq_norm_sum, norm_sum)
        and the derived var [P, width], mean_sq_norm, mean_norm, scaling_factor [P]. For a safetensors file."""
        f = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
        return {"count": torch.tensor([self.count], dtype=torch.int64),
                "sample_shape": torch.tensor(self.sample_shape, dtype=torch.int64),
                "mean": f(self.mean), "m2": f(self.m2), "var": f(self.var), "sq_norm_sum": f(self.sq_norm_sum),
                "norm_sum": f(self.norm_sum), "mean_sq_norm": f(self.mean_sq_norm), "mean_norm": f(self.mean_norm),
                "scaling_factor": f(self.scaling_factor())}

    @classmethod
    def from_tensors(cls, t: dict) -> "RunningStats":
        """Statistics from `tensors()` output (the derived entries are ignored)."""
        return cls(tuple(int(x) for x in t["sample_shape"].tolist()), int(t["count"][0]), t["mean"].numpy(),
                   t["m2"].numpy(), t["sq_norm_sum"].numpy(), t["norm_sum"].numpy())

    # -- persistence --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to rebuild these statistics: numpy arrays and ints (safetensors- or JSON-able)."""
        return {"sample_shape": list(self.sample_shape), "count": self.count, "mean": self.mean, "m2": self.m2,
                "sq_norm_sum": self.sq_norm_sum, "norm_sum": self.norm_sum}

    @classmethod
    def from_state_dict(cls, d: dict, sample_shape: Optional[tuple] = None) -> "RunningStats":
        shape = tuple(d.get("sample_shape") or sample_shape)
        return cls(shape, int(d["count"]), np.asarray(d["mean"]), np.asarray(d["m2"]),
                   np.asarray(d["sq_norm_sum"]), np.asarray(d["norm_sum"]))


def merged(stats: list[RunningStats]) -> Optional[RunningStats]:
    """The merge of several generators' statistics (None for an empty list)."""
    if not stats:
        return None
    out = RunningStats(stats[0].sample_shape)
    for s in stats:
        out.merge(s)
    return out
