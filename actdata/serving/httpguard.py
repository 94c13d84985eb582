"""Protections in the HTTP layer itself, below the ASGI app: what a connection may cost a process.

`guarded_protocol(limits)` returns a subclass of uvicorn's httptools protocol (passed to uvicorn as its
`http` class) that keeps, per connection, the bytes received and the time spent since the request
started, and per process the connections that are still waiting for a complete request head:

- header size: a request head larger than `max_header_bytes` gets 431 and the connection is closed as
  soon as that many bytes have arrived (the parser never buffers more than that plus one socket read);
- header time: a connection that has not completed its request head within `header_timeout_s` of
  connecting (or of its previous response) gets 408 and is closed (slow-header clients);
- connections: at most `max_connections` per process (below the open-file limit, so `accept` never
  fails with EMFILE); a new connection beyond it evicts the oldest one still waiting for its first
  request head, or is dropped when there is none;
- in-flight requests: beyond `max_inflight` running requests a new one gets a fast 503 + Retry-After;
- send time: a response whose transport stays paused (the client does not read) for `send_timeout_s`
  is aborted, which frees its write buffer and lets the route release its memory.

Idle keep-alive connections are closed by uvicorn's own `timeout_keep_alive`.
"""
from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 64 << 10
    header_timeout_s: float = 10.0
    max_connections: int = 900
    max_inflight: int = 256
    send_timeout_s: float = 30.0
    retry_after_s: int = 1


class Counters:
    """Per-process counts of what the guard refused (read by /stats)."""

    header_too_large = header_timeouts = evicted = dropped = busy = send_timeouts = 0

    @classmethod
    def as_dict(cls) -> dict:
        return {k: getattr(cls, k) for k in ("header_too_large", "header_timeouts", "evicted", "dropped",
                                             "busy", "send_timeouts")}


def _plain(status: int, reason: str, detail: str, extra: bytes = b"") -> bytes:
    body = json.dumps({"detail": detail}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n").encode() + extra + b"\r\n" + body


def guarded_protocol(limits: Limits) -> type:
    """A uvicorn HTTP protocol class enforcing `limits` (see the module docstring)."""
    waiting: "OrderedDict[object, float]" = OrderedDict()  # connections before their first request head
    busy_body = json.dumps({"detail": "server busy: too many requests in flight; retry"}).encode()
    retry_header = str(limits.retry_after_s).encode()

    async def busy_app(scope, receive, send):
        Counters.busy += 1
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", retry_header),
                                (b"content-length", str(len(busy_body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": busy_body})

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_bytes, self._in_head, self._served = 0, True, False
            self._head_timer = self.loop.call_later(limits.header_timeout_s, self._head_timeout)
            self._send_timer = None
            waiting[self] = time.monotonic()
            if len(self.connections) > limits.max_connections:
                victim = next((c for c in waiting if c is not self), None)
                if victim is None:
                    Counters.dropped += 1
                    self._close()
                else:
                    Counters.evicted += 1
                    victim._close()

        def _close(self) -> None:
            waiting.pop(self, None)
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc) -> None:
            waiting.pop(self, None)
            for timer in (self._head_timer, self._send_timer):
                if timer is not None:
                    timer.cancel()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            if self._in_head and self._head_bytes > limits.max_header_bytes and not self.transport.is_closing():
                Counters.header_too_large += 1
                self.transport.write(_plain(431, "Request Header Fields Too Large",
                                            f"request headers exceed {limits.max_header_bytes} bytes"))
                self._close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if not self._in_head:  # a further request on a kept-alive connection
                self._in_head, self._head_bytes = True, 0
                if self._head_timer is None:
                    self._head_timer = self.loop.call_later(limits.header_timeout_s, self._head_timeout)

        def on_headers_complete(self) -> None:
            self._in_head = False
            waiting.pop(self, None)
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            if len(self.tasks) >= limits.max_inflight:
                app, self.app = self.app, busy_app
                try:
                    super().on_headers_complete()
                finally:
                    self.app = app
                return
            super().on_headers_complete()

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self._in_head and not self.transport.is_closing():
                Counters.header_timeouts += 1
                if self._head_bytes:  # a client that started a request gets told why
                    self.transport.write(_plain(408, "Request Timeout",
                                                f"request head not complete within {limits.header_timeout_s:g} s"))
                self._close()

        def on_response_complete(self) -> None:
            self._served = True
            super().on_response_complete()
            if not self.transport.is_closing() and self._in_head is False and not self.pipeline:
                self._head_bytes = 0

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._send_timer is None:
                self._send_timer = self.loop.call_later(limits.send_timeout_s, self._send_timeout)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None

        def _send_timeout(self) -> None:
            self._send_timer = None
            if self.flow is not None and self.flow.write_paused and not self.transport.is_closing():
                Counters.send_timeouts += 1
                log.info("aborting a response the client did not read for %g s", limits.send_timeout_s)
                self.transport.abort()

    return GuardedHttpToolsProtocol
