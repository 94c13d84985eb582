"""Consumer groups through real servers (synthetic self-checking rows, real HTTP, real DataLoader workers, the
same-host path and a cluster directory): every group receives every row exactly once, an idle group is
dropped and the others go on, `skip` releases a laggard's rows and counts them, and the group routes refuse
what they must with a clear JSON answer."""
import threading
import time

import pytest
import requests
import torch
from torch.utils.data import DataLoader

from actdata import ActivationClient, RemoteActivationDataset
from actdata.generation.synthetic import verify_rows
from actdata.reading.failures import ActivationServerError

SMALL = ["buffer.activation_dim=16", "server.accelerator=cpu", "server.devices=1", "server.generators_per_device=1",
         "buffer.min_fill=0"]


def _group_server(start_server, prefix, *overrides):
    return start_server(*SMALL, f"buffer.prefix={prefix}", *overrides)


class Seen:
    """The row ids one group received, checked row by row."""

    def __init__(self):
        self.ids, self.torn, self.lock = [], 0, threading.Lock()

    def add(self, x: torch.Tensor) -> None:
        ids, ok = verify_rows(x)
        with self.lock:
            self.torn += int((~ok).sum())
            self.ids += ids.tolist()

    def has_all(self, n: int) -> bool:
        with self.lock:
            return len(self.ids) >= n and len(set(i for i in self.ids if i < n)) == n

    def assert_each_once(self, n: int) -> None:
        assert self.torn == 0
        assert len(self.ids) == len(set(self.ids)), "a row reached the group twice"
        assert set(range(n)) <= set(self.ids)


def _until(seen: Seen, n: int, read, deadline: float) -> None:
    while not seen.has_all(n) and time.time() < deadline:
        seen.add(read())


def test_three_groups_each_receive_every_row_exactly_once(start_server):
    """wait policy, 50k rows, groups held until all three registered: a DataLoader with two workers over
    HTTP, the same-host path, and the control client; each sees every row id once."""
    n = 50_000
    srv = _group_server(start_server, "t19exact", "buffer.size=3000", "buffer.max_groups=4",
                        "buffer.groups_expected=3")
    seen = {g: Seen() for g in ("dl", "local", "client")}
    entries = {}
    deadline = time.time() + 240

    def done(name):  # its entry as it finished, then dropped (as a finished trainer does) so no one waits on it
        entries[name] = {g["name"]: g for g in requests.get(srv.url + "/stats").json()["groups"]}[name]
        ActivationClient(srv.url, group=name).drop_group()

    def dataloader():
        ds = RemoteActivationDataset(srv.url, batch_size=500, local=False, group="dl")
        for x in DataLoader(ds, batch_size=None, num_workers=2):
            seen["dl"].add(x)
            if seen["dl"].has_all(n) or time.time() > deadline:
                break
        done("dl")

    def local():
        ds = RemoteActivationDataset(srv.url, batch_size=500, group="local")
        for x in ds:
            seen["local"].add(x)
            if seen["local"].has_all(n) or time.time() > deadline:
                break
        done("local")

    def client():
        with ActivationClient(srv.url, group="client") as c:
            _until(seen["client"], n, lambda: c.get_activations_tensor(500)[0], deadline)
        done("client")

    threads = [threading.Thread(target=f) for f in (dataloader, local, client)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, s in seen.items():
        s.assert_each_once(n)
    assert set(entries) == set(seen) and all(g["rows_skipped"] == 0 for g in entries.values())
    assert all(entries[g]["rows_read"] >= len(seen[g].ids) for g in seen)  # a worker's prefetched batches count
    assert requests.get(srv.url + "/stats").json()["groups"] == []


def test_an_idle_group_is_dropped_and_the_others_go_on(start_server):
    srv = _group_server(start_server, "t19idle", "buffer.size=1000", "buffer.max_groups=4",
                        "buffer.groups_expected=2", "buffer.group_idle_s=2")
    fast, idle = ActivationClient(srv.url, group="fast"), ActivationClient(srv.url, group="idle")
    fast.register_group()
    idle.get_activations_tensor(100)  # registers, then reads nothing more
    seen = Seen()
    t0 = time.time()
    _until(seen, 5000, lambda: fast.get_activations_tensor(200)[0], t0 + 60)
    seen.assert_each_once(5000)  # 5x the buffer: only possible once the idle group was dropped
    names = [g["name"] for g in fast.groups()["groups"]]
    assert names == ["fast"]
    assert "consumer group idle dropped (idle for more than buffer.group_idle_s=2 s)" in srv.log_tail(100_000)
    with pytest.raises(ActivationServerError) as e:
        fast.drop_group("idle")
    assert e.value.status == 404
    idle.get_activations_tensor(10)  # a dropped group that comes back registers again
    assert {g["name"] for g in fast.groups()["groups"]} == {"fast", "idle"}


def test_skip_releases_a_laggards_rows_and_counts_them(start_server):
    srv = _group_server(start_server, "t19skip", "buffer.size=1000", "buffer.max_groups=4",
                        "buffer.groups_expected=2", "buffer.group_lag=skip")
    fast, slow = ActivationClient(srv.url, group="fast"), ActivationClient(srv.url, group="slow")
    slow_seen, fast_seen = Seen(), Seen()
    fast.register_group()
    slow_seen.add(slow.get_activations_tensor(100)[0])
    _until(fast_seen, 8000, lambda: fast.get_activations_tensor(250)[0], time.time() + 90)
    fast_seen.assert_each_once(8000)  # the fast group never waited for the slow one, and missed nothing
    slow_seen.add(slow.get_activations_tensor(100)[0])
    assert len(slow_seen.ids) == len(set(slow_seen.ids)) and slow_seen.torn == 0
    st = requests.get(srv.url + "/stats").json()
    g = {x["name"]: x for x in st["groups"]}
    assert st["group_policy"] == "skip" and g["fast"]["rows_skipped"] == 0
    assert g["slow"]["rows_read"] == 200 and g["slow"]["rows_skipped"] >= 8000 - 1000
    # every row written was read, skipped or is still ready to the slow group (a writer batch may be between)
    accounted = g["slow"]["rows_read"] + g["slow"]["rows_skipped"] + g["slow"]["lag"]
    assert st["rows_written"] - 1024 <= accounted <= st["rows_written"] + 1024
    metrics = requests.get(srv.url + "/metrics").text
    assert 'actdata_group_rows_skipped_total{group="slow"}' in metrics


def test_group_routes_limits_names_and_api_key(start_server):
    srv = _group_server(start_server, "t19routes", "buffer.size=500", "buffer.max_groups=2",
                        "server.api_key=sekret", "buffer.group_idle_s=600")
    key = {"Authorization": "Bearer sekret"}
    url = srv.url
    calls = (("GET", "/groups", None), ("POST", "/groups", {"name": "a"}), ("DELETE", "/groups/a", None),
             ("GET", "/activations/tensor?num_samples=1&group=a", None))
    for method, path, body in calls:
        r = requests.request(method, url + path, json=body)
        assert r.status_code == 401 and "API key" in r.json()["detail"]
    assert requests.post(url + "/groups", json={"name": "a"}, headers=key).json()["name"] == "a"
    assert requests.post(url + "/groups", json={"name": "a"}, headers=key).status_code == 200  # again: harmless
    assert requests.post(url + "/groups", json={"name": "b.2_x-y"}, headers=key).status_code == 200
    r = requests.post(url + "/groups", json={"name": "c"}, headers=key)
    assert r.status_code == 409 and "buffer.max_groups=2" in r.json()["detail"]
    r = requests.get(url + "/activations/tensor?num_samples=1&group=c", headers=key)
    assert r.status_code == 409 and "max_groups" in r.json()["detail"]
    for bad in ("a b", "x" * 65, "", "é"):
        r = requests.post(url + "/groups", json={"name": bad}, headers=key)
        assert r.status_code == 422 and "name" in r.json()["detail"], bad
    r = requests.get(url + "/activations/tensor", params={"num_samples": 1, "group": "a/b"}, headers=key)
    assert r.status_code == 422 and "group" in r.json()["detail"]
    assert requests.delete(url + "/groups/nope", headers=key).status_code == 404
    listing = requests.get(url + "/groups", headers=key).json()
    assert listing["max_groups"] == 2 and listing["group_policy"] == "wait" and listing["groups_expected"] == 0
    entry = listing["groups"][0]
    assert set(entry) == {"name", "state", "rows_read", "lag", "rows_per_s", "rows_skipped", "last_seen",
                          "registered"}
    assert requests.delete(url + "/groups/a", headers=key).json()["dropped"]["name"] == "a"
    assert requests.post(url + "/groups", json={"name": "c"}, headers=key).status_code == 200
    # a reader that names no group reads as the group "default": here there is no room for it
    r = requests.get(url + "/activations/tensor?num_samples=1", headers=key)
    assert r.status_code == 409 and "'default'" in r.json()["detail"]


def test_a_server_without_groups_says_so(start_server):
    srv = _group_server(start_server, "t19off", "buffer.size=500")
    r = requests.get(srv.url + "/activations/tensor?num_samples=1&group=a")
    assert r.status_code == 409 and "buffer.max_groups" in r.json()["detail"]
    assert requests.post(srv.url + "/groups", json={"name": "a"}).status_code == 409
    assert requests.get(srv.url + "/groups").json() == {"groups": [], "group_policy": None, "max_groups": 0,
                                                         "groups_expected": 0}
    ds = RemoteActivationDataset(srv.url, batch_size=10, group="a")  # same-host path: the same refusal
    with pytest.raises(ActivationServerError) as e:
        next(iter(ds))
    assert e.value.status == 409
    assert requests.get(srv.url + "/activations/tensor?num_samples=1").status_code == 200  # no group: as before


def test_groups_expected_holds_serving_until_enough_groups_registered(start_server):
    srv = _group_server(start_server, "t19held", "buffer.size=500", "buffer.max_groups=4",
                        "buffer.groups_expected=2")
    r = requests.get(srv.url + "/activations/tensor?num_samples=10&group=a")
    assert r.status_code == 503 and r.headers["Retry-After"]
    assert "1 of buffer.groups_expected=2 registered" in r.json()["detail"]
    assert requests.post(srv.url + "/groups", json={"name": "b"}).status_code == 200
    deadline = time.time() + 30
    while (r := requests.get(srv.url + "/activations/tensor?num_samples=10&group=a")).status_code == 503:
        assert time.time() < deadline, r.text
        time.sleep(0.2)
    assert r.status_code == 200


def test_directory_reader_reads_as_a_group(start_server):
    """Two groups through a cluster directory (no Ray: the directory alone, listing one server)."""
    from actdata.cluster.directory import Directory

    srv = _group_server(start_server, "t19dir", "buffer.size=1000", "buffer.max_groups=4",
                        "buffer.groups_expected=2")
    d = Directory(poll_interval_s=0.1, drop_after_s=5)
    url = d.start()
    try:
        d.set_member("node-a", srv.url, node_rank=0)
        seen = {g: Seen() for g in ("x", "y")}

        def read(g):
            for x in RemoteActivationDataset(url, batch_size=250, group=g, max_samples=4000):
                seen[g].add(x)

        threads = [threading.Thread(target=read, args=(g,)) for g in seen]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for s in seen.values():  # each group got its 4000 rows, none twice
            assert len(s.ids) == 4000 and len(set(s.ids)) == 4000 and s.torn == 0
        assert set(seen["x"].ids) & set(seen["y"].ids)  # the same stream, read by both
    finally:
        d.stop()


def test_group_memory_is_in_the_estimate_and_a_start_that_does_not_fit_is_refused(tmp_path):
    """8 bytes per group per row slot (plus 16 per slot) are counted before anything is allocated: 50M rows
    of 64 bytes (5 GB with the index) take 30 GB with 64 groups, more than /dev/shm here: refused in one line."""
    import os
    import subprocess
    import sys

    from test_config import load

    from actdata.config import estimate_bytes

    base = estimate_bytes(load("+preset=test", "buffer.size=100000"), (16,))
    grouped = estimate_bytes(load("+preset=test", "buffer.size=100000", "buffer.max_groups=8"), (16,))
    assert grouped - base >= 100_000 * (8 * 8 + 16)
    prefix = "t19toobig"
    r = subprocess.run([sys.executable, "-m", "actdata.serve", "+preset=test", "generator.source=synthetic",
                        "buffer.activation_dim=16", "buffer.size=50000000", "buffer.max_groups=64",
                        "server.log_file=null", f"buffer.prefix={prefix}"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "GB free" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert [n for n in os.listdir("/dev/shm") if n.startswith(prefix)] == []


def test_a_reader_killed_mid_read_does_not_hold_its_groups_rows():
    """A process that claimed rows for a group and died before releasing them: the periodic reclaim frees
    them (counted as read by that group, as without groups), so the writer is not blocked for good."""
    import multiprocessing as mp
    import os

    from actdata.shm import SharedActivationBuffer

    buf = SharedActivationBuffer.create(64, (4,), prefix="t19reclaim", max_groups=2)
    try:
        buf.groups.configure("wait", 60.0, 0)
        buf.groups.register("a")
        buf.write(torch.zeros(64, 4))
        assert buf.stats()["free"] == 0

        def die_mid_read():
            buf.claim_ready(48, group="a")
            os._exit(0)

        p = mp.get_context("fork").Process(target=die_mid_read)
        p.start()
        p.join()
        assert buf.stats()["free"] == 0  # the dead process's 48 claims still hold their slots
        assert buf.reclaim_orphans() == 48
        st = buf.stats()
        assert st["free"] == 48 and st["groups"][0]["lag"] == 16
        ids, _ = buf.read(16, group="a")  # the rest is still the group's to read, once
        assert buf.stats()["free"] == 64
    finally:
        buf.close()


def test_a_group_refused_on_a_full_buffer_is_told_which_group_holds_it():
    """wait policy: a group that stopped reading holds every slot; the others' 503 names it and the keys
    that decide (a user saw only "0 rows ready")."""
    from actdata.shm import NotReady, SharedActivationBuffer

    buf = SharedActivationBuffer.create(32, (4,), prefix="t19hold", max_groups=2)
    try:
        buf.groups.configure("wait", 60.0, 0)
        buf.groups.register("stalled")
        buf.write(torch.zeros(32, 4))
        buf.read(32, group="fast")  # registers with the 32 ready rows, reads them all
        with pytest.raises(NotReady, match=r"full of rows group stalled has not read .*group_idle_s=60"):
            buf.read(8, group="fast")
    finally:
        buf.close()
