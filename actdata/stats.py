"""Running statistics of generated rows, per capture point (site x layer), mergeable across generators.

What it keeps, per point p of a row `[*points, width]` (a squeezed row `[width]` is one point):

    count          rows seen (the same for every point)
    mean   f64 [P, width]   running mean per dimension
    m2     f64 [P, width]   running sum of squared deviations per dimension (variance = m2 / count)
    sq_norm_sum  f64 [P]    sum of squared L2 norms        (mean squared norm = sq_norm_sum / count)
    norm_sum     f64 [P]    sum of L2 norms                (mean norm = norm_sum / count)

A batch is reduced on its own where its rows are (`reduce_rows`: on their device, in float32 chunks shifted
by the mean of the batch's first rows, so no float64 copy of the rows is ever made) into `Moments`, a few
`[points, width]` sums; `RunningStats.add` turns them into float64 mean and M2 and folds them in with Chan
et al.'s pairwise update, so the result does not depend on how rows were batched, and two generators'
statistics merge exactly the same way.
`scaling_factor` gives the usual "normalise activations" constant: sqrt(width / mean squared norm), the
factor that makes the mean squared norm of scaled rows equal to the row width.
"""
from __future__ import annotations

import math
import threading
from typing import NamedTuple, Optional

import numpy as np
import torch

CPU_CHUNK_BYTES = 512 << 10  # one float32 chunk and its square stay in the core's cache (measured best)
GPU_CHUNK_BYTES = 64 << 20  # fewer, larger steps (fewer launches) in bounded device memory
SHIFT_ROWS = 16  # the batch's first rows whose mean every row is shifted by (near the mean is enough)


class Moments(NamedTuple):
    """One batch reduced where its rows are: sums of the rows shifted by `shift` (near their mean, so the
    float32 sums lose no digits to cancellation) and of their norms. Small: [points, width] at most."""

    count: int
    shift: torch.Tensor  # f32 [P, W]
    s1: torch.Tensor  # f64 [P, W]: sum of (x - shift)
    s2: torch.Tensor  # f64 [P, W]: sum of (x - shift)^2
    sq_norm_sum: torch.Tensor  # f64 [P]: sum of |x|^2
    norm_sum: torch.Tensor  # f64 [P]: sum of |x|

    def to(self, device, non_blocking: bool = False) -> "Moments":
        """The same sums on `device` (to the CPU with non_blocking: pinned, valid once the stream is synced)."""
        return Moments(self.count, *(t.to(device, non_blocking=non_blocking) for t in self[1:]))


def _chunk_rows(dev: torch.device, row_values: int) -> int:
    """Rows per step: a float32 chunk of the device's chunk bytes (its square beside it)."""
    return max(1, (GPU_CHUNK_BYTES if dev.type == "cuda" else CPU_CHUNK_BYTES) // (4 * row_values))


_workspace = threading.local()  # per thread: the CPU's reused chunk buffers (fresh ones page-fault every batch)


def _buffers(dev: torch.device, c: int, P: int, W: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ones [1, c], y and q [c, P, W] float32 on `dev`; on the CPU the calling thread's, kept for its next batch."""
    key = (str(dev), c, P, W)
    if dev.type == "cpu" and getattr(_workspace, "key", None) == key:
        return _workspace.bufs
    bufs = (torch.ones(1, c, dtype=torch.float32, device=dev), torch.empty(c, P, W, dtype=torch.float32, device=dev),
            torch.empty(c, P, W, dtype=torch.float32, device=dev))
    if dev.type == "cpu":
        _workspace.key, _workspace.bufs = key, bufs
    return bufs


def reduce_rows(rows: torch.Tensor, points: int, width: int, chunk: Optional[int] = None) -> Moments:
    """The Moments of rows [k, ...] (k*points*width values, any float dtype) on their own device."""
    k, P, W = len(rows), points, width
    dev = rows.device
    x = rows.reshape(k, P, W)
    shift = x[:SHIFT_ROWS].to(torch.float32).mean(dim=0) if k else torch.zeros(P, W, device=dev)
    s1 = torch.zeros(1, P * W, dtype=torch.float32, device=dev)  # one chunk's sums, in float32
    s2 = torch.zeros(1, P * W, dtype=torch.float32, device=dev)
    t1 = torch.zeros(P * W, dtype=torch.float64, device=dev)  # the batch's, in float64
    t2 = torch.zeros(P * W, dtype=torch.float64, device=dev)
    yy = torch.empty(k, P, dtype=torch.float32, device=dev)  # |x - shift|^2 per row and point
    dots = torch.empty(P, k, 1, dtype=torch.float32, device=dev)  # (x - shift) . shift
    c = min(chunk or _chunk_rows(dev, P * W), max(k, 1))
    ones, y_buf, q_buf = _buffers(dev, c, P, W)
    for i in range(0, k, c):
        n = min(c, k - i)
        y, q = y_buf[:n], q_buf[:n]
        torch.sub(x[i:i + n], shift, out=y)  # converted to float32 and shifted in one pass
        torch.mul(y, y, out=q)
        torch.mm(ones[:, :n], y.view(n, P * W), out=s1)  # column sums through the BLAS
        torch.mm(ones[:, :n], q.view(n, P * W), out=s2)
        t1 += s1[0]
        t2 += s2[0]
        torch.sum(q, dim=-1, out=yy[i:i + n])
        torch.bmm(y.transpose(0, 1), shift.unsqueeze(-1), out=dots[:, i:i + n])
    # |x|^2 = |y|^2 + 2 y.shift + |shift|^2, per row and point, finished once per batch in float64
    r = (yy.to(torch.float64) + 2 * dots.squeeze(-1).t() + (shift * shift).sum(dim=-1)).clamp_(min=0)
    return Moments(k, shift, t1.view(P, W), t2.view(P, W), r.sum(dim=0), r.sqrt().sum(dim=0))


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
        """Fold in rows [k, *sample_shape] (any float dtype, on any device)."""
        self.add(reduce_rows(rows, self.points, self.width))

    def add(self, m: Moments) -> None:
        """Fold in one batch's Moments (on the CPU): mean and M2 in float64 from the shifted sums."""
        n = int(m.count)
        if n == 0:
            return
        f64 = lambda t: t.detach().cpu().numpy().astype(np.float64).reshape(self.points, -1)
        s1, s2 = f64(m.s1), f64(m.s2)
        mean = f64(m.shift) + s1 / n
        m2 = np.maximum(s2 - s1 * s1 / n, 0.0)
        self._fold(n, mean, m2, f64(m.sq_norm_sum).reshape(-1), f64(m.norm_sum).reshape(-1))

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
