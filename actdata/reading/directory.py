"""Trainers' side of a cluster: find the servers behind a directory URL and keep reading when one dies.

No Ray here (nor anything of the serving side): a directory is plain HTTP (see actdata.cluster.directory).

- `is_directory(url)`: `GET /` answers `"kind": "actdata-directory"` (a server's `GET /` has no such kind).
- `DirectoryClient(url)`: `health()`, `servers()`, `serving_urls()`; a server URL given here raises
  `NotADirectory` with a one-line explanation instead of waiting.
- `DirectoryReader(url, shard, shards)`: what `RemoteActivationDataset` uses for a directory URL, with
  the `fetch(n, empty, out)` / `close()` interface of `TensorReader`. It keeps a `TensorReader` per
  server of its share (the same rule as for a list of URLs: with at least as many shards as serving
  servers, shard i reads server i % n, else servers i, i + shards, ... in turn), refreshes the server
  list every `refresh_s`, and when a server fails for `server_retry_s` it sets that URL aside for
  `cooldown_s`, asks the directory again and reads from another (a server that answers 503, short of
ready rows, is not set aside: the next one is read). Only when no server has served for
  `retry_for_s` does `ServerUnavailable` reach the caller. Serve-once holds per server.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Callable, Optional

from .. import wire
from ..auth import bearer, resolve_api_key
from .failures import ActivationServerError, RetryPolicy, ServerUnavailable, Transient
from .sharding import share
from .tensor_reader import TensorReader


class NotADirectory(ActivationServerError):
    """The URL answers, but not as an actdata directory (e.g. a server's URL)."""


def _get_json(url: str, api_key: Optional[str], timeout: float) -> dict:
    """GET a JSON object; 4xx -> ActivationServerError; connection errors and 5xx -> ServerUnavailable."""
    req = urllib.request.Request(url, headers={"Accept-Encoding": "identity", **bearer(api_key)})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
    except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode(errors="replace")
        try:
            detail = json.loads(detail).get("detail", detail)
        except (ValueError, AttributeError):
            pass
        cls = ServerUnavailable if e.code >= 500 else ActivationServerError
        raise cls(f"GET {url} -> HTTP {e.code}: {detail}", url=url, status=e.code, detail=str(detail)) from None
    except (OSError, ValueError) as e:
        raise ServerUnavailable(f"GET {url}: {type(e).__name__}: {e}", url=url, detail=str(e)) from None
    try:
        d = json.loads(body)
    except ValueError:
        raise NotADirectory(f"GET {url}: the answer is not JSON, so this is not an actdata directory", url=url,
                            status=200) from None
    if not isinstance(d, dict):
        raise NotADirectory(f"GET {url}: the answer is not a JSON object", url=url, status=200)
    return d


def is_directory(url: str, api_key: Optional[str] = None, timeout: float = 10.0, retry_for_s: float = 30.0) -> bool:
    """True when `url` is an actdata directory; False for anything else that answers `GET /`. Connection
    errors are retried for `retry_for_s` seconds, then `ServerUnavailable`."""
    retry, root = RetryPolicy(retry_for_s), url.rstrip("/") + "/"

    def attempt():
        try:
            return _get_json(root, resolve_api_key(api_key), timeout).get("kind") == wire.DIRECTORY_KIND
        except ServerUnavailable as e:
            raise Transient(str(e), status=e.status) from None
        except ActivationServerError:  # not JSON, or a 4xx on GET /: whatever it is, not a directory
            return False

    return retry.run(attempt, url, "GET / of")


class DirectoryClient:
    """The read-only API of a directory: `health()` (GET /), `servers()` (GET /servers)."""

    def __init__(self, url: str, api_key: Optional[str] = None, timeout: float = 10.0):
        self.url = url.rstrip("/") if "://" in url else "http://" + url.rstrip("/")
        self.api_key, self.timeout = resolve_api_key(api_key), float(timeout)
        self._checked = False

    def health(self) -> dict:
        d = _get_json(self.url + "/", self.api_key, self.timeout)
        if d.get("kind") != wire.DIRECTORY_KIND:
            hint = (" It is an actdata server: give it to RemoteActivationDataset / ActivationClient directly."
                    if "sample_shape" in d and "serving" in d else "")
            raise NotADirectory(f"{self.url} is not an actdata directory (GET / has no \"kind\": "
                                f"\"{wire.DIRECTORY_KIND}\").{hint}", url=self.url, status=200)
        self._checked = True
        return d

    def servers(self) -> list[dict]:
        """The live servers (dicts with url, node_id, node_rank, serving, fill, ...), by node_rank."""
        if not self._checked:
            self.health()  # a server URL: one clear error rather than a 404 from GET /servers
        return _get_json(self.url + wire.SERVERS_PATH, self.api_key, self.timeout)["servers"]

    def serving_urls(self) -> list[str]:
        """Servers past their first fill: serving now, or drained below min_fill after having served
        (serve-once and generation-bound: that is a short wait, not a reason to move elsewhere)."""
        return [s["url"] for s in self.servers() if s.get("serving") or (s.get("rows_read") or 0) > 0]


class DirectoryReader:
    """`fetch(n, empty, out)` from the servers a directory lists, moving on when one fails (see module doc)."""

    def __init__(self, url: str, index: int, shards: int, api_key: Optional[str] = None, timeout: float = 60.0,
                 retry_for_s: float = 120.0, rcvbuf: Optional[int] = None, refresh_s: float = 2.0,
                 server_retry_s: float = 1.0, cooldown_s: float = 5.0, group: Optional[str] = None):
        self.directory = DirectoryClient(url, api_key, timeout=min(timeout, 10.0))
        self.url, self.index, self.shards = self.directory.url, index, shards
        self.api_key, self.timeout, self.rcvbuf = resolve_api_key(api_key), timeout, rcvbuf
        self.retry_for_s, self.refresh_s = float(retry_for_s), float(refresh_s)
        self.server_retry_s, self.cooldown_s = float(server_retry_s), float(cooldown_s)
        self.group = group  # the consumer group read as on every server (each server keeps its own groups)
        self._readers: dict[str, TensorReader] = {}
        self._order: list[str] = []
        self._set_aside: dict[str, float] = {}  # url -> until when it is not read
        self._refreshed_at = -1e9
        self._turn = 0
        self.switches = 0  # times this reader moved away from a failed server
        self.points: Optional[str] = None  # a selection's query text, sent to every server (actdata.points)

    def _refresh(self) -> None:
        now = time.monotonic()
        self._refreshed_at = now
        self._set_aside = {u: t for u, t in self._set_aside.items() if t > now}
        urls = [u for u in self.directory.serving_urls() if u not in self._set_aside]
        mine = share(urls, self.index, self.shards)
        for u in list(self._readers):
            if u not in mine:
                self._readers.pop(u).close()
        for u in mine:
            if u not in self._readers:
                self._readers[u] = TensorReader(u, self.api_key, timeout=self.timeout,
                                                retry=RetryPolicy(self.server_retry_s), rcvbuf=self.rcvbuf,
                                                group=self.group, points=self.points)
        self._order = mine

    def first_server(self) -> str:
        """A serving server of this directory (waiting up to retry_for_s for one): its /stats tells the
        row format and the per-request maximum, the same on every server of a cluster."""
        deadline = time.monotonic() + self.retry_for_s
        while True:
            urls = self.directory.serving_urls()
            if urls:
                return urls[0]
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"directory {self.url} listed no serving server for {self.retry_for_s:g} s",
                                        url=self.url)
            time.sleep(0.5)

    def fetch_provenance(self, num_samples: int):
        raise ActivationServerError(f"{self.url}: provenance through a cluster directory is not supported; "
                                    "read each server's URL instead", url=self.url)

    def fetch(self, num_samples: int, empty: Optional[Callable] = None, out=None):
        first_failure, last_error = None, "the directory lists no serving server"
        while True:
            now = time.monotonic()
            if now - self._refreshed_at >= self.refresh_s or not self._order:
                try:
                    self._refresh()
                except ServerUnavailable as e:  # the directory itself is down: keep the servers we know
                    last_error = f"directory: {e}"
            if self._order:
                u = self._order[self._turn % len(self._order)]
                self._turn += 1
                try:
                    return self._readers[u].fetch(num_samples, empty=empty, out=out)
                except ServerUnavailable as e:
                    last_error = str(e)
                    if e.status != 503:  # a 503 server is alive, only short of ready rows: just read the next
                        self._set_aside[u] = time.monotonic() + self.cooldown_s
                        self._readers.pop(u).close()
                        self._order = [x for x in self._order if x != u]
                        self._refreshed_at = -1e9  # ask the directory again before the next attempt
                        self.switches += 1
            else:
                time.sleep(0.2)
            now = time.monotonic()
            first_failure = first_failure if first_failure is not None else now
            if now - first_failure > self.retry_for_s:
                raise ServerUnavailable(f"no server of directory {self.url} served for {self.retry_for_s:g} s "
                                        f"(retry_for_s); last error: {last_error}", url=self.url, detail=last_error)

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers, self._order = {}, []
