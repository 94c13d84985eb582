"""The same-host path: a trainer on the server's machine claims rows from the server's buffer itself.

When a trainer runs beside the server (the common single-GPU box), the TCP hop is pure overhead. The
server publishes in `GET /stats` (`server.same_host`) its buffer file, a host identity
(`actdata.host.host_identity`), its main process's pid, the random nonce in the buffer's header and
the layout it computed.
`open_same_host(published)` attaches to that file only when all of these hold, and otherwise says why:

    identity    this process's host identity equals the server's (same machine, same PID namespace, so
                the server can reclaim the claims of a trainer that died)
    layout      this actdata computes the server's data offset and file size (same buffer version)
    access      the file opens read-write: the file's permissions are the access control. The server
                creates it owner-only (0600), so only the server's own user gets this path; with an API key
                set, every other user reads over HTTP and needs the key
    nonce       the header's nonce is the published one (the server's own file, not one of the same name
                in another container's /dev/shm)

Reading (`SameHostReader.read`) is the buffer's own protocol, the one the HTTP routes use: claim k random
READY slots under the buffer's lock (`min_fill`, serve-once and `max_reads` hold across HTTP and same-host
readers alike), gather the rows straight into the batch being built, release the slots. Claims carry this
process's pid, so the server frees them if the trainer dies mid-read. Rows read here count in the
buffer's `rows_read` but not in the HTTP metrics.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Optional

import torch

from ..host import host_identity, pid_alive
from ..shm import BufferSpec, GroupRefused, NotReady, SharedActivationBuffer
from .failures import ActivationServerError


class SameHostGone(RuntimeError):
    """The server's buffer file is gone (the server stopped) or never filled in time: read over HTTP."""


def open_same_host(published: Optional[dict]) -> tuple[Optional["SameHostReader"], str]:
    """(reader, "") when the published buffer is this host's and can be opened, else (None, why not)."""
    if not published or "path" not in published:
        return None, "the server publishes no same-host buffer"
    if published.get("host") != host_identity():
        return None, "the server is on another host (or PID namespace)"
    try:
        spec = _published_spec(published)
        if spec.nbytes != int(published["nbytes"]):
            return None, f"buffer layout differs from the server's ({spec.nbytes} != {published['nbytes']} bytes)"
        st = os.stat(spec.path)
        if st.st_size != spec.nbytes:
            return None, f"{spec.path} has {st.st_size} bytes, the server published {spec.nbytes}"
        buf = SharedActivationBuffer.attach(spec)
    except PermissionError:
        return None, f"no read-write access to {published['path']} (the server's user only)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"cannot open {published.get('path')}: {type(e).__name__}: {e}"
    if buf.data_offset != int(published.get("data_offset", -1)) or buf.nonce != int(published.get("nonce", 0)):
        buf.close()
        return None, f"{spec.path} is not the server's buffer (nonce or layout differs)"
    return SameHostReader(buf, st.st_ino, int(published.get("pid", 0))), ""


def _published_spec(published: dict) -> BufferSpec:
    """The spec of the server's buffer, as its server published it."""
    return BufferSpec(str(published["path"]), int(published["capacity"]),
                      tuple(int(x) for x in published["sample_shape"]), str(published["dtype"]),
                      float(published["min_fill"]), int(published["max_reads"]),
                      bool(published.get("provenance", False)), int(published.get("max_groups", 0)))


class SameHostReader:
    """Rows claimed and gathered from an attached buffer. Not picklable: made inside the reading process."""

    def __init__(self, buffer: SharedActivationBuffer, inode: int, server_pid: int, poll_s: float = 0.002):
        self.buffer, self.inode, self.server_pid, self.poll_s = buffer, inode, server_pid, poll_s
        self.spec = buffer.spec
        # Map the buffer's pages into this process in the background, as each HTTP process does: the
        # first touch of each page of a large buffer otherwise costs a fault inside the gather.
        self._stop = threading.Event()
        self._prefault = threading.Thread(target=buffer.prefault, kwargs={"stop": self._stop},
                                          name="actdata-same-host-prefault", daemon=True)
        self._prefault.start()

    def alive(self) -> bool:
        """Whether the server's process lives and its file is still in place (removed when it stops)."""
        try:
            return os.stat(self.spec.path).st_ino == self.inode and pid_alive(self.server_pid)
        except OSError:
            return False

    def read(self, out: torch.Tensor, wait_s: float, provenance: Optional[dict] = None,
             group: Optional[str] = None, points: Optional[list[int]] = None) -> torch.Tensor:
        """Fill `out` [k, *sample_shape] (with `points`, [k, len(points), width]: only those points of
        each row, gathered straight from the slots) with k claimed rows (and the tensors of `provenance`,
        {"token_ids", "positions", "doc_ids"} [k], with their origin, when given); waits while fewer than k are ready
        (or the buffer is below min_fill) for up to `wait_s` seconds, then raises SameHostGone, as it does at once
        when the server's process or file is gone (rows left in a dead server's memory are not served).
        `group`: read as that consumer group (the buffer's group claim; a refused group raises
        ActivationServerError with the status the HTTP route would answer)."""
        k, deadline, sleep = len(out), time.monotonic() + wait_s, self.poll_s
        if not self.alive():  # one stat call: rows left in a stopped server's memory are not served
            raise SameHostGone(f"{self.spec.path} was removed (server stopped)")
        while True:
            try:
                if provenance is None:
                    self.buffer.read(k, out=out, group=group, points=points)
                else:
                    self.buffer.read_provenance(k, out=out, prov_out=provenance, group=group, points=points)
                return out
            except GroupRefused as e:
                raise ActivationServerError(f"{self.spec.path}: {e}", status=e.status, detail=str(e)) from None
            except NotReady as e:
                if not self.alive():
                    raise SameHostGone(f"{self.spec.path} was removed (server stopped)") from None
                if time.monotonic() >= deadline:
                    raise SameHostGone(f"{self.spec.path}: {e} for {wait_s:g} s") from None
                time.sleep(sleep)
                sleep = min(0.1, sleep * 2)

    def close(self) -> None:
        self._stop.set()
        self._prefault.join()  # the thread holds views of the map
        self.buffer.close()  # not the owner: detaches only
