"""The control API of an actdata server (`ActivationClient`) and its demo, `python -m actdata.client`.

`ActivationClient(url)`: health, stats, waiting for data, JSON and tensor batches, statistics, refresh,
consumer groups (`group=`: every batch is read as that group; `groups()`, `register_group()`, `drop_group()`).
Control routes go through one `requests.Session` (keep-alive); tensor batches through a `TensorReader`
(actdata.reading.tensor_reader).

The server's URL: `url=` if given, else `$ACTDATA_URL`, else `http://localhost:8000` (as the original
service's client did).

Failure policy, the same for both (`RetryPolicy`): connection errors, timeouts and 502/503/504 are retried
with exponential backoff (503's `Retry-After` is honoured) until `retry_for_s` seconds have passed since
the first failure, then `ServerUnavailable` names the URL and the last error. A 4xx (the caller's mistake:
bad `num_samples`, missing API key) raises `ActivationServerError` with the server's `detail` at once.
Every socket operation has a timeout. The API key comes from `api_key=` or `ACTDATA_API_KEY` and is sent
as `Authorization: Bearer <key>`.

`python -m actdata.client [URL] [--num-samples N]` runs a short demo against a running server.
"""
from __future__ import annotations

import math
import re
import sys
import time
from typing import Mapping, NamedTuple, Optional

import requests
import torch

from .. import points as pts
from .. import wire
from ..auth import API_KEY_ENV, bearer, resolve_api_key
from .failures import (
    RETRY_STATUSES,
    ActivationServerError,
    RetryPolicy,
    ServerUnavailable,
    Transient,
    error_detail,
    retry_after,
)
from .tensor_reader import ProvenanceBatch, TensorReader
from .urls import DEFAULT_URL, URL_ENV, resolve_url

__all__ = ["ActivationClient", "ActivationServerError", "ServerUnavailable", "ServerLimits", "ProvenanceBatch",
           "TensorReader", "RetryPolicy", "scaling_factor", "resolve_url", "main"]


class ServerLimits(NamedTuple):
    """What a server serves and the most it can serve, from its `GET /stats`."""

    sample_shape: tuple[int, ...]
    dtype: torch.dtype
    capacity: int  # rows the buffer holds: more can never be ready at once
    min_fill: float  # fraction of capacity ready before rows are served
    max_rows: int  # rows one request may ask for (server.max_samples_per_request)
    same_host: Optional[dict]  # the buffer a reader on the server's host may open (actdata.reading.samehost)
    points: tuple[str, ...] = ()  # names of a row's points (actdata.points)
    request: Optional[dict] = None  # what one tensor answer may hold, for rows of any size

    @classmethod
    def from_stats(cls, st: Mapping) -> "ServerLimits":
        server = st.get("server", {})
        shape = tuple(int(x) for x in st["sample_shape"])
        return cls(shape, wire.DTYPES[st["dtype"]], int(st["capacity"]),
                   float(st.get("min_fill", 0.0)), max(1, int(server.get("max_samples_per_request")
                                                                or st["capacity"])), server.get("same_host"),
                   tuple(st.get("points") or pts.point_names(shape)), server.get("request_limits"))

    def pick(self, selection: pts.Selection) -> pts.Picked:
        """A reader's `points=` resolved against this server's points (PointsError naming what is wrong)."""
        return pts.pick(selection, self.points, self.sample_shape)

    def max_rows_for(self, picked: Optional[pts.Picked]) -> int:
        """Rows one request may ask for: of whole rows, or of the points `picked` (more, as they are smaller;
        whole rows' maximum from a server that publishes no request limits)."""
        if picked is None or self.request is None:
            return self.max_rows
        return pts.rows_per_request(self.request, wire.row_bytes(picked.wire_shape, wire.DTYPE_NAMES[self.dtype]))

    def batch(self, most: int) -> int:
        """A batch size that fits: at most `most`, one request's maximum and half the buffer (so a batch
        never waits for a completely full buffer)."""
        return max(1, min(most, self.max_rows, self.capacity // 2))


def scaling_factor(statistics: Mapping) -> list:
    """The normalising factor per capture point from `get_statistics()`: sqrt(width / mean squared norm), the
    constant that makes the scaled rows' mean squared norm equal their width (the 'normalize activations'
    convention of SAELens and dictionary_learning). Multiply rows of point p by factor[p]."""
    width = statistics["width"]
    return [None if not m else math.sqrt(width / m) for m in statistics["mean_sq_norm"]]


class ActivationClient:
    """The control API of one server.

        client = ActivationClient("http://127.0.0.1:8000")  # or ActivationClient(): $ACTDATA_URL / localhost:8000
        client.wait_for_data(min_samples=512, timeout=60)
        x, meta = client.get_activations_tensor(4096)     # x: [4096, *sample_shape]

    `timeout` bounds every socket operation; `retry_for_s` bounds the time spent retrying connection
    errors and 502/503/504 (honouring Retry-After) before `ServerUnavailable`; 4xx raise
    `ActivationServerError` at once. `health_check()` and `wait_for_data()` never raise for an
    unreachable server: they answer False. A tensor batch above the server's per-request maximum is read
    in several requests into one tensor.

    `points`: only these points of each row (indices or names as the server's `GET /stats` lists them,
    e.g. `"resid_post@6"` or `[0, 3]`; see actdata.points): tensor batches are then `[n, len(points),
    width]`, or `[n, width]` when `points` is one index or name rather than a list.
    """

    def __init__(self, url: Optional[str] = None, api_key: Optional[str] = None, timeout: float = 30.0,
                 retry_for_s: float = 30.0, backoff: float = 0.1, max_backoff: float = 5.0,
                 group: Optional[str] = None, points: Optional[pts.Selection] = None):
        if points is not None:
            pts.parse(points)  # a malformed selection fails here, not at the first batch
        self.points, self._picked = points, None
        self.url = resolve_url(url)
        self.timeout = float(timeout)
        self.retry = RetryPolicy(retry_for_s, backoff, max_backoff)
        key = resolve_api_key(api_key)
        self.session = requests.Session()
        self.session.headers.update({"Accept-Encoding": "identity", **bearer(key)})
        self.group = group  # consumer group of the batches read (see groups())
        self._reader = TensorReader(self.url, key, timeout=timeout, retry=self.retry, group=group)
        self._limits: Optional[ServerLimits] = None  # asked once, on the first tensor batch

    # -- plumbing -------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, retry: bool = True, **kw) -> requests.Response:
        def attempt():
            try:
                r = self.session.request(method, self.url + path, timeout=self.timeout, **kw)
            except requests.RequestException as e:
                raise Transient(f"{type(e).__name__}: {e}") from None
            if r.status_code in RETRY_STATUSES:
                raise Transient(f"HTTP {r.status_code}: {error_detail(r.content)}",
                                 retry_after(r.headers.get("Retry-After")), r.status_code)
            if r.status_code >= 400:
                detail = error_detail(r.content)
                raise ActivationServerError(f"{method} {self.url}{path} -> HTTP {r.status_code}: {detail}",
                                            url=self.url, status=r.status_code, detail=detail)
            return r

        if retry:
            return self.retry.run(attempt, self.url, f"{method} {path} on")
        return RetryPolicy(0).run(attempt, self.url, f"{method} {path} on")

    # -- the API --------------------------------------------------------------------------------------

    def health(self) -> dict:
        """`GET /` as a dict (status, serving, fill, ready, capacity, sample_shape, dtype, generators)."""
        return self._request("GET", "/", retry=False).json()

    def health_check(self) -> bool:
        """True when the server answers `GET /` with 200 (it is up; it may still be filling)."""
        try:
            self.health()
            return True
        except ActivationServerError:
            return False

    def get_stats(self) -> dict:
        """`GET /stats`: buffer counts (`valid_samples` = rows ready), fill, rows written/read, sample_shape,
        dtype, generators, rates, and `server` (its per-request maximum, the same-host identity)."""
        return self._request("GET", "/stats").json()

    def limits(self) -> ServerLimits:
        """The server's row format and limits (`GET /stats`)."""
        self._limits, self._picked = ServerLimits.from_stats(self.get_stats()), None
        return self._limits

    def _selection(self) -> Optional[pts.Picked]:
        """`points` resolved against the server's points once its limits are known (None: whole rows)."""
        if self.points is None:
            return None
        if self._limits is None:  # a cluster's directory publishes no points: its servers resolve the names
            self._reader.points = pts.text(pts.parse(self.points)[0])
            return None
        if self._picked is None:
            self._picked = self._limits.pick(self.points)
            self._reader.points = self._picked.query
        return self._picked

    def _max_rows(self, wanted: int) -> int:
        """Rows one tensor request may ask for; `wanted` where the URL publishes no limits (a cluster's
        directory, which answers the request itself with a clear 409)."""
        if self._limits is None:
            st = self.get_stats()
            if "sample_shape" not in st:
                return max(1, wanted)
            self._limits = ServerLimits.from_stats(st)
        return self._limits.max_rows_for(self._selection())

    def wait_for_data(self, min_samples: int = 1, timeout: float = 60.0, check_interval: float = 0.5) -> bool:
        """Poll `GET /` until the server serves and has at least `min_samples` ready rows: True, or False
        after `timeout` seconds (unreachable counts as not ready). A 4xx raises, and so does a
        `min_samples` above the server's capacity, at once: that many rows are never ready together."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                h = self.health()
                capacity = h.get("capacity")
                if capacity is not None and min_samples > capacity:
                    raise ActivationServerError(
                        f"{self.url}: {min_samples} ready rows will never be: the server's buffer holds "
                        f"{capacity} rows (wait for at most {capacity})", url=self.url)
                if h.get("serving") and h.get("ready", 0) >= min_samples:
                    return True
            except ServerUnavailable:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(check_interval, left))

    def get_activations(self, num_samples: int) -> dict:
        """`GET /activations` (JSON): activations (nested lists), shape, dtype, num_samples, indices,
        buffer_stats. Slow for large batches; use get_activations_tensor."""
        params = {"num_samples": int(num_samples), **({"group": self.group} if self.group else {})}
        if self.points is not None:  # the server resolves the names; rows come as [n, points, width]
            params[pts.QUERY] = pts.text(pts.parse(self.points)[0])
        return self._request("GET", wire.JSON_PATH, params=params).json()

    def get_activations_tensor(self, num_samples: int, provenance: bool = False):
        """(tensor [num_samples, *sample_shape], metadata) from `GET /activations/tensor`, read straight
        into the tensor, in requests of at most the server's maximum. metadata: shape, dtype (wire name),
        num_samples, nbytes, seconds, url. With `provenance=True`: a ProvenanceBatch (activations,
        token_ids, positions, doc_ids) instead, from safetensors bodies; the server must run with
        generator.provenance=true (else HTTP 422)."""
        num_samples = int(num_samples)
        most = self._max_rows(num_samples)
        sel = self._selection()
        if provenance:
            if num_samples <= most:  # also a bad count: the server's 422 says what is wrong with it
                b = self._reader.fetch_provenance(num_samples)
            else:
                parts = [self._reader.fetch_provenance(min(most, num_samples - a))
                         for a in range(0, num_samples, most)]
                b = ProvenanceBatch(*(torch.cat(xs) for xs in zip(*parts)))
            return b if sel is None else b._replace(activations=b.activations.view(len(b.activations), *sel.shape))
        t0 = time.perf_counter()
        if num_samples <= most:
            t, _ = self._reader.fetch(num_samples)
            t = t if sel is None else t.view(len(t), *sel.shape)
        else:
            t = torch.empty((num_samples, *(sel.shape if sel else self._limits.sample_shape)), dtype=self._limits.dtype)
            for a in range(0, num_samples, most):
                part = t[a:a + most]
                self._reader.fetch(len(part), out=part if sel is None else part.view(len(part), *sel.wire_shape))
        return t, {"shape": list(t.shape), "dtype": wire.DTYPE_NAMES[t.dtype], "num_samples": t.shape[0],
                   "nbytes": t.numel() * t.element_size(), "seconds": time.perf_counter() - t0, "url": self.url}

    def get_statistics(self, tensors: bool = False):
        """`GET /statistics`: running statistics of every row generated, per capture point, merged over the
        generators. JSON summary (count, sample_shape, width, mean_sq_norm, mean_norm, scaling_factor,
        mean_of_mean, mean_of_var, generators), or with `tensors=True` the full float64 tensors (mean, var,
        m2 [points, width]; mean_sq_norm, mean_norm, scaling_factor [points]; count) from a safetensors body."""
        if not tensors:
            return self._request("GET", "/statistics").json()
        r = self._request("GET", "/statistics", params={"format": "safetensors"})
        return wire.decode_tensors(bytearray(r.content))[0]

    def get_scaling_factor(self) -> list:
        """Per capture point, the factor that makes the mean squared norm of scaled rows equal their width."""
        return scaling_factor(self.get_statistics())

    def groups(self) -> dict:
        """`GET /groups`: {"groups": [{name, state, rows_read, lag, rows_per_s, rows_skipped, last_seen,
        registered}], "group_policy", "max_groups", "groups_expected"}."""
        return self._request("GET", "/groups").json()

    def register_group(self, name: Optional[str] = None) -> dict:
        """`POST /groups`: register `name` (default: this client's group) before its first read."""
        return self._request("POST", "/groups", json={"name": name or self.group}).json()

    def drop_group(self, name: Optional[str] = None) -> dict:
        """`DELETE /groups/NAME`: drop the group now (default: this client's); its unread rows are released."""
        return self._request("DELETE", f"/groups/{name or self.group}").json()

    def refresh(self) -> dict:
        """`POST /refresh`: every ready row is dropped and regenerated; returns {"refreshed": n, ...}."""
        return self._request("POST", "/refresh").json()

    def close(self) -> None:
        self.session.close()
        self._reader.close()

    def __enter__(self) -> "ActivationClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: Optional[list[str]] = None) -> int:
    """The demo: health, stats, one tensor batch with its shape, dtype and GB/s."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m actdata.client", description=main.__doc__)
    p.add_argument("url", nargs="?", default=None,
                   help=f"server URL (default: ${URL_ENV}, else {DEFAULT_URL})")
    p.add_argument("--num-samples", type=int, default=None,
                   help="rows per batch (default: 1024, or less where the server allows less)")
    p.add_argument("--reps", type=int, default=5, help="tensor batches to time")
    p.add_argument("--api-key", default=None, help=f"default: ${API_KEY_ENV}")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the buffer to fill")
    a = p.parse_args(argv)
    if a.num_samples is not None and a.num_samples < 1:
        p.error(f"--num-samples must be >= 1, got {a.num_samples}")
    if a.reps < 1:
        p.error(f"--reps must be >= 1, got {a.reps}")

    with ActivationClient(a.url, api_key=a.api_key) as c:
        try:
            return _demo(c, a.num_samples, a.reps, a.wait)
        except ActivationServerError as e:
            print(e, file=sys.stderr)
            return 1


def _demo(c: ActivationClient, num_samples: Optional[int], reps: int, wait: float) -> int:
    try:
        h = c.health()
    except ServerUnavailable as e:
        errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", e.detail or "")  # under requests' wrapping
        print(f"{c.url}: no actdata server answers ({errno.group(1) if errno else e.detail}); "
              f"start one with `python -m actdata.serve` "
              f"or give its URL (argument or ${URL_ENV})", file=sys.stderr)
        return 1
    print(f"{c.url}: status={h['status']} fill={h['fill']:.2f} ready={h['ready']}/{h['capacity']} "
          f"sample_shape={h['sample_shape']} dtype={h['dtype']}")
    st = c.get_stats()
    print(f"stats: valid_samples={st['valid_samples']} rows_written={st['rows_written']} "
          f"rows_read={st['rows_read']} "
          f"generators={[g.get('state') for g in st.get('generators', [])]}")
    n = num_samples or ServerLimits.from_stats(st).batch(1024)
    if not c.wait_for_data(n, timeout=wait):
        print(f"{c.url}: no {n} ready rows within {wait:g} s (ready={c.health().get('ready')})", file=sys.stderr)
        return 1
    times = []
    for _ in range(reps):
        x, meta = c.get_activations_tensor(n)
        times.append(meta["seconds"])
    best = min(times)
    print(f"batch: shape={tuple(x.shape)} dtype={x.dtype} {meta['nbytes'] / 1e6:.1f} MB; "
          f"best of {reps}: {best * 1e3:.1f} ms = {meta['nbytes'] / best / 1e9:.2f} GB/s, "
          f"{x.shape[0] / best:,.0f} samples/s")
    print(f"first row, first values: {x.reshape(len(x), -1)[0, :8].tolist()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
