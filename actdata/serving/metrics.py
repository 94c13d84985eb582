"""Serving metrics shared by every HTTP process, and their Prometheus exposition (`GET /metrics`).

The numbers live in a small memory-mapped file beside the buffer (`<buffer>.metrics`): per route, the
requests by status class, a latency histogram and the body bytes sent. Every HTTP process adds to the
same counters under the buffer's kind of file lock, so a scrape of any process sees the whole server.
Buffer and generator numbers are read at scrape time from the buffer and the generators' status files.
"""
from __future__ import annotations

import mmap
import os
import time

import numpy as np

from ..generation.status import read_statuses
from ..shm import SharedActivationBuffer
from ..shm.lock import ProcessLock

ROUTES = ("/activations/tensor", "/activations", "/stats", "/", "/refresh", "/metrics", "/groups", "other")
CLASSES = ("2xx", "4xx", "5xx")
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, float("inf"))
# per route: [requests by class] [bucket counts] [latency sum, microseconds] [body bytes]
_PER_ROUTE = len(CLASSES) + len(BUCKETS) + 2
_SLOTS = len(ROUTES) * _PER_ROUTE


class ServingMetrics:
    """Counters of the HTTP processes of one server, in `<path>` (created by the server's main process)."""

    def __init__(self, path: str, create: bool = False):
        self.path = path
        if create:  # allocated, not sparse: a first write into a hole of a full tmpfs would be a SIGBUS
            with open(path, "wb") as f:
                f.truncate(_SLOTS * 8)
                try:
                    os.posix_fallocate(f.fileno(), 0, _SLOTS * 8)
                except OSError as e:
                    if e.errno not in (22, 95):  # a filesystem without fallocate stays sparse
                        raise
        fd = os.open(path, os.O_RDWR)
        try:
            self._mm = mmap.mmap(fd, _SLOTS * 8)
        finally:
            os.close(fd)
        self._a = np.frombuffer(self._mm, np.int64, _SLOTS).reshape(len(ROUTES), _PER_ROUTE)
        self._lock = ProcessLock(path)

    def observe(self, path: str, status: int, seconds: float, body_bytes: int) -> None:
        r = ROUTES.index(path) if path in ROUTES else len(ROUTES) - 1
        c = 0 if status < 400 else (1 if status < 500 else 2)
        b = int(np.searchsorted(BUCKETS, seconds))
        row = self._a[r]
        with self._lock:
            row[c] += 1
            row[len(CLASSES) + b] += 1
            row[-2] += int(seconds * 1e6)
            row[-1] += body_bytes

    def snapshot(self) -> np.ndarray:
        with self._lock:
            return self._a.copy()

    def close(self, unlink: bool = False) -> None:
        self._lock.close()
        self._a = None
        self._mm.close()
        if unlink:
            try:
                os.unlink(self.path)
            except OSError:
                pass


class MetricsMiddleware:
    """ASGI middleware: time every HTTP request to the end of its body and count it."""

    def __init__(self, app, metrics: ServingMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status, sent = time.perf_counter(), 500, 0

        async def counting_send(message):
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.observe(scope["path"], status, time.perf_counter() - t0, sent)


def _group_families(groups: list[dict]):
    """Per consumer group (actdata.shm.groups): rows read, lag, rows skipped, rows/s."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    fams = (CounterMetricFamily("actdata_group_rows_read", "Rows read by each consumer group", labels=["group"]),
            GaugeMetricFamily("actdata_group_lag_rows", "Rows ready to each group that it has not read",
                              labels=["group"]),
            CounterMetricFamily("actdata_group_rows_skipped", "Rows a lagging group missed (buffer.group_lag=skip)",
                                labels=["group"]),
            GaugeMetricFamily("actdata_group_rows_per_second", "Rows/s read by each group", labels=["group"]))
    for g in groups:
        for fam, key in zip(fams, ("rows_read", "lag", "rows_skipped", "rows_per_s")):
            fam.add_metric([g["name"]], g[key])
    return fams


def render(buffer: SharedActivationBuffer, metrics: ServingMetrics) -> bytes:
    """The Prometheus text exposition of the server's state."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    st, gens, snap = buffer.stats(), read_statuses(buffer.spec), metrics.snapshot()

    class _Collector:
        def collect(self):
            yield CounterMetricFamily("actdata_rows_generated", "Rows written into the buffer", st["rows_written"])
            yield CounterMetricFamily("actdata_rows_served", "Rows read out of the buffer", st["rows_read"])
            yield GaugeMetricFamily("actdata_buffer_fill", "Fraction of the buffer's rows ready to serve", st["fill"])
            yield GaugeMetricFamily("actdata_buffer_ready_rows", "Rows ready to serve", st["ready"])
            yield GaugeMetricFamily("actdata_buffer_capacity_rows", "Rows the buffer holds", st["capacity"])
            state = GaugeMetricFamily("actdata_generator_state", "1 for the state each generator is in",
                                      labels=["generator", "device", "state"])
            restarts = CounterMetricFamily("actdata_generator_restarts", "Restarts of each generator",
                                           labels=["generator"])
            tps = GaugeMetricFamily("actdata_generator_tokens_per_second", "Tokens/s of each generator",
                                    labels=["generator"])
            rps = GaugeMetricFamily("actdata_generator_rows_per_second", "Rows/s of each generator",
                                    labels=["generator"])
            overflow = CounterMetricFamily("actdata_generator_rows_overflowed",
                                           "Rows dropped because they overflowed a float16 buffer (|x| > 65504)",
                                           labels=["generator"])
            for g in gens:
                state.add_metric([g["name"], g["device"], g["state"]], 1)
                restarts.add_metric([g["name"]], g.get("restarts", 0))
                tps.add_metric([g["name"]], g.get("tokens_per_s", 0.0))
                rps.add_metric([g["name"]], g.get("rows_per_s", 0.0))
                overflow.add_metric([g["name"]], g.get("rows_overflowed", 0))
            yield from (state, restarts, tps, rps, overflow)
            reqs = CounterMetricFamily("actdata_http_requests", "HTTP requests by route and status class",
                                       labels=["route", "code"])
            out = CounterMetricFamily("actdata_http_response_bytes", "Response body bytes sent by route",
                                      labels=["route"])
            hist = HistogramMetricFamily("actdata_http_request_duration_seconds",
                                         "Time from request to the end of the response body", labels=["route"])
            for r, route in enumerate(ROUTES):
                row = snap[r]
                for c, cls in enumerate(CLASSES):
                    reqs.add_metric([route, cls], int(row[c]))
                out.add_metric([route], int(row[-1]))
                counts = np.cumsum(row[len(CLASSES):len(CLASSES) + len(BUCKETS)])
                buckets = [("+Inf" if b == float("inf") else repr(b), int(n)) for b, n in zip(BUCKETS, counts)]
                hist.add_metric([route], buckets, sum_value=row[-2] / 1e6)
            yield from (reqs, out, hist)
            yield from _group_families(st["groups"])

    reg = CollectorRegistry()
    reg.register(_Collector())
    return generate_latest(reg)
