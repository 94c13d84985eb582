"""The server as a user meets it: `python -m actdata.serve` in a subprocess, real HTTP on loopback."""
import os
import signal
import time

import pytest
import requests
import torch
from conftest import shm_files

from actdata import wire
from actdata.generation.synthetic import verify_rows
from actdata.host import group_pids


def get_tensor(url, n, **kw):
    r = requests.get(f"{url}{wire.TENSOR_PATH}", params={"num_samples": n}, **kw)
    assert r.status_code == 200, r.text
    return wire.decode(r.content, r.headers), r


def wait_serving(url, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if requests.get(f"{url}/").json()["serving"]:
            return
        time.sleep(0.1)
    raise AssertionError("server never started serving")


def test_health_and_stats(synthetic_server):
    url = synthetic_server.url
    wait_serving(url)
    h = requests.get(url + "/").json()
    assert h["status"] == "ok" and h["sample_shape"] == [768] and h["dtype"] == "float32"
    assert [g["state"] for g in h["generators"]] == ["running"]
    st = requests.get(url + "/stats").json()
    for key in ("capacity", "fill", "ready", "free", "writing", "reading", "rows_written", "rows_read",
                "min_fill", "max_reads", "generators", "server", "batch_mixing"):
        assert key in st
    assert st["capacity"] == 4000 and st["server"]["max_samples_per_request"] == 4000
    assert st["generators"][0]["source"] == "synthetic"


def test_tensor_route_serves_whole_unseen_rows(synthetic_server):
    url = synthetic_server.url
    wait_serving(url)
    seen = set()
    for _ in range(20):
        t, r = get_tensor(url, 256)
        assert r.headers[wire.SHAPE] == "256,768" and r.headers[wire.DTYPE] == "float32"
        assert r.headers["Content-Encoding"] == "identity" and int(r.headers["Content-Length"]) == 256 * 768 * 4
        ids, ok = verify_rows(t)
        assert ok.all()
        assert not (set(ids.tolist()) & seen)  # serve once: no row id twice
        seen |= set(ids.tolist())
    assert len(seen) == 20 * 256


def test_tensor_route_is_not_gzipped_even_when_asked(synthetic_server):
    wait_serving(synthetic_server.url)
    r = requests.get(synthetic_server.url + wire.TENSOR_PATH, params={"num_samples": 64},
                     headers={"Accept-Encoding": "gzip"})
    assert r.headers.get("Content-Encoding") == "identity" and len(r.content) == 64 * 768 * 4


def test_json_route(synthetic_server):
    wait_serving(synthetic_server.url)
    r = requests.get(synthetic_server.url + wire.JSON_PATH, params={"num_samples": 3})
    assert r.status_code == 200
    d = r.json()
    assert d["shape"] == [3, 768] and d["dtype"] == "float32" and d["num_samples"] == 3
    assert len(d["indices"]) == 3 and "capacity" in d["buffer_stats"]
    ids, ok = verify_rows(torch.tensor(d["activations"], dtype=torch.float32))
    assert ok.all()


def test_num_samples_defaults_to_one(synthetic_server):
    wait_serving(synthetic_server.url)
    t, _ = get_tensor(synthetic_server.url, None)
    assert t.shape == (1, 768)


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "abc", "", "4001", "99999999999999999999", "1e3", "NaN"])
@pytest.mark.parametrize("path", [wire.TENSOR_PATH, wire.JSON_PATH])
def test_bad_num_samples_is_a_clear_4xx(synthetic_server, path, value):
    r = requests.get(synthetic_server.url + path, params={"num_samples": value})
    assert r.status_code == 422, (value, r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "num_samples" in detail


def test_oversized_headers_are_refused(synthetic_server):
    r = requests.get(synthetic_server.url + "/stats", headers={"X-Big": "x" * 100_000})
    assert r.status_code == 431 and "headers" in r.json()["detail"]
    assert requests.get(synthetic_server.url + "/stats").status_code == 200  # and nothing else is harmed


def test_unknown_routes_and_methods(synthetic_server):
    url = synthetic_server.url
    r = requests.get(url + "/nope")
    assert r.status_code == 404 and "detail" in r.json()
    assert requests.post(url + wire.TENSOR_PATH).status_code == 405
    assert requests.get(url + "/refresh").status_code == 405
    assert requests.delete(url + "/stats").status_code == 405


def test_refresh(start_server):
    srv = start_server("buffer.size=1000", "generator.rows_per_second=2000")
    wait_serving(srv.url)
    r = requests.post(srv.url + "/refresh")
    assert r.status_code == 200 and r.json()["refreshed"] > 0
    assert requests.get(srv.url + "/stats").json()["refresh_epoch"] == 1


def test_503_with_retry_after_while_filling(start_server):
    srv = start_server("buffer.size=1000", "buffer.min_fill=1.0", "generator.rows_per_second=100")
    for path in (wire.TENSOR_PATH, wire.JSON_PATH):
        r = requests.get(srv.url + path, params={"num_samples": 10})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert "min_fill" in r.json()["detail"]
    assert requests.get(srv.url + "/").json()["status"] == "filling"


def test_low_precision_dtypes_round_trip(start_server):
    srv = start_server("buffer.size=1000", "buffer.dtype=bfloat16", "buffer.sample_shape=[2,3,64]")
    wait_serving(srv.url)
    t, r = get_tensor(srv.url, 100)
    assert r.headers[wire.DTYPE] == "bfloat16" and t.dtype == torch.bfloat16 and t.shape == (100, 2, 3, 64)
    assert verify_rows(t)[1].all()


def test_api_key(start_server):
    srv = start_server("server.api_key=s3cret")
    assert requests.get(srv.url + "/").status_code == 200  # health stays open
    for method, path in (("get", "/stats"), ("get", wire.TENSOR_PATH), ("post", "/refresh"), ("get", "/docs")):
        r = getattr(requests, method)(srv.url + path)
        assert r.status_code == 401 and "API key" in r.json()["detail"]
        r = getattr(requests, method)(srv.url + path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
    wait_serving(srv.url)
    ok = requests.get(srv.url + "/stats", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200


def test_a_stop_signal_within_the_first_one_returns_at_once(monkeypatch):
    """A second SIGTERM / SIGINT that arrives while the first one's handler is inside STOPPING.set() (its
    lock held by the main thread) returns instead of waiting on that lock forever: a server SIGTERMed
    several times in a row once hung that way, half stopped, until SIGKILL."""
    import signal as sig
    import threading

    import actdata.serving.stopping as serve

    monkeypatch.setattr(serve, "STOPPING", threading.Event())
    monkeypatch.setattr(serve, "_interrupted", False, raising=False)
    outcome = []

    def main_thread():
        try:
            serve._interrupt(sig.SIGTERM, None)
        except KeyboardInterrupt:
            outcome.append("stop")
        with serve.STOPPING._cond:  # where the first handler is when the next signal lands
            serve._interrupt(sig.SIGTERM, None)
            outcome.append("returned")

    t = threading.Thread(target=main_thread, daemon=True)
    t.start()
    t.join(5)
    assert outcome == ["stop", "returned"] and serve.STOPPING.is_set()


@pytest.mark.parametrize("how", ["watch", "pdeathsig"])
def test_a_server_stops_when_the_process_that_started_it_dies(how):
    """ServerProcess(die_with_parent=True) (a Ray actor's server): when the starting process is killed the
    server stops cleanly, by its own watch of its parent ("watch": that alone, no PR_SET_PDEATHSIG) and
    with both ("pdeathsig")."""
    import subprocess
    import sys

    start = ('env={"ACTDATA_EXIT_WITH_PARENT": "1"}' if how == "watch" else "die_with_parent=True")
    code = ("import time\nfrom actdata.serving.process import ServerProcess\n"
            "srv = ServerProcess(['+preset=test', 'generator.source=synthetic', "
            f"'generator.state_dir=null'], {start})\n"
            "print(srv.proc.pid, flush=True)\ntime.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        assert group_pids(pid)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.time() + 30
    while group_pids(pid) and time.time() < deadline:
        time.sleep(0.2)
    left = group_pids(pid)
    if left:
        os.killpg(pid, signal.SIGKILL)
    assert not left and not shm_files(pid)  # stopped, and cleaned up as on SIGTERM


def test_sigterm_stops_every_process_and_unlinks_shm(start_server):
    srv = start_server()
    wait_serving(srv.url)
    pid = srv.proc.pid
    assert len(group_pids(pid)) >= 4  # main, generator worker, 2 HTTP processes (+ manager)
    assert len(shm_files(pid)) >= 1
    t0 = time.time()
    srv.proc.send_signal(signal.SIGTERM)
    srv.proc.wait(timeout=10)
    assert time.time() - t0 < 5.0
    deadline = time.time() + 2
    while group_pids(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert group_pids(pid) == []
    assert shm_files(pid) == []
    with pytest.raises(requests.ConnectionError):
        requests.get(srv.url + "/", timeout=2)


def test_sigkill_leftovers_are_reclaimed_by_the_next_start(start_server):
    # a prefix of its own: a server started by another test meanwhile reclaims only the default prefix's files
    prefix = f"actdata-sigkill-{os.getpid()}"
    srv = start_server(f"buffer.prefix={prefix}")
    pid = srv.proc.pid
    os.kill(pid, signal.SIGKILL)
    srv.proc.wait(timeout=10)
    deadline = time.time() + 10
    while group_pids(pid) and time.time() < deadline:  # children die with their parent
        time.sleep(0.1)
    assert group_pids(pid) == []
    assert shm_files(pid, prefix=prefix)  # SIGKILL gives no chance to clean up ...
    srv2 = start_server(f"buffer.prefix={prefix}")
    assert shm_files(pid, prefix=prefix) == []  # ... the next start does
    assert "reclaimed" in srv2.log_tail()


def test_embedded_model_end_to_end(start_server):
    """The README's default: SmolLM2-135M on the KJV Bible, residual stream after block 6."""
    srv = start_server("buffer.min_fill=0.2", base=["+preset=test"], timeout=300,
                       env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    wait_serving(srv.url, timeout=300)
    t, r = get_tensor(srv.url, 64)
    assert t.shape == (64, 576) and t.dtype == torch.float32
    assert torch.isfinite(t).all()
    assert t.std(dim=0).mean() > 0.01 and (t[1:] != t[:1]).any(dim=1).all()  # real, varied rows
    deadline = time.time() + 30
    while True:  # a generator publishes its counters at most twice a second
        st = requests.get(srv.url + "/stats").json()
        gen = st["generators"][0]
        if gen["tokens"] > 0 or time.time() > deadline:
            break
        time.sleep(0.2)
    assert gen["source"] == "model" and gen["device"] == "cpu" and gen["state"] == "running"
    assert gen["tokens"] > 0 and st["contexts_seen"] > 0
    # rows of one batch come from several contexts (here few: 200 ready rows hold ~2 contexts of 127)
    assert 2 / 64 <= st["batch_mixing"] <= 1
