"""Process plumbing shared by the server's processes: logging to console and file, and making sure
no child outlives the server (parent-death signal, descendants killed on shutdown)."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Optional

from ..host import children_of, pid_alive

_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def setup_logging(level: str = "INFO", log_file: Optional[str] = None) -> None:
    """Console (stderr) and, when given, an appended log file; idempotent per process."""
    root = logging.getLogger("actdata")
    root.setLevel(level.upper())
    root.propagate = False
    if getattr(root, "_actdata_pid", None) == os.getpid():
        return
    root.handlers.clear()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(console)
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(fh)
    root._actdata_pid = os.getpid()


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (so a SIGKILLed server leaves no
    orphans). A no-op elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, sig)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc), children first."""
    children = children_of()
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _is_resource_tracker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"multiprocessing.resource_tracker" in f.read()
    except OSError:
        return False


def kill_descendants(timeout: float = 1.5) -> None:
    """SIGTERM every descendant of this process, then SIGKILL those left after `timeout`. The
    multiprocessing resource tracker is spared: it ignores SIGTERM, and once this process exits it
    unlinks the semaphores of the processes it tracked and leaves by itself (killed, it would leave them
    in /dev/shm)."""
    pids = [p for p in descendants(os.getpid()) if not _is_resource_tracker(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        while time.time() < deadline:
            _reap()
            pids = [p for p in pids if pid_alive(p)]
            if not pids:
                return
            time.sleep(0.05)


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def release_after_exit(path: str) -> None:
    """Hold `path` open in a detached helper (`cat` on a pipe only this process writes to) until this
    process has exited, so that the kernel frees the file's pages and blocks there once the last mapping
    is gone: for gigabytes on a disk that takes seconds, which would otherwise hold up the stop. Call it
    before the file is unlinked and unmapped; without `cat` the release happens here, as before."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    r, w = os.pipe()
    try:
        subprocess.Popen(["cat"], stdin=r, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(fd,),
                         start_new_session=True)
        _HELD.append(w)  # closed by this process's exit: the helper's end of file
    except OSError:
        os.close(w)
    finally:
        os.close(r)
        os.close(fd)


_HELD: list[int] = []


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft open-file limit to its hard limit (children inherit it); returns
    (soft, hard) after the change. Each client connection costs an HTTP process one descriptor."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard
