"""`ServerProcess`: the server in a child process, for Python callers, tests and benchmarks."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Optional

from ..host import group_pids
from .stopping import EXIT_WITH_PARENT


class ServerProcess:
    """The server in a child process (its own session), for Python callers, tests and benchmarks:

        with ServerProcess(["+preset=test", "generator.source=synthetic"]) as srv:
            ActivationClient(srv.url)...

    The port defaults to 0 (any free port); `url` is read from the server's ready file. `stop()` sends
    SIGTERM and waits; whatever is left of its process group after `timeout` is killed. With
    `die_with_parent`, the server is sent SIGTERM when the calling process dies (a Ray actor's server).
    `wrapper`: a command prefix such as ["prlimit", "--nofile=1024:1024", "--"] or ["unshare", "--pid", "--fork", ...].
    """

    def __init__(self, overrides: list[str] = (), timeout: float = 180.0, env: Optional[dict] = None,
                 log_path: Optional[str] = None, die_with_parent: bool = False, wrapper: list[str] = ()):
        import subprocess
        import tempfile

        self._dir = tempfile.mkdtemp(prefix="actdata-server-")
        self.ready_file = os.path.join(self._dir, "ready.json")
        self.log_path = log_path or os.path.join(self._dir, "server.log")
        args = list(overrides)
        if not any(a.startswith("server.port=") for a in args):
            args.append("server.port=0")
        if not any(a.startswith("server.log_file=") for a in args):
            args.append("server.log_file=null")
        args.append(f"server.ready_file={self.ready_file}")
        self._log = open(self.log_path, "ab")
        from .procs import die_with_parent as _pdeathsig  # imported before the fork: preexec_fn runs in the child

        self.proc = subprocess.Popen([*wrapper, sys.executable, "-m", "actdata.serve", *args], stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {}),
                                          **({EXIT_WITH_PARENT: "1"} if die_with_parent else {})},
                                     start_new_session=True,
                                     preexec_fn=_pdeathsig if die_with_parent else None)
        self.url, self.port = None, None
        deadline = time.time() + timeout
        while time.time() < deadline:
            if os.path.exists(self.ready_file):
                with open(self.ready_file) as f:
                    info = json.load(f)
                self.url, self.port = info["url"], info["port"]
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        code, tail = self.proc.poll(), self.log_tail()
        self.stop()
        raise RuntimeError(f"server did not start (exit code {code}); log:\n{tail}")

    def log_tail(self, n: int = 4000) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM the server, wait for it; returns its exit code."""
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        deadline = time.time() + 2.0  # the resource tracker leaves by itself once the server is gone
        while code is not None and time.time() < deadline and group_pids(self.proc.pid):
            time.sleep(0.02)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything of its group still alive
        except (ProcessLookupError, PermissionError):
            pass
        if code is None:
            code = self.proc.wait(5)
        self._log.close()
        return code

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

