"""R6-R9, short versions (scripts/chaos.py runs the full ones): the HTTP layer's bounds, supervised
processes, serve-once across a generator kill, stale-file identity, a full filesystem."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
import torch
from conftest import private_tmpfs

from actdata import wire
from actdata.generation.synthetic import make_rows, row_ids
from actdata.shm import BufferSpaceError, SharedActivationBuffer
from actdata.shm.segment import reclaim_stale
from actdata.shm.sidefiles import owner_lock as owner_lock_path

HERE = os.path.dirname(os.path.abspath(__file__))


def wait_for(pred, timeout=60, interval=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            v = pred()
        except (requests.RequestException, KeyError, IndexError):
            v = None
        if v:
            return v
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def stats(url):
    return requests.get(url + "/stats", timeout=10).json()


def ready(url):
    return requests.get(url + "/", timeout=10).json()["serving"] and stats(url)["server"]["http_pids"]


def recv_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, socket.timeout):
            return out
        if not chunk:
            return out
        out += chunk


def test_http_layer_bounds_request_heads_and_json(start_server):
    srv = start_server("buffer.size=4000", "buffer.max_reads=1000000", "server.workers=1",
                       "server.header_timeout_s=1", "server.max_header_bytes=8192", "server.max_json_bytes=65536")
    wait_for(lambda: ready(srv.url))
    # a request head that keeps growing is cut off after ~max_header_bytes, not buffered whole
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    sent = 0
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
        while sent < 64 << 20:
            sent += s.send(b"a" * 65536)
    except OSError:
        pass
    assert sent < 64 << 20 and recv_all(s).startswith(b"HTTP/1.1 431")
    s.close()
    # a head that does not complete in time gets 408 and is closed; a silent connection is closed
    slow = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    slow.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n")
    silent = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    assert recv_all(slow).startswith(b"HTTP/1.1 408") and recv_all(silent) == b""
    # the JSON route's rows follow from its text budget; above it: 422 naming the limit
    max_json = stats(srv.url)["server"]["max_samples_json"]
    assert max_json == 65536 // (768 * 25 + 64)
    r = requests.get(srv.url + wire.JSON_PATH, params={"num_samples": max_json + 1})
    assert r.status_code == 422 and "server.max_json_bytes" in r.json()["detail"]
    r = requests.get(srv.url + wire.JSON_PATH, params={"num_samples": max_json})
    assert r.status_code == 200 and len(r.content) <= 65536 and len(r.json()["activations"]) == max_json
    assert stats(srv.url)["server"]["refused"]["header_too_large"] >= 1  # counted (one process: this one)


def test_killed_http_processes_are_replaced_and_counted(start_server):
    srv = start_server("buffer.size=4000", "buffer.max_reads=1000000")
    wait_for(lambda: ready(srv.url))
    before = stats(srv.url)["server"]
    assert before["http_workers"] == 2 and len(before["http_pids"]) == 2
    os.kill(before["http_pids"][0], signal.SIGKILL)
    after = wait_for(lambda: (lambda s: s["http_restarts"] == 1 and s["http_workers"] == 2 and s)(
        stats(srv.url)["server"]))
    assert before["http_pids"][0] not in after["http_pids"] and "SIGKILL" in after["http_last_death"]
    for pid in after["http_pids"]:  # all of them: the server replaces them, it does not shut down
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: stats(srv.url)["server"]["http_restarts"] == 3)
    assert srv.proc.poll() is None
    assert requests.get(srv.url + wire.TENSOR_PATH, params={"num_samples": 64}).status_code == 200
    assert "HTTP process" in srv.log_tail() and "SIGKILL" in srv.log_tail()


def test_no_row_served_twice_across_a_generator_kill(start_server, tmp_path):
    """Serve-once (max_reads=1) holds across kill -9 of the generator: the restarted source resumes
    where the killed one was (the resumable position of the issue "Rows that know their origin");
    without it the synthetic source starts its ids again and rows are served twice."""
    srv = start_server("buffer.size=2000", "buffer.min_fill=0.5", "buffer.max_reads=1",
                       f"generator.state_dir={tmp_path}")
    wait_for(lambda: ready(srv.url))
    seen = []

    def drain(n):
        for _ in range(n):
            r = requests.get(srv.url + wire.TENSOR_PATH, params={"num_samples": 500}, timeout=30)
            if r.status_code == 200:
                seen.append(row_ids(wire.decode(r.content, r.headers)))
            else:
                time.sleep(0.2)

    drain(20)
    gen = stats(srv.url)["generators"][0]
    os.kill(gen["pid"], signal.SIGKILL)
    wait_for(lambda: (lambda g: g["pid"] != gen["pid"] and g["state"] == "running")(stats(srv.url)["generators"][0]),
             timeout=90)
    drain(30)
    ids = torch.cat(seen)
    assert len(ids) > 4000
    assert len(torch.unique(ids)) == len(ids), f"{len(ids) - len(torch.unique(ids))} rows served twice"


_HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from actdata.shm.buffer import SharedActivationBuffer
b = SharedActivationBuffer.create(100, (16,), "float32", path=sys.argv[2])
print(b.spec.path, flush=True)
time.sleep(600)
"""


def _holder(path):
    """A process that creates a buffer at `path` and holds it; returns (process, buffer path)."""
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, os.path.dirname(HERE), path], stdout=subprocess.PIPE,
                         text=True)
    return p, p.stdout.readline().strip()


def test_stale_files_are_judged_by_the_owner_lock_not_the_pid(tmp_path):
    p, path = _holder(str(tmp_path))
    try:
        # the same files as a server in another PID namespace would leave them: its pid means nothing here
        foreign = str(tmp_path / "actdata-999999999-0badc0de.buf")
        for suffix in ("", ".owner"):
            os.rename(path + suffix, foreign + suffix)
        assert reclaim_stale(str(tmp_path), "actdata") == [] and os.path.exists(foreign)
    finally:
        p.kill()
        p.wait()
    # its owner died (kill -9): nobody holds the lock, whatever the name says
    assert sorted(reclaim_stale(str(tmp_path), "actdata")) == sorted(
        os.path.basename(foreign) + s for s in ("", ".owner"))
    # a crashed server that was PID 1 in its container: pid 1 exists everywhere, the lock is free
    crashed = tmp_path / "actdata-1-00c0ffee.buf"
    crashed.write_bytes(b"x")
    (tmp_path / "actdata-1-00c0ffee.buf.owner").write_bytes(b"")
    assert "actdata-1-00c0ffee.buf" in reclaim_stale(str(tmp_path), "actdata") and not crashed.exists()


def test_explicit_buffer_path_after_kill9_and_while_in_use(tmp_path):
    target = str(tmp_path / "buffer.bin")
    p, path = _holder(target)
    try:
        with pytest.raises(BufferSpaceError, match="in use"):
            SharedActivationBuffer.create(100, (16,), "float32", path=target)
    finally:
        p.kill()
        p.wait()
    assert os.path.exists(target)  # left by the killed owner
    with SharedActivationBuffer.create(100, (16,), "float32", path=target) as buf:
        assert buf.stats()["free"] == 100 and os.path.exists(owner_lock_path(target))
    assert not os.path.exists(target) and not os.path.exists(owner_lock_path(target))


@pytest.fixture
def small_tmpfs():
    with private_tmpfs("4m") as d:
        yield d
    os.rmdir(d)


def test_full_filesystem_pauses_a_sparse_writer_and_refuses_a_reserved_start(small_tmpfs):
    shape = (768,)  # 3 KB rows: 2,000 rows (6 MB) do not fit in 4 MB
    with pytest.raises(BufferSpaceError, match="needs"):  # honest check at start
        SharedActivationBuffer.create(2000, shape, "float32", path=small_tmpfs, reserve=True)
    with SharedActivationBuffer.create(1200, shape, "float32", path=small_tmpfs) as buf:  # 3.7 MB: fits
        filler = os.path.join(small_tmpfs, "filler")
        with open(filler, "wb") as f:
            f.write(b"\0" * (1 << 20))  # now it does not
        rows = make_rows(torch.arange(1200), shape, torch.float32)
        with pytest.raises(BufferSpaceError, match="no space left") as e:
            buf.write(rows)  # a clear error instead of a SIGBUS in the copy
        done = e.value.done
        assert 0 < done < 1200 and buf.stats()["ready"] == done and buf.stats()["writing"] == 0
        os.unlink(filler)  # space is back: the rest goes in
        assert buf.write(rows[done:]) == 1200 - done and buf.stats()["ready"] == 1200
        assert set(row_ids(buf.read(1200)[1]).tolist()) == set(range(1200))


def test_health_shows_errors_only_to_key_holders(start_server):
    srv = start_server("buffer.size=1000", "server.api_key=s3cret")
    auth = {"Authorization": "Bearer s3cret"}
    h = wait_for(lambda: (lambda h: h["generators"] and h)(requests.get(srv.url + "/", headers=auth).json()))
    assert "last_error" in h["generators"][0]
    anonymous = requests.get(srv.url + "/").json()
    assert anonymous["generators"] and "last_error" not in anonymous["generators"][0]
    assert requests.get(srv.url + "/stats", headers={"Authorization": "Bearer s3cre"}).status_code == 401
