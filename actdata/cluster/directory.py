"""The directory: a small HTTP service on the cluster's head that lists the live actdata servers.

It knows nothing of Ray. Whoever runs the servers (actdata.cluster) tells it `set_member(key, url, ...)`
when a server's URL is known or has changed, `remove_member(key)` when it is gone for good, and
`set_problem(key, reason)` when a node cannot serve (no resources, actor dead). A poller thread reads
each member's `GET /stats` every `poll_interval_s` (one thread per member and round, `timeout` each); a
member is *live* while its last answer is at most `drop_after_s` old, so a server that stops answering
leaves the list within seconds and a new or restarted one appears at its first answer.

Kept per member: key (the node id), url, node_rank, node_ip, extra fields given by the caller, the last
/stats answer (fill, ready, capacity, rates, generators), the time of the last answer and the last error.

Routes (JSON; errors are {"detail": ...}; with an API key every route but GET / needs
`Authorization: Bearer <key>`, as on the servers):
- GET /          cluster health: {"kind": "actdata-directory", "status", "servers" (live), "expected",
                 "serving", "ready", "capacity", "fill", "sample_shape", "dtype", "problems"}
                 (a browser, Accept: text/html first, gets the status page instead: actdata.serving.page; it
                 lists the nodes and opens a node's own page on a click)
- GET /servers   {"servers": [live members, by node_rank], "down": [members not answering], "problems"}
- GET /stats     totals over live servers (rows_written, rows_read, writes_per_s, reads_per_s, ready,
                 capacity) and "servers": the per-server figures
- the data routes (/activations, /activations/tensor) answer 409 naming the servers to read instead.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from .. import __version__, wire
from ..auth import CHALLENGE, WRONG_KEY, authorized, bearer
from ..serving.page import MEDIA_TYPE, page, page_headers, wants_page

log = logging.getLogger(__name__)

KIND = wire.DIRECTORY_KIND  # GET / carries "kind": KIND, which is how clients recognise a directory


class Directory:
    """The member table, its poller and the HTTP service. `start()` returns the URL; `stop()` ends both."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, api_key: Optional[str] = None,
                 poll_interval_s: float = 0.5, drop_after_s: float = 2.0, timeout: float = 1.0,
                 expected: Optional[int] = None):
        self.host, self.port, self.api_key = host, port, api_key
        self.poll_interval_s, self.drop_after_s, self.timeout = poll_interval_s, drop_after_s, timeout
        self.expected = expected
        self._members: dict[str, dict] = {}
        self._problems: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: Optional[ThreadingHTTPServer] = None
        self.url: Optional[str] = None
        self.started = time.time()

    # -- the member table -------------------------------------------------------------------------------

    def set_member(self, key: str, url: str, node_rank: Optional[int] = None, **extra) -> None:
        """Add a server, or change its URL (a restarted server): listed from its first answer on."""
        with self._lock:
            m = self._members.get(key)
            if m is None or m["url"] != url:
                if m is not None:
                    log.info("node %s: server moved from %s to %s", key[:12], m["url"], url)
                self._members[key] = {"key": key, "url": url.rstrip("/"), "node_rank": node_rank,
                                      "stats": None, "last_ok": None, "last_error": None,
                                      "registered_at": time.time(), **extra}
            else:
                m.update(extra)
            self._problems.pop(key, None)

    def remove_member(self, key: str) -> None:
        with self._lock:
            self._members.pop(key, None)

    def set_problem(self, key: str, reason: Optional[str]) -> None:
        """Why node `key` does not serve (None clears it); shown by GET / and GET /servers."""
        with self._lock:
            if reason is None:
                self._problems.pop(key, None)
            else:
                self._problems[key] = reason

    def _live(self, m: dict, now: float) -> bool:
        return m["last_ok"] is not None and now - m["last_ok"] <= self.drop_after_s

    def snapshot(self) -> tuple[list[dict], list[dict], list[dict]]:
        """(live servers, servers not answering, problems), each a list of plain dicts."""
        now = time.time()
        with self._lock:
            members = [dict(m) for m in self._members.values()]
            problems = [{"node_id": k, "reason": r} for k, r in sorted(self._problems.items())]
        live, down = [], []
        for m in sorted(members, key=lambda m: (m["node_rank"] is None, m["node_rank"], m["key"])):
            st = m.pop("stats") or {}
            entry = {"url": m["url"], "node_id": m["key"], "node_rank": m["node_rank"],
                     **{k: v for k, v in m.items() if k not in ("key", "url", "node_rank", "last_ok", "last_error")},
                     "last_seen_s": None if m["last_ok"] is None else round(now - m["last_ok"], 3),
                     "serving": bool(st.get("serving")), "fill": st.get("fill"), "ready": st.get("ready"),
                     "capacity": st.get("capacity"), "rows_per_s_in": st.get("writes_per_s"),
                     "rows_per_s_out": st.get("reads_per_s"), "rows_written": st.get("rows_written"),
                     "rows_read": st.get("rows_read"), "sample_shape": st.get("sample_shape"),
                     "dtype": st.get("dtype"), "generators": [
                         {k: g.get(k) for k in ("name", "state", "rows_per_s", "restarts", "last_error")}
                         for g in st.get("generators", [])],
                     "http_restarts": (st.get("server") or {}).get("http_restarts")}
            if self._live(m, now):
                entry["health"] = _server_health(st)
                live.append(entry)
            else:
                entry["health"] = "down" if m["last_ok"] is not None else "starting"
                entry["last_error"] = m["last_error"]
                down.append(entry)
        return live, down, problems

    # -- the poller -----------------------------------------------------------------------------------

    def _poll_one(self, key: str, url: str) -> None:
        req = urllib.request.Request(url + "/stats", headers={"Accept-Encoding": "identity",
                                                              **bearer(self.api_key)})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                st, err = json.loads(r.read()), None
        except urllib.error.HTTPError as e:
            st, err = None, f"HTTP {e.code}: {e.read()[:200].decode(errors='replace')}"
        except (OSError, ValueError) as e:
            st, err = None, f"{type(e).__name__}: {e}"
        with self._lock:
            m = self._members.get(key)
            if m is None or m["url"] != url:  # replaced meanwhile
                return
            if st is not None:
                m["stats"], m["last_ok"], m["last_error"] = st, time.time(), None
            else:
                m["last_error"] = err

    def _poll_loop(self) -> None:
        with ThreadPoolExecutor(max_workers=16, thread_name_prefix="actdata-dir-poll") as pool:
            while not self._stop.is_set():
                t0 = time.monotonic()
                with self._lock:
                    targets = [(k, m["url"]) for k, m in self._members.items()]
                list(pool.map(lambda kv: self._poll_one(*kv), targets))
                self._stop.wait(max(0.0, self.poll_interval_s - (time.monotonic() - t0)))

    # -- the answers ----------------------------------------------------------------------------------

    def health(self) -> dict:
        live, down, problems = self.snapshot()
        serving = [s for s in live if s["serving"]]
        ready = sum(s["ready"] or 0 for s in live)
        capacity = sum(s["capacity"] or 0 for s in live)
        expected = self.expected if self.expected is not None else len(live) + len(down)
        if not live:
            status = "failed" if problems and not down else ("starting" if down or expected else "empty")
        elif not serving:
            status = "filling"
        elif len(serving) < expected or problems or any(s["health"] != "ok" for s in live):
            status = "degraded"
        else:
            status = "ok"
        first = live[0] if live else {}
        return {"kind": KIND, "status": status, "servers": len(live), "serving_servers": len(serving),
                "expected": expected, "serving": bool(serving), "ready": ready, "capacity": capacity,
                "fill": ready / capacity if capacity else 0.0, "sample_shape": first.get("sample_shape"),
                "dtype": first.get("dtype"), "problems": problems,
                "down": [{"node_id": d["node_id"], "url": d["url"], "health": d["health"],
                          "last_error": d["last_error"]} for d in down],
                "uptime_s": time.time() - self.started, "version": __version__}

    def servers(self) -> dict:
        live, down, problems = self.snapshot()
        return {"kind": KIND, "servers": live, "down": down, "problems": problems}

    def stats(self) -> dict:
        live, _, problems = self.snapshot()
        tot = lambda k: sum(s[k] or 0 for s in live)
        return {"kind": KIND, "servers": live, "server_count": len(live), "problems": problems,
                "rows_written": tot("rows_written"), "rows_read": tot("rows_read"),
                "writes_per_s": tot("rows_per_s_in"), "reads_per_s": tot("rows_per_s_out"),
                "ready": tot("ready"), "capacity": tot("capacity")}

    # -- the service ----------------------------------------------------------------------------------

    def start(self) -> str:
        """Bind, start the poller and the HTTP thread; returns the directory's URL."""
        handler = type("Handler", (_Handler,), {"directory": self})
        server_cls = ThreadingHTTPServer
        if ":" in self.host:
            import socket

            server_cls = type("ThreadingHTTPServer6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
        self._httpd = server_cls((self.host, self.port), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        self.url = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
        threading.Thread(target=self._poll_loop, name="actdata-dir-poller", daemon=True).start()
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                         name="actdata-directory", daemon=True).start()
        return self.url

    def stop(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()


def _server_health(st: dict) -> str:
    """A server's health from its /stats, as its own GET / would say it."""
    states = {g.get("state") for g in st.get("generators", [])}
    if not st.get("serving"):
        return "filling"
    if states & {"failed", "dead", "restarting"}:
        return "degraded"
    return "ok"


class _Handler(BaseHTTPRequestHandler):
    directory: Directory
    protocol_version = "HTTP/1.1"
    server_version = "actdata-directory"

    def log_message(self, fmt, *args):  # no access log on stderr
        pass

    def _send(self, status: int, body, headers: Optional[dict] = None, media_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _route(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        d = self.directory
        if path != "/" and not authorized(self.headers.get("Authorization"), d.api_key):
            return self._send(401, {"detail": WRONG_KEY}, CHALLENGE)
        if self.command not in ("GET", "HEAD"):
            self.close_connection = True  # its body, if any, is not read
            return self._send(405, {"detail": f"{self.command} {path}: the directory answers GET only"})
        if path == "/" and wants_page(self.headers.get("Accept")):
            return self._send(200, page(), page_headers(), MEDIA_TYPE)
        if path == "/":
            return self._send(200, d.health())
        if path == wire.SERVERS_PATH:
            return self._send(200, d.servers())
        if path == "/stats":
            return self._send(200, d.stats())
        if path in (wire.TENSOR_PATH, wire.JSON_PATH):
            urls = [s["url"] for s in d.snapshot()[0]]
            return self._send(409, {"detail": f"this is an actdata directory, not a server: it serves no rows. "
                                              f"Read from its servers (GET /servers: {urls}); "
                                              f"RemoteActivationDataset(<directory URL>) does this for you"})
        return self._send(404, {"detail": f"{path}: not a directory route (GET /, /servers, /stats)"})

    def do_GET(self):
        self._route()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET
