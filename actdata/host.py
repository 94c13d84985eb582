"""Facts about this machine and its processes, asked the same way everywhere: is a pid alive, which
host and PID namespace is this, how much memory is free, which filesystem holds a path, where caches go."""
from __future__ import annotations

import os
import socket
from typing import Optional


def _stat_fields(pid: int) -> Optional[list[str]]:
    """Fields of /proc/<pid>/stat after the command name (state first), or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie (a pid that cannot be one counts as gone)."""
    if not isinstance(pid, int) or pid <= 0:  # kill(0 or -1, 0) would ask about whole groups
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, ValueError, OverflowError):
        return False
    except PermissionError:
        return True
    fields = _stat_fields(pid)
    return fields is None or fields[0] != "Z"


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
                out.append(int(entry))
    return out


def children_of() -> dict[int, list[int]]:
    """{parent pid: [child pids]} of every process, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def host_identity() -> str:
    """This machine and process namespace as one string: hostname, kernel boot id, PID-namespace inode.
    Two processes with the same identity share pids (claims of a dead reader can be reclaimed) and, when
    they open a buffer file with the same header nonce, its memory."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    try:
        pidns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pidns = "?"
    return f"{socket.gethostname()}/{boot}/{pidns}"


def mem_available() -> Optional[int]:
    """MemAvailable from /proc/meminfo, in bytes (None where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def backing_fs(path: str) -> str:
    """The filesystem type holding `path` (from /proc/mounts, longest mount point), '' if unknown."""
    path = os.path.realpath(path)
    best, fs = "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, fs = mnt, parts[2]
    except OSError:
        pass
    return fs


def cache_root() -> str:
    """$ACTDATA_CACHE, else $XDG_CACHE_HOME/actdata, else ~/.cache/actdata: the embedded model, saved states."""
    if os.environ.get("ACTDATA_CACHE"):
        return os.environ["ACTDATA_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "actdata")
