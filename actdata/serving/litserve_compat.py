"""The one module that touches LitServe's private API."""
from __future__ import annotations

import litserve as ls

class ActdataLitServer(ls.LitServer):
    """LitServer that keeps its HTTP processes (`http_workers`, index -> Process) where actdata's
    supervisor (actdata.serve) can see them, and can start a replacement for one that died
    (`restart_http_worker`: the same steps as LitServe's `_start_server` for one process, forked from
    this process onto the same listening socket). LitServe itself does not watch them. Generator
    workers are supervised there too (LitServe's own monitor is turned off)."""

    http_workers: dict = {}

    def _start_server(self, port, num_uvicorn_servers, log_level, sockets, uvicorn_worker_type, **kwargs):
        self._http_args = (port, log_level, sockets, kwargs)
        self.http_workers = super()._start_server(port, num_uvicorn_servers, log_level, sockets,
                                                  uvicorn_worker_type, **kwargs)
        return self.http_workers  # the same dict: LitServe's shutdown terminates replacements too

    def restart_http_worker(self, i: int):
        import copy
        import multiprocessing as mp

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


