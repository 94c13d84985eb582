"""Buffer files: where they are made, that their space exists, who owns them, and reclaiming the
files of servers that were killed.

A buffer file is named `<prefix>-<pid>-<random>.buf` so that a later start recognises the segments of
its kind. Its server holds an exclusive flock on `<file>.owner` for as long as it lives; the kernel drops
the lock however the server dies, in whatever PID namespace, so a file whose owner lock is free belongs
to nobody and is removed with its side files. Space is checked before anything is allocated: a tmpfs
that is too small would otherwise kill a writer with SIGBUS later.
"""
from __future__ import annotations

import fcntl
import os
import re
import time

from ..host import backing_fs, mem_available
from . import sidefiles

SHM_DIR = "/dev/shm"
_SPACE_ERRNOS = (28, 12, 122)  # ENOSPC, ENOMEM, EDQUOT


class BufferSpaceError(RuntimeError):
    """The filesystem behind the buffer has less free space than the buffer needs. From `write`: no
    space for the slots being written (`done` rows were written before); writing can resume later."""

    done = 0


def reserve(fd: int, offset: int, length: int, path: str) -> None:
    """posix_fallocate a byte range, as a BufferSpaceError naming the filesystem when space is short."""
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as e:
        if e.errno in _SPACE_ERRNOS:
            where = os.path.dirname(path) or "."
            ram = " (a tmpfs: its space is RAM)" if backing_fs(where) in ("tmpfs", "ramfs") else ""
            raise BufferSpaceError(f"no space left on {where}{ram} for the buffer ({e.strerror}); "
                                   f"lower buffer.size or free space") from None
        if e.errno in (95, 22):  # EOPNOTSUPP / EINVAL: a filesystem without fallocate: stays sparse
            return
        raise


def check_space(path: str, nbytes: int) -> None:
    """Raise BufferSpaceError when the filesystem holding `path` cannot hold `nbytes` more. A tmpfs
    (such as /dev/shm) is RAM: its free space counts only up to the memory available right now."""
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    st = os.statvfs(directory)
    free, what = st.f_bavail * st.f_frsize, "free"
    if backing_fs(directory) in ("tmpfs", "ramfs", "shm"):
        avail = mem_available()
        if avail is not None and avail < free:
            free, what = avail, "free (the memory available: a tmpfs lives in RAM)"
    if nbytes > free:
        raise BufferSpaceError(
            f"buffer.size: the buffer needs {nbytes / 1e9:.2f} GB but {directory} has {free / 1e9:.2f} GB {what}; "
            "lower buffer.size or point buffer.path at a larger filesystem")


def segment_name(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{os.urandom(4).hex()}.buf"


def hold_owner_lock(path: str) -> int:
    """Create `<path>.owner` already locked (made under a temporary name, locked, then renamed, so no
    one ever sees it unlocked) and return its descriptor; the lock lasts while this process or a forked
    child keeps the descriptor open, and the kernel drops it when they die."""
    final = sidefiles.owner_lock(path)
    tmp = f"{final}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, final)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return fd


def owner_alive(path: str) -> bool:
    """Whether the server that created buffer file `path` still holds its owner lock. A file without an
    owner lock was never completed by its creator, or lost its owner: it counts as owned by nobody."""
    try:
        fd = os.open(sidefiles.owner_lock(path), os.O_RDWR)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: leave it alone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock, if we got it
    return False


def remove(path: str) -> list[str]:
    """Unlink a buffer file and its side files; returns the names removed."""
    removed = []
    for p in [path, *sidefiles.all_of(path)]:
        try:
            os.unlink(p)
            removed.append(os.path.basename(p))
        except OSError:
            pass
    return removed


def reclaim_stale(directory: str, prefix: str) -> list[str]:
    """Unlink buffer files of `prefix` (and their side files) whose owner is gone: nobody holds the
    owner lock (see `owner_alive`). Side files whose buffer file is gone are removed too, once they are
    a few seconds old (a creation may be under way)."""
    pattern = re.compile(rf"^({re.escape(prefix)}-\d+-[0-9a-f]+\.buf)(\..+)?$")
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    bases = {m.group(1) for m in map(pattern.match, names) if m}
    removed = []
    for base in sorted(bases):
        path = os.path.join(directory, base)
        if owner_alive(path):
            continue
        if os.path.exists(path):
            try:
                young = time.time() - os.stat(path).st_mtime < 10 and not os.path.exists(sidefiles.owner_lock(path))
            except OSError:
                continue
            if not young:  # a file without its lock yet may be a creation under way
                removed += remove(path)
            continue
        try:
            if any(time.time() - os.stat(p).st_mtime < 10 for p in sidefiles.all_of(path)):
                continue
        except OSError:
            continue
        removed += remove(path)
    return removed
