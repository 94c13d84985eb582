"""ActivationClient and TensorReader against live servers on loopback (synthetic rows)."""
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import SYNTHETIC

from actdata.generation.synthetic import verify_rows
from actdata.reading.client import ActivationClient, ActivationServerError, ServerUnavailable, TensorReader
from actdata.serving.process import ServerProcess

KEY = "k3y-for-tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess([*SYNTHETIC, "buffer.size=4000", "buffer.min_fill=0.25"])
    assert ActivationClient(srv.url).wait_for_data(1000, timeout=60)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def slow_server():
    """API key, min_fill 1.0 and a throttled writer: after refresh() it answers 503 for ~2 s."""
    srv = ServerProcess([*SYNTHETIC, "buffer.size=1000", "buffer.min_fill=1.0", "generator.rows_per_second=500",
                         f"server.api_key={KEY}"])
    yield srv
    srv.stop()


def test_health_and_stats(server):
    c = ActivationClient(server.url)
    assert c.health_check() is True
    st = c.get_stats()
    assert st["capacity"] == 4000 and st["sample_shape"] == [768] and st["dtype"] == "float32"
    assert st["rows_written"] >= 1000


def test_health_check_of_a_dead_server_is_false_at_once():
    c = ActivationClient(f"http://127.0.0.1:{free_port()}", retry_for_s=30)
    t0 = time.monotonic()
    assert c.health_check() is False
    assert time.monotonic() - t0 < 10  # not retried for retry_for_s


def test_wait_for_data(server):
    c = ActivationClient(server.url)
    assert c.wait_for_data(min_samples=1, timeout=10) is True
    t0 = time.monotonic()
    with pytest.raises(ActivationServerError, match="buffer holds 4000 rows"):  # never ready: not waited for
        c.wait_for_data(min_samples=4001, timeout=60)
    assert time.monotonic() - t0 < 10
    dead = ActivationClient(f"http://127.0.0.1:{free_port()}")
    assert dead.wait_for_data(timeout=0.5, check_interval=0.1) is False


def test_get_activations_json(server):
    d = ActivationClient(server.url).get_activations(5)
    assert d["shape"] == [5, 768] and d["num_samples"] == 5 and len(d["indices"]) == 5
    assert verify_rows(torch.tensor(d["activations"], dtype=torch.float32))[1].all()


def test_get_activations_tensor_reuses_one_connection(server):
    c = ActivationClient(server.url)
    seen = set()
    for _ in range(5):
        x, meta = c.get_activations_tensor(300)
        assert x.shape == (300, 768) and x.dtype == torch.float32 and x.is_contiguous()
        assert meta["shape"] == [300, 768] and meta["dtype"] == "float32" and meta["num_samples"] == 300
        assert meta["nbytes"] == 300 * 768 * 4 and meta["url"] == server.url
        ids, ok = verify_rows(x)
        assert ok.all() and not (set(ids.tolist()) & seen)
        seen |= set(ids.tolist())
    sock = c._reader._conn.sock
    x, _ = c.get_activations_tensor(10)
    assert c._reader._conn.sock is sock  # keep-alive: the same socket


def test_4xx_is_a_clear_error_at_once(server):
    c = ActivationClient(server.url, retry_for_s=30)
    # (a tensor batch above the server's maximum is read in parts: see the next test)
    for call in (lambda: c.get_activations_tensor(0), lambda: c.get_activations(10**6),
                 lambda: c.get_activations(-1)):
        t0 = time.monotonic()
        with pytest.raises(ActivationServerError) as e:
            call()
        assert time.monotonic() - t0 < 10  # not retried
        assert not isinstance(e.value, ServerUnavailable)
        assert e.value.status == 422 and server.url in str(e.value) and "num_samples" in str(e.value)
        assert "num_samples" in e.value.detail


def test_dead_server_is_a_clear_error_within_retry_for_s():
    url = f"http://127.0.0.1:{free_port()}"
    c = ActivationClient(url, retry_for_s=1.0)
    for call in (c.get_stats, lambda: c.get_activations_tensor(10), c.refresh):
        t0 = time.monotonic()
        with pytest.raises(ServerUnavailable) as e:
            call()
        elapsed = time.monotonic() - t0
        assert 0.9 <= elapsed < 15, elapsed  # it retried, and it gave up
        assert url in str(e.value) and "retry_for_s=1" in str(e.value)
        assert isinstance(e.value, RuntimeError)


def test_api_key(slow_server, monkeypatch):
    monkeypatch.delenv("ACTDATA_API_KEY", raising=False)
    assert ActivationClient(slow_server.url).health_check()  # health is open
    with pytest.raises(ActivationServerError) as e:
        ActivationClient(slow_server.url).get_stats()
    assert e.value.status == 401 and "API key" in str(e.value) and slow_server.url in str(e.value)
    with pytest.raises(ActivationServerError) as e:
        ActivationClient(slow_server.url, api_key="wrong").get_activations_tensor(1)
    assert e.value.status == 401
    assert ActivationClient(slow_server.url, api_key=KEY).get_stats()["capacity"] == 1000
    monkeypatch.setenv("ACTDATA_API_KEY", KEY)
    assert ActivationClient(slow_server.url).get_stats()["capacity"] == 1000


def test_refresh_then_503_is_retried_until_served(slow_server):
    c = ActivationClient(slow_server.url, api_key=KEY, retry_for_s=60)
    assert c.wait_for_data(1000, timeout=60)
    r = c.refresh()
    assert r["status"] == "ok" and r["refreshed"] > 0
    # Right after refresh the buffer is below min_fill (1.0) for ~2 s: a short budget gives up with the 503 ...
    with pytest.raises(ServerUnavailable) as e:
        ActivationClient(slow_server.url, api_key=KEY, retry_for_s=0.2).get_activations_tensor(100)
    assert e.value.status == 503 and "min_fill" in str(e.value)
    # ... the default one waits (Retry-After) and gets whole rows.
    x, _ = c.get_activations_tensor(100)
    assert x.shape == (100, 768) and verify_rows(x)[1].all()
    assert c.get_stats()["refresh_epoch"] >= 1


def test_tensor_reader_reconnects_after_the_server_closed_the_connection(server):
    reader = TensorReader(server.url)
    x, headers = reader.fetch(8)
    assert headers["X-Tensor-Shape"] == "8,768"
    reader._conn.sock.shutdown(socket.SHUT_RDWR)  # as if the server had dropped the idle connection
    x, _ = reader.fetch(8)
    assert verify_rows(x)[1].all()


def test_a_batch_above_the_servers_maximum_is_read_in_several_requests(server):
    c = ActivationClient(server.url)
    most = c.limits().max_rows
    x, meta = c.get_activations_tensor(most + 7)
    assert tuple(x.shape) == (most + 7, 768) and meta["num_samples"] == most + 7
    ids, ok = verify_rows(x)
    assert ok.all() and len(set(ids.tolist())) == most + 7


def test_demo_with_no_server_is_one_line_at_once():
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "actdata.client", url], capture_output=True, text=True, timeout=60)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert out.returncode == 1 and len(lines) == 1 and "no actdata server answers" in lines[0], lines
    assert url in lines[0] and time.monotonic() - t0 < 30


def test_demo_defaults_fit_a_small_buffer():
    """The test preset's buffer (1,000 rows) is below the demo's usual 1,024-row batch."""
    srv = ServerProcess([*SYNTHETIC, "buffer.size=1000", "buffer.min_fill=0.25"])
    try:
        out = subprocess.run([sys.executable, "-m", "actdata.client", srv.url, "--reps", "1", "--wait", "30"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "shape=(500, 768)" in out.stdout
        out = subprocess.run([sys.executable, "-m", "actdata.client", srv.url, "--num-samples", "5000"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and out.stderr.strip().splitlines()[-1].endswith("(wait for at most 1000)")
        assert "Traceback" not in out.stderr
    finally:
        srv.stop()


def test_demo(server):
    out = subprocess.run([sys.executable, "-m", "actdata.client", server.url, "--num-samples", "256", "--reps", "2"],
                         capture_output=True, text=True, timeout=120, env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert "shape=(256, 768)" in out.stdout and "GB/s" in out.stdout and "status=ok" in out.stdout
