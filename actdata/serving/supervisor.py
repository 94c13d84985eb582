"""The main process's watch over its children: HTTP processes, generator workers, the buffer."""
from __future__ import annotations

import logging
import signal
import time
from typing import Optional

from ..shm import sidefiles
from ..shm.sidefiles import publish_json, read_json
from .stopping import STOPPING

log = logging.getLogger(__name__)


class Supervisor:
    """The main process's watch over its children, every `interval` s:

    - HTTP processes (LitServe forks them and does not watch them): one that died is logged with its
      exit status and replaced by a fresh fork on the same listening socket; their pids and restarts are
      published in `<buffer>.http.json` for /stats. More than `max_restarts` within `window_s` is a
      fatal stop (a crash loop), which makes the server exit non-zero.
    - generator worker processes (LitServe's own monitor is off): one that died is logged with its exit
      status and any fatal-signal traceback it left, that cause is written into its status (/stats, GET /
      report it), and it is started again.
    - the buffer: slots held by dead processes are freed, and the published rates updated.
    """

    def __init__(self, server, buffer, interval: float = 0.5, max_restarts: int = 20, window_s: float = 60.0):
        self.server, self.buffer, self.interval = server, buffer, interval
        self.max_restarts, self.window_s = max_restarts, window_s
        self.http_restarts, self.gen_restarts, self.last_death = 0, 0, None
        self.fatal: Optional[str] = None
        self._recent: list[float] = []

    def check(self) -> None:
        self._http()
        self._generators()

    def _died(self, what: str, proc) -> str:
        code = proc.exitcode
        how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 and -code in
               signal.Signals._value2member_map_ else f"exit status {code}")
        self.last_death = f"{what} (pid {proc.pid}) {how} at {time.strftime('%H:%M:%S')}"
        now = time.time()
        self._recent = [t for t in self._recent if now - t < self.window_s] + [now]
        if len(self._recent) > self.max_restarts:
            self.fatal = f"{len(self._recent)} process deaths within {self.window_s:g} s; last: {self.last_death}"
        return self.last_death

    def _http(self) -> None:
        workers = self.server.http_workers
        changed = False
        for i, w in list(workers.items()):
            if w.is_alive() or self.fatal or STOPPING.is_set():
                continue
            w.join(0)
            log.error("%s; starting a new one", self._died(f"HTTP process {i}", w))
            self.server.restart_http_worker(i)
            self.http_restarts += 1
            changed = True
        if workers and (changed or not hasattr(self, "_published")):
            self._published = True
            publish_json(sidefiles.http_processes(self.buffer.spec.path),
                         {"pids": [w.pid for w in workers.values()], "restarts": self.http_restarts,
                          "last_death": self.last_death})

    def _generators(self) -> None:

        procs = self.server.generator_processes()
        if self.fatal or STOPPING.is_set() or not self.server.running():
            return
        for idx, proc in enumerate(procs):
            if proc.is_alive():
                continue
            proc.join(0)
            cause = self._died(f"generator worker {idx}", proc)
            for name, path in sidefiles.generator_statuses(self.buffer.spec.path):
                st = read_json(path) or {}
                if st.get("pid") != proc.pid:
                    continue
                try:
                    with open(sidefiles.generator_crash(self.buffer.spec.path, name)) as f:
                        lines = [x.strip() for x in f.read(4000).splitlines() if x.strip()]
                except OSError:
                    lines = []
                crash = lines[0] if lines else ""
                if crash:
                    cause += f": {crash}"
                    if "Bus error" in crash:
                        cause += " (the buffer's file lost its backing: filesystem or memory full?)"
                st.update(state="dead", death=cause, last_error=cause)
                publish_json(path, st)
            log.error("%s; starting it again", cause)
            self.server.restart_generator(idx)
            self.gen_restarts += 1

