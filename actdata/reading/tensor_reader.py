"""The fast tensor reader: one keep-alive `http.client` connection reading `GET /activations/tensor`.

`TensorReader(url).fetch(n)` reads the headers, checks them (X-Tensor-Shape x X-Tensor-Dtype must equal
Content-Length, the rows must be the rows asked for, the row shape the one seen before) before it
allocates anything, then `readinto()`s the body straight into the tensor's memory: one copy, socket ->
tensor. `fetch_provenance(n)` reads rows with their origin from one safetensors body (actdata.wire) into a
`ProvenanceBatch`. `ActivationClient` and every DataLoader worker of `RemoteActivationDataset` read with it.
Failures follow `RetryPolicy` (actdata.reading.failures); every socket operation has a timeout.
"""
from __future__ import annotations

import http.client
import math
import socket
import urllib.parse
from typing import Callable, Mapping, NamedTuple, Optional

import torch

from .. import points as pts
from .. import wire
from ..auth import bearer, resolve_api_key
from .failures import RETRY_STATUSES, ActivationServerError, RetryPolicy, Transient, error_detail, retry_after
from .urls import resolve_url


class RowFormat(NamedTuple):
    """The shape and dtype of one row, as the first answer described them; later answers must match."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class TensorHeader(NamedTuple):
    """A 200 answer's tensor, from its checked headers."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


class ServerProcessId(NamedTuple):
    """Which of the server's HTTP processes answered (`X-Actdata-Process: i/n`)."""

    index: int
    count: int


class ProvenanceBatch(NamedTuple):
    """Rows with their origin (`GET /activations/tensor?provenance=1`; needs generator.provenance=true).
    doc_ids: the context id, (g << 40) | context counter of generator g; positions: the row's position in
    that context (0 = BOS); token_ids: the token at that position."""

    activations: torch.Tensor  # [n, *sample_shape]
    token_ids: torch.Tensor  # int32 [n]
    positions: torch.Tensor  # int32 [n]
    doc_ids: torch.Tensor  # int64 [n]


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
                 retry: Optional[RetryPolicy] = None, rcvbuf: Optional[int] = None, group: Optional[str] = None,
                 points: Optional[str] = None):
        url = resolve_url(url)
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = f"{u.scheme}://{u.netloc}{u.path.rstrip('/')}"
        self._https, self._host = u.scheme == "https", u.hostname
        self._port = u.port or (443 if self._https else 80)
        self._path = u.path.rstrip("/") + wire.TENSOR_PATH
        self.timeout, self.rcvbuf = float(timeout), rcvbuf
        self.group = group  # the consumer group read as (actdata.shm.groups); None = the server's default
        self.retry = retry or RetryPolicy()
        key = resolve_api_key(api_key)
        self._headers = {"Accept-Encoding": "identity", **bearer(key)}
        self._conn: Optional[http.client.HTTPConnection] = None
        self._requests_on_conn = 0
        self.row_format: Optional[RowFormat] = None  # once seen
        self.points = points  # a selection's query text (actdata.points): only those points of each row
        # Spreading: a connection's requests are all served by the HTTP process that accepted it, and which
        # one does is chance. A reader given `prefer` (its place among the readers of one trainer) that is
        # answered by process i of n with i != prefer % n reconnects, at most SPREAD_TRIES times.
        self.prefer: Optional[int] = None
        self.spread_tries = self.SPREAD_TRIES
        self.server_process: Optional[ServerProcessId] = None  # of the last answer (wire.PROCESS)

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
        query += f"&group={urllib.parse.quote(self.group)}" if self.group else ""
        if self.points is not None:
            query += f"&{pts.QUERY}={pts.quoted(self.points)}"
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
                raise Transient(f"{type(e).__name__}: {e}") from None
            if resp.will_close:
                self.close()
            detail = error_detail(body)
            if resp.status in RETRY_STATUSES:
                raise Transient(f"HTTP {resp.status}: {detail}", retry_after(resp.getheader("Retry-After")),
                                 resp.status)
            raise ActivationServerError(f"GET {self.url}{wire.TENSOR_PATH}?num_samples={num_samples} -> "
                                        f"HTTP {resp.status}: {detail}", url=self.url, status=resp.status,
                                        detail=detail)
        raise AssertionError("unreachable")

    def _bad(self, what: str) -> ActivationServerError:
        self.close()  # the rest of this body is not read: the connection cannot be reused
        return ActivationServerError(f"{self.url}: bad tensor response: {what}", url=self.url, status=200,
                                     detail=what)

    def check_headers(self, headers: Mapping, num_samples: int) -> TensorHeader:
        """The tensor of a 200 answer, checked before anything is allocated: the headers describe
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
        row = RowFormat(shape[1:], dtype)
        if self.row_format is not None and row != self.row_format:
            raise self._bad(f"rows of {list(row.shape)} {dtype} after rows of {list(self.row_format.shape)} "
                            f"{self.row_format.dtype}")
        self.row_format = row
        return TensorHeader(shape, dtype, nbytes)

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
        self.server_process = ServerProcessId(i, n)
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
            most = num_samples * (math.prod(shape) * dtype.itemsize + wire.PROVENANCE_BYTES) + (64 << 10)
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
