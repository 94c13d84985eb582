"""Process plumbing shared by the server's processes: logging to console and file, and making sure
no child outlives the server (parent-death signal, descendants killed on shutdown)."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from typing import Optional

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
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
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
    unlinks the semaphores of the processes it tracked and leaves by itself (killing it leaked one
    /dev/shm/sem.mp-* per start)."""
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
            pids = [p for p in pids if _exists(p)]
            if not pids:
                return
            time.sleep(0.05)


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def _exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


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


def publish_json(path: str, obj: dict) -> Optional[str]:
    """Publish `obj` as JSON at `path` for other processes; returns None, or the error text when it
    could not be written. Written to a temporary file and renamed (readers never see half a file);
    when that fails for lack of space (ENOSPC/EDQUOT on a full disk or tmpfs), the existing file is
    overwritten in place instead, within its first (already allocated) 4 KB page, which needs no new
    space. Never raises OSError: status reporting must not kill its caller."""
    import errno
    import json

    text = json.dumps(obj, default=str).encode()
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(text)
        os.replace(tmp, path)
        return None
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            return f"{path}: {e.strerror}"
        first = f"{path}: {e.strerror} (errno {errno.errorcode.get(e.errno, e.errno)})"
    try:  # in place: pad with spaces to the old length so no byte beyond what exists is needed
        fd = os.open(path, os.O_WRONLY)
        try:
            size = os.fstat(fd).st_size
            if len(text) > max(size, 4096):
                return first
            os.pwrite(fd, text + b" " * max(0, size - len(text)), 0)
        finally:
            os.close(fd)
    except OSError:
        pass
    return first


def read_json(path: str, attempts: int = 3) -> Optional[dict]:
    """A JSON object published with `publish_json`, or None (missing or unreadable)."""
    import json

    for _ in range(attempts):  # an in-place update may be seen half written: read again
        try:
            with open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            time.sleep(0.001)
    return None
