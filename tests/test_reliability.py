"""R1-R3, short versions: load, integrity under a running writer, slow readers, and faults."""
import http.client
import os
import signal
import sys
import threading
import time

import numpy as np
import requests
import torch

from actdata import wire
from actdata.config import Config
from actdata.generation.loop import run_supervised
from actdata.generation.status import read_statuses
from actdata.generation.synthetic import make_rows, verify_rows
from actdata.shm.buffer import SharedActivationBuffer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from integrity import read_rows  # noqa: E402
from load_test import run_load  # noqa: E402

REUSE = ["buffer.max_reads=1000000000", "buffer.min_fill=0.5"]


def wait_for(pred, timeout=60, interval=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def serving(url):
    return requests.get(url + "/").json()["serving"]


def test_load_no_errors_and_flat_memory(start_server):
    srv = start_server("buffer.size=20000", *REUSE)
    wait_for(lambda: serving(srv.url))
    r = run_load(srv.url, clients=16, seconds=8, leader_pid=srv.proc.pid)
    assert r["requests"] > 100 and r["errors"] == 0 and r["5xx"] == 0
    for pid, (before, after) in r["rss_mb"].items():
        assert after - before < 64, (pid, before, after)  # private memory flat (MB)


def test_response_memory_is_reused_up_to_one_request(start_server):
    """An HTTP process builds each tensor answer in memory it keeps for the next one, up to one request's
    maximum (half of server.response_memory_bytes): answers at the maximum, with and without provenance,
    reuse it (a body above a smaller cap was allocated and faulted in anew each time), and every answer
    holds intact rows."""
    from actdata.reading.client import ActivationClient

    srv = start_server("buffer.size=4000", "server.workers=1", "server.response_memory_bytes=8000000",
                       "generator.provenance=true", *REUSE)
    client = ActivationClient(srv.url)
    wait_for(lambda: serving(srv.url))
    k = client.get_stats()["server"]["max_samples_per_request"]
    assert k == 8_000_000 // (2 * (768 * 4 + 16))  # a row and its provenance, twice (body + socket's copy)
    for i in range(6):
        if i % 2:
            b = client.get_activations_tensor(k, provenance=True)
            x = b.activations
            assert torch.equal(b.doc_ids, verify_rows(x)[0])
        else:
            x, _ = client.get_activations_tensor(k)
        assert x.shape == (k, 768) and verify_rows(x)[1].all()
    mem = client.get_stats()["server"]["response_memory"]
    assert k * 768 * 4 <= mem["pool_retained"] <= 8_000_000 // 2
    assert mem["used"] == 0


def test_requests_at_the_maximum_wait_for_memory_instead_of_503(start_server):
    """A request at the per-request maximum takes the whole response budget of its HTTP process while it
    is sent; concurrent ones wait for it (up to server.retry_after_s) instead of a 503 that would stall
    their clients for the whole Retry-After."""
    from concurrent.futures import ThreadPoolExecutor

    srv = start_server("buffer.size=12000", "server.workers=1", "server.response_memory_bytes=64000000",
                       "server.retry_after_s=10", *REUSE)  # 32 MB answers: sent over many turns of the loop
    wait_for(lambda: serving(srv.url))
    k = requests.get(srv.url + "/stats").json()["server"]["max_samples_per_request"]

    def get(_):
        with requests.Session() as s:
            return [s.get(srv.url + wire.TENSOR_PATH, params={"num_samples": k}) for _ in range(3)]

    with ThreadPoolExecutor(6) as pool:
        answers = [r for rs in pool.map(get, range(6)) for r in rs]
    assert [r.status_code for r in answers] == [200] * 18
    assert all(verify_rows(wire.decode(r.content, r.headers))[1].all() for r in answers)


def test_integrity_serve_once_under_a_running_writer(start_server):
    srv = start_server("buffer.size=8000", "buffer.min_fill=0.25")
    r = read_rows(srv.url, total=100_000, clients=6)
    assert r["rows"] >= 100_000 and r["torn"] == 0
    assert r["max_count"] == 1 and r["distinct"] == r["rows"]  # no row served twice


def test_integrity_read_budget(start_server):
    srv = start_server("buffer.size=4000", "buffer.min_fill=0.25", "buffer.max_reads=3")
    r = read_rows(srv.url, total=30_000, clients=6)
    assert r["torn"] == 0 and r["max_count"] <= 3
    assert r["distinct"] < r["rows"]  # rows were reused ...


def test_slow_readers_get_intact_bodies(start_server):
    """Responses still being sent when later requests arrive must not share memory with them."""
    srv = start_server("buffer.size=20000", "server.workers=1", *REUSE)
    wait_for(lambda: serving(srv.url))
    bad, total = [], []

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        for _ in range(6):
            conn.request("GET", f"{wire.TENSOR_PATH}?num_samples=2048")
            r = conn.getresponse()
            t, view = wire.empty_for(r.headers)
            got = 0
            while got < len(view):
                got += r.readinto(view[got:got + 65536])
                time.sleep(0.0005)
            ok = verify_rows(t)[1]
            bad.append(int((~ok).sum()))
            total.append(len(ok))

    threads = [threading.Thread(target=client) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(total) == 12 * 6 * 2048 and sum(bad) == 0


def test_killed_generator_worker_is_restarted_and_rows_keep_flowing(start_server):
    srv = start_server("buffer.size=4000", *REUSE)
    wait_for(lambda: serving(srv.url))
    gen = requests.get(srv.url + "/stats").json()["generators"][0]
    os.kill(gen["pid"], signal.SIGKILL)
    r = requests.get(srv.url + wire.TENSOR_PATH, params={"num_samples": 100})
    assert r.status_code == 200  # ready rows are served while the generator is down
    assert verify_rows(wire.decode(r.content, r.headers))[1].all()

    def restarted():
        gens = requests.get(srv.url + "/stats").json()["generators"]
        return gens and gens[0]["pid"] != gen["pid"] and gens[0]["state"] == "running" and gens[0]
    new = wait_for(restarted, timeout=90)
    assert new["restarts"] == 1 and str(gen["pid"]) in new["last_error"]


def _cfg():
    cfg = Config()
    cfg.generator.source = "synthetic"
    cfg.generator.state_dir = None  # no saved position from other runs
    return cfg


def test_supervisor_restarts_a_failing_source(monkeypatch):
    calls = []

    def flaky(cfg, spec, device, index, *position):
        calls.append(1)

        def gen():
            for i in range(2):
                yield make_rows(torch.arange(i * 10, i * 10 + 10) + 1000 * len(calls), (32,), torch.float32), \
                    np.zeros(10, np.int64), {"contexts": 1, "tokens": 0}
            raise RuntimeError("boom")
        return gen()

    monkeypatch.setattr("actdata.generation.loop.make_source", flaky)
    with SharedActivationBuffer.create(1000, (32,), "float32") as buf:
        stop = threading.Event()
        th = threading.Thread(target=run_supervised, args=(_cfg(), buf.spec, "cpu", 0, stop),
                              kwargs={"max_backoff_s": 0.05})
        th.start()
        wait_for(lambda: len(calls) >= 3, timeout=20)
        st = read_statuses(buf.spec)[0]
        assert st["restarts"] >= 2 and "boom" in st["last_error"]
        assert buf.stats()["rows_written"] >= 40  # it kept producing between failures
        stop.set()
        th.join(10)
        assert not th.is_alive() and read_statuses(buf.spec)[0]["state"] == "stopped"


def test_supervisor_gives_up_on_a_source_that_never_starts(monkeypatch):
    calls = []

    def broken(cfg, spec, device, index, *position):
        calls.append(1)
        raise FileNotFoundError("no such dataset: /nowhere")

    monkeypatch.setattr("actdata.generation.loop.make_source", broken)
    with SharedActivationBuffer.create(100, (32,), "float32") as buf:
        stop = threading.Event()
        th = threading.Thread(target=run_supervised, args=(_cfg(), buf.spec, "cpu", 0, stop),
                              kwargs={"startup_attempts": 3, "max_backoff_s": 0.05})
        th.start()
        th.join(20)
        assert not th.is_alive() and len(calls) == 3  # not restarted forever
        st = read_statuses(buf.spec)[0]
        assert st["state"] == "failed" and "/nowhere" in st["last_error"]


def test_bad_dataset_is_reported_not_retried_forever(start_server, tmp_path):
    srv = start_server("dataset.name=" + str(tmp_path / "missing.jsonl"), base=["+preset=test"], timeout=300,
                       env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    h = wait_for(lambda: (lambda h: h["status"] == "failed" and h)(requests.get(srv.url + "/").json()), timeout=180)
    assert "missing.jsonl" in h["generators"][0]["last_error"]
    r = requests.get(srv.url + wire.TENSOR_PATH)
    assert r.status_code == 503 and "Retry-After" in r.headers
