"""The files beside a buffer file, defined once: their names, and how JSON ones are published and read.

For a buffer file `B` (a segment in /dev/shm, or a file on a given path):

    B.owner                       flock-ed by the server that created B for as long as it lives
    B.http.json                   the HTTP processes' pids and restarts (the server's supervisor)
    B.metrics                     serving counters shared by every HTTP process (actdata.serving.metrics)
    B.history.json                rows/s in and out and fill over the last minutes (actdata.serving.history)
    B.gen-<name>.json             a generator's status (state, rates, counters, last error)
    B.gen-<name>.crash            the traceback a generator's fatal signal left (faulthandler)
    B.stats-<name>.safetensors    a generator's running statistics

They go with the buffer: removed when it is, and reclaimed with it when its server was killed.
"""
from __future__ import annotations

import errno
import fcntl
import glob
import json
import os
import time
from typing import Optional

LOCK_WAIT_S = 0.2  # longest wait for the lock of a file being rewritten in place; then go ahead without it


def owner_lock(path: str) -> str:
    return path + ".owner"


def http_processes(path: str) -> str:
    return path + ".http.json"


def metrics(path: str) -> str:
    return path + ".metrics"


def rate_history(path: str) -> str:
    return path + ".history.json"


def generator_status(path: str, name: str) -> str:
    return f"{path}.gen-{name}.json"


def generator_crash(path: str, name: str) -> str:
    return f"{path}.gen-{name}.crash"


def generator_stats(path: str, name: str) -> str:
    return f"{path}.stats-{name}.safetensors"


def _named(path: str, make) -> list[tuple[str, str]]:
    """(name, file) of every file `make(path, name)` names, sorted by name."""
    head, tail = make(path, "\0").split("\0")
    found = glob.glob(glob.escape(head) + "*" + glob.escape(tail))
    return sorted((f[len(head):len(f) - len(tail)], f) for f in found)


def generator_statuses(path: str) -> list[tuple[str, str]]:
    """(generator name, status file) of every generator of the buffer at `path`."""
    return _named(path, generator_status)


def generator_stats_files(path: str) -> list[tuple[str, str]]:
    """(generator name, statistics file) of every generator of the buffer at `path`."""
    return _named(path, generator_stats)


def all_of(path: str) -> list[str]:
    """Every side file of the buffer at `path` that exists."""
    return glob.glob(glob.escape(path) + ".*")


def publish_json(path: str, obj: dict) -> Optional[str]:
    """Publish `obj` as JSON at `path` for other processes; returns None, or the error text when it
    could not be written. Written to a temporary file and renamed (readers never see half a file);
    when that fails for lack of space (ENOSPC/EDQUOT on a full disk or tmpfs), the existing file is
    overwritten in place instead, within its first (already allocated) 4 KB page, which needs no new
    space, under an exclusive lock that `read_json` waits for, so no reader sees it half written.
    Never raises OSError: status reporting must not kill its caller."""
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
            locked = _lock(fd, fcntl.LOCK_EX)  # readers (read_json) wait for the whole text
            try:
                os.pwrite(fd, text + b" " * max(0, size - len(text)), 0)
            finally:
                if locked:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    except OSError:
        pass
    return first


def _lock(fd: int, how: int) -> bool:
    """flock `fd` within LOCK_WAIT_S (a holder stopped mid-write must not hang the other side); whether held."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        except OSError:
            return False


_last_good: dict[str, dict] = {}  # per file, this process's last whole reading


def read_json(path: str, attempts: int = 3) -> Optional[dict]:
    """A JSON object published with `publish_json`, or None when the file is missing. A file being
    rewritten in place (a full disk) is read under a shared lock, so a reader waits for the whole text;
    the lock not come within LOCK_WAIT_S (a writer stalled mid-write) or the text not parse, this
    process's last whole reading of the file is returned (None if there was none): a reader never loses
    a file that exists for a moment of a rewrite."""
    for _ in range(attempts):
        try:
            with open(path, "rb") as f:
                locked = _lock(f.fileno(), fcntl.LOCK_SH)
                if not locked and path in _last_good:  # a writer stalled mid-write: even valid JSON may be torn
                    return _last_good[path]
                try:
                    obj = json.loads(f.read())
                finally:
                    if locked:
                        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            if len(_last_good) > 256:  # side files of buffers long gone
                _last_good.clear()
            _last_good[path] = obj
            return obj
        except FileNotFoundError:
            _last_good.pop(path, None)
            return None
        except (OSError, ValueError):
            time.sleep(0.001)
    return _last_good.get(path)
