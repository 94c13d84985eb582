"""Clients of an actdata server: the control API (`ActivationClient`) and the fast tensor reader.

- `ActivationClient(url)`: health, stats, waiting for data, JSON and tensor batches, refresh. Control
  routes go through one `requests.Session` (keep-alive); tensor batches go through a `TensorReader`.
- `TensorReader(url)`: one persistent `http.client` connection reading `GET /activations/tensor`. It reads
  the headers, checks them (X-Tensor-Shape x X-Tensor-Dtype must equal Content-Length, the rows must be the
  rows asked for, the row shape the one seen before) before it allocates anything, then `readinto()`s the
  body straight into the tensor's memory: one copy, socket -> tensor. `RemoteActivationDataset` uses it in
  each DataLoader worker.

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

import http.client
import json
import math
import os
import random
import socket
import threading
import time
import urllib.parse
from typing import Callable, Mapping, NamedTuple, Optional

import requests
import torch

from .. import wire
from ..auth import API_KEY_ENV, bearer, resolve_api_key

URL_ENV = "ACTDATA_URL"
DEFAULT_URL = "http://localhost:8000"
RETRY_STATUSES = (502, 503, 504)


class ActivationServerError(RuntimeError):
    """The server refused a request (4xx: the caller's mistake) or could not be reached in time.

    `url`, `status` (None for connection errors) and `detail` (the server's `detail` string or the
    connection error) are kept as attributes. Constructible from the message alone, so the type survives
    a DataLoader worker re-raising it in the main process.
    """

    def __init__(self, message: str, url: Optional[str] = None, status: Optional[int] = None,
                 detail: Optional[str] = None):
        super().__init__(message)
        self.url, self.status, self.detail = url, status, detail


class ServerUnavailable(ActivationServerError):
    """Connection errors, timeouts or 502/503/504 for longer than the retry budget (`retry_for_s`)."""


class _Transient(Exception):
    """Internal: a failure worth retrying, with the server's Retry-After (seconds) when it sent one."""

    def __init__(self, reason: str, retry_after: Optional[float] = None, status: Optional[int] = None):
        super().__init__(reason)
        self.reason, self.retry_after, self.status = reason, retry_after, status


def resolve_url(url: Optional[str] = None) -> str:
    """`url` if given, else `$ACTDATA_URL`, else http://localhost:8000; with a scheme, without a trailing '/'."""
    url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).strip().rstrip("/")
    return url if "://" in url else "http://" + url


def _detail(body: bytes) -> str:
    """The server's `detail` from a JSON error body, or the body's start as text."""
    try:
        d = json.loads(body)
        if isinstance(d, dict) and "detail" in d:
            return d["detail"] if isinstance(d["detail"], str) else json.dumps(d["detail"])
    except ValueError:
        pass
    return body[:300].decode(errors="replace") or "(empty body)"


def _retry_after(value: Optional[str]) -> Optional[float]:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class RetryPolicy:
    """Exponential backoff bounded by a total time.

    `run(attempt_fn)` calls `attempt_fn()` until it returns. `_Transient` failures are retried after
    `min(max_backoff, backoff * 2**n)` seconds (with +-20% jitter) or the server's Retry-After, whichever
    the server asked for, never sleeping past `retry_for_s` seconds after the first failure; after that
    `ServerUnavailable` is raised. Other exceptions pass through at once.
    """

    def __init__(self, retry_for_s: float = 60.0, backoff: float = 0.1, max_backoff: float = 5.0,
                 stop: Optional[threading.Event] = None):
        self.retry_for_s, self.backoff, self.max_backoff = float(retry_for_s), float(backoff), float(max_backoff)
        self.stop = stop  # once set, a failure is final (the reader is being closed)

    def run(self, attempt_fn: Callable, url: str, what: str):
        first_failure, n = None, 0
        while True:
            try:
                return attempt_fn()
            except _Transient as e:
                now = time.monotonic()
                first_failure = first_failure if first_failure is not None else now
                left = self.retry_for_s - (now - first_failure)
                if self.stop is not None and self.stop.is_set():
                    left = 0
                if left <= 0:
                    raise ServerUnavailable(
                        f"{what} {url}: gave up after {now - first_failure:.1f} s of retries "
                        f"(retry_for_s={self.retry_for_s:g}); last error: {e.reason}",
                        url=url, status=e.status, detail=e.reason) from None
                wait = e.retry_after if e.retry_after is not None else \
                    min(self.max_backoff, self.backoff * 2 ** n) * random.uniform(0.8, 1.2)
                if self.stop is not None:
                    self.stop.wait(min(wait, left))
                else:
                    time.sleep(min(wait, left))
                n += 1


class ProvenanceBatch(NamedTuple):
    """Rows with their origin (`GET /activations/tensor?provenance=1`; needs generator.provenance=true).
    doc_ids: the context id, (g << 40) | context counter of generator g; positions: the row's position in
    that context (0 = BOS); token_ids: the token at that position."""

    activations: torch.Tensor  # [n, *sample_shape]
    token_ids: torch.Tensor  # int32 [n]
    positions: torch.Tensor  # int32 [n]
    doc_ids: torch.Tensor  # int64 [n]


def scaling_factor(statistics: Mapping) -> list:
    """The normalising factor per capture point from `get_statistics()`: sqrt(width / mean squared norm), the
    constant that makes the scaled rows' mean squared norm equal their width (the 'normalize activations'
    convention of SAELens and dictionary_learning). Multiply rows of point p by factor[p]."""
    width = statistics["width"]
    return [None if not m else math.sqrt(width / m) for m in statistics["mean_sq_norm"]]


class TensorReader:
    """One keep-alive `http.client` connection that fetches `[n, *sample_shape]` tensors.

    `fetch(n)` sends `GET /activations/tensor?num_samples=n`, allocates the tensor described by the
    response headers with `allocate(headers)` (default: `wire.empty_for`) and reads the body into it with
    `readinto` (one copy). A connection that fails is closed and opened again on the next attempt; a
    request that failed on a reused connection (the server closed it while idle) is retried at once.
    Only standard-library objects are held, created lazily: a reader may be built in one process and
    first used in another, but not shared by two at once.
    """

    SPREAD_TRIES = 6

    def __init__(self, url: Optional[str] = None, api_key: Optional[str] = None, timeout: float = 60.0,
                 retry: Optional[RetryPolicy] = None, rcvbuf: Optional[int] = None):
        url = resolve_url(url)
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = f"{u.scheme}://{u.netloc}{u.path.rstrip('/')}"
        self._https, self._host = u.scheme == "https", u.hostname
        self._port = u.port or (443 if self._https else 80)
        self._path = u.path.rstrip("/") + wire.TENSOR_PATH
        self.timeout, self.rcvbuf = float(timeout), rcvbuf
        self.retry = retry or RetryPolicy()
        key = resolve_api_key(api_key)
        self._headers = {"Accept-Encoding": "identity", **bearer(key)}
        self._conn: Optional[http.client.HTTPConnection] = None
        self._requests_on_conn = 0
        self.row_format: Optional[tuple[tuple[int, ...], torch.dtype]] = None  # (row shape, dtype) once seen
        # Spreading: a connection's requests are all served by the HTTP process that accepted it, and which
        # one does is chance. A reader given `prefer` (its place among the readers of one trainer) that is
        # answered by process i of n with i != prefer % n reconnects, at most SPREAD_TRIES times.
        self.prefer: Optional[int] = None
        self.spread_tries = self.SPREAD_TRIES
        self.server_process: Optional[tuple[int, int]] = None  # (i, n) of the last answer (wire.PROCESS)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.server_process = None

    def abort(self) -> None:
        """Wake a read blocked in another thread: shut the socket down (closing it would not wake it)."""
        conn = self._conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.rcvbuf:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, int(self.rcvbuf))
        self._requests_on_conn = 0
        return conn

    def fetch(self, num_samples: int, empty: Optional[Callable] = None, out: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, Mapping]:
        """(tensor, response headers: a case-insensitive mapping) for `num_samples` rows, with retries (see
        RetryPolicy). The tensor is `out` when given (its shape and dtype must match the answer), else made
        by `empty(shape, dtype=...)` (default torch.empty, e.g. an allocator of shared memory)."""
        return self.retry.run(lambda: self._attempt(num_samples, empty, out), self.url, "GET tensor from")

    def fetch_provenance(self, num_samples: int) -> ProvenanceBatch:
        """`num_samples` rows with their provenance (one safetensors body), with retries."""
        return self.retry.run(lambda: self._attempt(num_samples, None, None, provenance=True), self.url,
                              "GET tensor from")

    def _attempt(self, num_samples: int, empty: Optional[Callable], out: Optional[torch.Tensor],
                 provenance: bool = False):
        query = f"num_samples={int(num_samples)}" + (f"&{wire.PROVENANCE_QUERY}=1" if provenance else "")
        for fresh_retry in (False, True):
            reused = self._conn is not None and self._requests_on_conn > 0
            try:
                if self._conn is None:
                    self._conn = self._connect()
                self._conn.request("GET", f"{self._path}?{query}", headers=self._headers)
                self._requests_on_conn += 1
                resp = self._conn.getresponse()
                if resp.status == 200 and provenance:
                    return self._read_tensors(resp, int(num_samples))
                if resp.status == 200:
                    return self._read_body(resp, int(num_samples), empty, out)
                body = resp.read()
            except (OSError, http.client.HTTPException) as e:
                self.close()
                stopping = self.retry.stop is not None and self.retry.stop.is_set()
                if reused and not fresh_retry and not isinstance(e, TimeoutError) and not stopping:
                    continue  # an idle keep-alive connection closed by the server: retry at once
                raise _Transient(f"{type(e).__name__}: {e}") from None
            if resp.will_close:
                self.close()
            detail = _detail(body)
            if resp.status in RETRY_STATUSES:
                raise _Transient(f"HTTP {resp.status}: {detail}", _retry_after(resp.getheader("Retry-After")),
                                 resp.status)
            raise ActivationServerError(f"GET {self.url}{wire.TENSOR_PATH}?num_samples={num_samples} -> "
                                        f"HTTP {resp.status}: {detail}", url=self.url, status=resp.status,
                                        detail=detail)
        raise AssertionError("unreachable")

    def _bad(self, what: str) -> ActivationServerError:
        self.close()  # the rest of this body is not read: the connection cannot be reused
        return ActivationServerError(f"{self.url}: bad tensor response: {what}", url=self.url, status=200,
                                     detail=what)

    def check_headers(self, headers: Mapping, num_samples: int) -> tuple[tuple[int, ...], torch.dtype, int]:
        """(shape, dtype, nbytes) of a 200 answer, checked before anything is allocated: the headers describe
        a tensor (actdata.wire), Content-Length is an integer equal to shape x dtype, the rows are the rows
        asked for, and the row shape and dtype are those of earlier answers. Raises ActivationServerError."""
        try:
            shape, dtype, nbytes = wire.parse(headers)
        except wire.WireError as e:
            raise self._bad(str(e)) from None
        length = headers.get("Content-Length")
        if length is None:
            raise self._bad("no Content-Length")
        try:
            length_n = int(length)
        except ValueError:
            raise self._bad(f"Content-Length {length!r} is not an integer") from None
        if not shape or shape[0] != num_samples:
            raise self._bad(f"{wire.SHAPE} {headers.get(wire.SHAPE)!r} but {num_samples} rows were asked for")
        if length_n != nbytes:
            raise self._bad(f"Content-Length {length_n} but {wire.SHAPE} x {wire.DTYPE} describe {nbytes} bytes")
        row = (shape[1:], dtype)
        if self.row_format is not None and row != self.row_format:
            raise self._bad(f"rows of {list(shape[1:])} {dtype} after rows of {list(self.row_format[0])} "
                            f"{self.row_format[1]}")
        self.row_format = row
        return shape, dtype, nbytes

    def _read_body(self, resp: http.client.HTTPResponse, num_samples: int, empty: Optional[Callable],
                   out: Optional[torch.Tensor]) -> tuple[torch.Tensor, Mapping]:
        headers = resp.headers  # case-insensitive (http.client.HTTPMessage)
        shape, dtype, total = self.check_headers(headers, num_samples)
        if out is not None:
            if tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
                raise self._bad(f"{list(shape)} {dtype} does not fit the batch {list(out.shape)} {out.dtype}")
            tensor = out
        else:
            tensor = (empty or torch.empty)(shape, dtype=dtype)
        view = tensor.reshape(-1).view(torch.uint8).numpy().data if total else memoryview(bytearray())
        got = 0
        while got < total:  # usually one call: BufferedReader.readinto fills large buffers from the socket
            n = resp.readinto(view[got:])
            if not n:
                raise http.client.IncompleteRead(b"", total - got)
            got += n
        if resp.will_close:
            self.close()
        else:
            self._spread(headers.get(wire.PROCESS))
        return tensor, headers

    def _spread(self, process: Optional[str]) -> None:
        """Reconnect before the next request if another server process should serve this reader."""
        try:
            i, n = (int(x) for x in process.split("/"))
        except (AttributeError, ValueError):
            return
        self.server_process = (i, n)
        if self.prefer is not None and n > 1 and i != self.prefer % n and self.spread_tries > 0:
            self.spread_tries -= 1
            self.close()

    def _read_tensors(self, resp: http.client.HTTPResponse, num_samples: int) -> ProvenanceBatch:
        """A safetensors body (rows + provenance) read into one buffer; the tensors are views of it."""
        length = resp.getheader("Content-Length")
        try:
            nbytes = int(length)
        except (TypeError, ValueError):
            raise self._bad(f"Content-Length {length!r} is not an integer") from None
        if self.row_format is not None:  # never allocate more than the rows asked for can take
            shape, dtype = self.row_format
            most = num_samples * (math.prod(shape) * dtype.itemsize + 16) + (64 << 10)
            if not 0 <= nbytes <= most:
                raise self._bad(f"Content-Length {nbytes} is more than {num_samples} rows with provenance take")
        body = torch.empty(nbytes, dtype=torch.uint8).numpy().data  # not zero-filled, unlike bytearray
        view, got = body, 0
        while got < len(body):
            n = resp.readinto(view[got:])
            if not n:
                raise http.client.IncompleteRead(b"", len(body) - got)
            got += n
        if resp.will_close:
            self.close()
        else:
            self._spread(resp.getheader(wire.PROCESS))
        try:
            t, _ = wire.decode_tensors(body)
            return ProvenanceBatch(t["activations"], t["token_ids"], t["positions"], t["doc_ids"])
        except (wire.WireError, KeyError) as e:
            self.close()
            raise ActivationServerError(f"{self.url}: bad safetensors response: {e}", url=self.url, status=200,
                                        detail=str(e)) from None

    def __getstate__(self):  # a connection does not travel between processes: the copy reconnects
        state = self.__dict__.copy()
        state["_conn"] = None
        return state


class ActivationClient:
    """The control API of one server.

        client = ActivationClient("http://127.0.0.1:8000")  # or ActivationClient(): $ACTDATA_URL / localhost:8000
        client.wait_for_data(min_samples=4096, timeout=60)
        x, meta = client.get_activations_tensor(4096)     # x: [4096, *sample_shape]

    `timeout` bounds every socket operation; `retry_for_s` bounds the time spent retrying connection
    errors and 502/503/504 (honouring Retry-After) before `ServerUnavailable`; 4xx raise
    `ActivationServerError` at once. `health_check()` and `wait_for_data()` never raise for an
    unreachable server: they answer False.
    """

    def __init__(self, url: Optional[str] = None, api_key: Optional[str] = None, timeout: float = 30.0,
                 retry_for_s: float = 30.0, backoff: float = 0.1, max_backoff: float = 5.0):
        self.url = resolve_url(url)
        self.timeout = float(timeout)
        self.retry = RetryPolicy(retry_for_s, backoff, max_backoff)
        key = resolve_api_key(api_key)
        self.session = requests.Session()
        self.session.headers.update({"Accept-Encoding": "identity", **bearer(key)})
        self._reader = TensorReader(self.url, key, timeout=timeout, retry=self.retry)

    # -- plumbing -------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, retry: bool = True, **kw) -> requests.Response:
        def attempt():
            try:
                r = self.session.request(method, self.url + path, timeout=self.timeout, **kw)
            except requests.RequestException as e:
                raise _Transient(f"{type(e).__name__}: {e}") from None
            if r.status_code in RETRY_STATUSES:
                raise _Transient(f"HTTP {r.status_code}: {_detail(r.content)}",
                                 _retry_after(r.headers.get("Retry-After")), r.status_code)
            if r.status_code >= 400:
                detail = _detail(r.content)
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

    def wait_for_data(self, min_samples: int = 1, timeout: float = 60.0, check_interval: float = 0.5) -> bool:
        """Poll `GET /` until the server serves and has at least `min_samples` ready rows: True, or False
        after `timeout` seconds (unreachable counts as not ready). A 4xx raises."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                h = self.health()
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
        return self._request("GET", wire.JSON_PATH, params={"num_samples": int(num_samples)}).json()

    def get_activations_tensor(self, num_samples: int, provenance: bool = False):
        """(tensor [num_samples, *sample_shape], metadata) from `GET /activations/tensor`, read straight
        into the tensor. metadata: shape, dtype (wire name), num_samples, nbytes, seconds, url.
        With `provenance=True`: a ProvenanceBatch (activations, token_ids, positions, doc_ids) instead,
        from one safetensors body; the server must run with generator.provenance=true (else HTTP 422)."""
        if provenance:
            return self._reader.fetch_provenance(num_samples)
        t0 = time.perf_counter()
        t, headers = self._reader.fetch(num_samples)
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
    p.add_argument("--num-samples", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5, help="tensor batches to time")
    p.add_argument("--api-key", default=None, help=f"default: ${API_KEY_ENV}")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the buffer to fill")
    a = p.parse_args(argv)

    with ActivationClient(a.url, api_key=a.api_key) as c:
        if not c.health_check():
            print(f"{c.url}: not reachable")
            return 1
        h = c.health()
        print(f"{c.url}: status={h['status']} fill={h['fill']:.2f} ready={h['ready']}/{h['capacity']} "
              f"sample_shape={h['sample_shape']} dtype={h['dtype']}")
        st = c.get_stats()
        print(f"stats: valid_samples={st['valid_samples']} rows_written={st['rows_written']} "
              f"rows_read={st['rows_read']} "
              f"generators={[g.get('state') for g in st.get('generators', [])]}")
        if not c.wait_for_data(a.num_samples, timeout=a.wait):
            print(f"no {a.num_samples} ready rows within {a.wait:g} s")
            return 1
        times = []
        for _ in range(a.reps):
            x, meta = c.get_activations_tensor(a.num_samples)
            times.append(meta["seconds"])
        best = min(times)
        print(f"batch: shape={tuple(x.shape)} dtype={x.dtype} {meta['nbytes'] / 1e6:.1f} MB; "
              f"best of {a.reps}: {best * 1e3:.1f} ms = {meta['nbytes'] / best / 1e9:.2f} GB/s, "
              f"{x.shape[0] / best:,.0f} samples/s")
        print(f"first row, first values: {x.reshape(len(x), -1)[0, :8].tolist()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
