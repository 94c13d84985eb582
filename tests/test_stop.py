"""A stop is clean: no semaphore left to Python's resource tracker, the buffer file removed."""
import glob
import multiprocessing as mp
import os
import time

import requests

SEMAPHORES = "/dev/shm/sem.mp-*"


def _wait_serving(url, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if requests.get(url + "/").json()["serving"]:
            return
        time.sleep(0.2)
    raise AssertionError("server never started serving")


def test_a_file_backed_server_stops_clean(start_server, tmp_path):
    before = set(glob.glob(SEMAPHORES))
    path = tmp_path / "rows.buf"
    srv = start_server(f"buffer.path={path}", "buffer.size=20000", "buffer.min_fill=0.5")
    _wait_serving(srv.url)
    t0 = time.monotonic()
    assert srv.stop() == 0
    print(f"stopped in {time.monotonic() - t0:.2f} s")  # measured, not asserted
    time.sleep(0.5)  # the resource tracker, if it had anything to say, says it as the server exits
    log = srv.log_tail(1 << 20)
    assert "resource_tracker" not in log and "leaked" not in log, log[-2000:]
    assert set(glob.glob(SEMAPHORES)) - before == set()
    assert not path.exists() and not list(tmp_path.glob("rows.buf.*"))


def _bar_then_exit(conn):
    from tqdm import tqdm

    from actdata.serving.worker import _thread_lock_for_progress_bars

    _thread_lock_for_progress_bars()
    before = set(glob.glob(SEMAPHORES))
    for _ in tqdm(range(2), disable=False):
        pass
    conn.send(sorted(set(glob.glob(SEMAPHORES)) - before))
    os._exit(0)  # as a generator worker leaves on SIGTERM: no finalizers


def test_a_generator_worker_makes_no_semaphore_for_progress_bars():
    """tqdm's default lock is a named semaphore in a spawned process; the worker gives it a thread lock."""
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    p = ctx.Process(target=_bar_then_exit, args=(there,))
    p.start()
    assert here.poll(60)
    made = here.recv()
    p.join(30)
    assert p.exitcode == 0 and made == []
