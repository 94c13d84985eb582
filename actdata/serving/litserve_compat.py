"""The one module that touches LitServe's private API, behind a version check and small named methods.

`ActdataLitServer` keeps LitServe's HTTP processes (`http_workers`, index -> Process) where actdata's
supervisor sees them and can replace one that died (`restart_http_worker`: the steps of LitServe's
`_start_server` for one process, forked onto the same listening socket); hands out the generator worker
processes (`generator_processes`, `restart_generator`); turns LitServe's own worker monitor off (actdata
supervises both kinds); drops LitServe's gzip middleware and its own routes (`strip_app`); and stops every
child at once (`_perform_graceful_shutdown`) instead of one after the other.
"""
from __future__ import annotations

import copy
import multiprocessing as mp
import sys
import time
from multiprocessing.process import BaseProcess

import litserve as ls
from starlette.middleware.gzip import GZipMiddleware

SUPPORTED = ((0, 2, 19), (0, 3, 0))  # [from, to): the versions whose private API this module was written for
STOP_WAIT_S = 3.0  # children still alive this long after SIGTERM are killed (plus the workers' own grace)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("+")[0].split(".")[:3] if p.isdigit())


def check_version(version: str = ls.__version__) -> None:
    """One clear line and exit 2 when the installed LitServe is outside SUPPORTED."""
    low, high = SUPPORTED
    if not low <= _version(version) < high:
        print(f"actdata: litserve {version} is not supported (need >= {'.'.join(map(str, low))}, "
              f"< {'.'.join(map(str, high))}: pip install 'litserve>=0.2.19,<0.3')", file=sys.stderr)
        raise SystemExit(2)


check_version()


class ActdataLitServer(ls.LitServer):
    http_workers: dict = {}
    worker_grace_s = 0.0  # how long a generator worker may take to leave after SIGTERM

    def __init__(self, worker: ls.LitAPI, **kw):
        super().__init__(worker, **kw)
        self._monitor_workers = False  # actdata's supervisor watches generator and HTTP processes, and logs deaths
        self.uvicorn_graceful_timeout = 1  # keep-alive clients must not hold a shutdown

    def strip_app(self, keep_paths: tuple[str, ...] = ()) -> None:
        """Drop LitServe's gzip middleware (tensor bytes do not compress) and its routes (/, /health, /info
        and the LitAPI's POST endpoint are not part of actdata's API)."""
        app = self.app
        app.user_middleware = [m for m in app.user_middleware if m.cls is not GZipMiddleware]
        drop = {"/", "/health", "/info", *(api.api_path for api in self.litapi_connector)} - set(keep_paths)
        app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) not in drop]

    def _start_server(self, port, num_uvicorn_servers, log_level, sockets, uvicorn_worker_type, **kwargs):
        self._http_args = (port, log_level, sockets, kwargs)
        self.http_workers = super()._start_server(port, num_uvicorn_servers, log_level, sockets,
                                                  uvicorn_worker_type, **kwargs)
        return self.http_workers  # the same dict: the shutdown stops replacements too

    def restart_http_worker(self, i: int):
        import uvicorn
        from litserve.server import _Server

        port, log_level, sockets, kwargs = self._http_args
        self.app.response_queue_id = i
        for lit_api in self.litapi_connector:
            if lit_api.spec:
                lit_api.spec.response_queue_id = i
        app = copy.copy(self.app)
        self._prepare_app_run(app)
        config = uvicorn.Config(app=app, host="0.0.0.0", port=port, log_level=log_level,
                                timeout_graceful_shutdown=self.uvicorn_graceful_timeout, **kwargs)
        w = mp.get_context("fork").Process(target=_Server(config=config).run, args=(i, sockets), name=f"LitServer-{i}")
        w.start()
        self.http_workers[i] = w
        return w

    def running(self) -> bool:
        """Whether run() has started the workers (and not yet torn them down)."""
        return getattr(self, "_shutdown_event", None) is not None

    def generator_processes(self) -> list:
        """The generator worker processes, by index (a list the supervisor may replace entries of)."""
        return getattr(self, "inference_workers", None) or []

    def restart_generator(self, idx: int):
        """Start generator worker idx again (its LitAPI's setup runs anew in a fresh process)."""
        proc = self.launch_single_inference_worker(self.litapi_connector.lit_apis[0], idx)
        self.inference_workers[idx] = proc
        return proc

    def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason: str = "normal"):
        """SIGTERM every HTTP process and generator worker at once and wait for them together (LitServe
        waits for each in turn), then stop the manager; the transport has no sentinel reader to wait for."""
        self._transport.close(send_sentinel=False)
        procs = [p for p in [*uvicorn_workers.values(), *self.inference_workers] if isinstance(p, BaseProcess)]
        for p in procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + STOP_WAIT_S + self.worker_grace_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(1.0)
        manager.shutdown()
