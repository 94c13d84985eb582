"""A lock across processes and threads (flock on a file, dropped by the kernel if its holder dies)."""
from __future__ import annotations

import fcntl
import os
import threading


class ProcessLock:
    """Exclusive lock across processes (flock) and threads; re-opened after fork, freed if a holder dies."""

    def __init__(self, path: str):
        self.path, self._pid, self._fd, self._thread_lock = path, None, None, threading.Lock()

    def __enter__(self):
        if self._pid != os.getpid():  # first use in this process (or after fork): own descriptor
            self._thread_lock = threading.Lock()
            self._fd, self._pid = os.open(self.path, os.O_RDWR), os.getpid()
        self._thread_lock.acquire()
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()

    def close(self):
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._pid = None

