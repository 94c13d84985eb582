"""actdata on a Ray cluster: `python -m actdata.cluster` on a simulated cluster (scripts/sim_cluster.py,
ray.cluster_utils.Cluster: a head and three nodes, each its own raylet), its directory, and DataLoaders
that read through it.

Two of the three nodes can hold a server (cluster.nodes=actdata selects the nodes with that resource; one
of them has no CPU to give, so the directory must say which node and why). Synthetic rows carry their
generator's number in their id (id >> 40 = g), so rows from different nodes are told apart and checked.
Only the cluster this module started is shut down (never `ray stop`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from actdata.generation.synthetic import verify_rows
from actdata.host import group_pids
from actdata.reading.client import ActivationClient, ActivationServerError
from actdata.reading.dataset import RemoteActivationDataset, make_loader
from actdata.reading.directory import DirectoryClient, NotADirectory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBJECT_STORE = 75 * 1024 * 1024  # Ray's object store lives in /dev/shm, beside the buffers: keep it small


def _need_ray() -> None:
    """Skip without actdata[cluster]; found, not imported: this process stays free of Ray's threads."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("actdata[cluster] (ray) is not installed")


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _wait(what: str, fn, timeout: float = 150.0, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    _need_ray()
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    tmp = tmp_path_factory.mktemp("cluster")
    servers: list[int] = []
    log = open(str(tmp / "driver.log"), "wb")
    # Ray runs in its own process (this one forks DataLoader workers, which Ray's threads make unsafe);
    # the third node has the label but no CPU for a server
    sim = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "sim_cluster.py"), "--cpus", "1", "1", "0",
                            "--object-store-mb", str(OBJECT_STORE >> 20)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=log, env=env, text=True)
    try:
        line = sim.stdout.readline()
        assert line.startswith("ADDRESS "), open(log.name).read()[-3000:]
        ready = str(tmp / "directory.json")
        driver = subprocess.Popen(
            [sys.executable, "-m", "actdata.cluster", "+preset=test", "generator.source=synthetic",
             "generator.rows_per_second=5000", "buffer.size=2000", "server.workers=1", "server.log_file=null",
             f"cluster.address={line.split()[1]}", "cluster.nodes=actdata", "cluster.directory_port=0",
             f"cluster.ready_file={ready}", "cluster.start_timeout_s=120"],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            def directory_url():
                assert driver.poll() is None, open(log.name).read()[-3000:]
                return os.path.exists(ready) and json.load(open(ready))["url"]

            url = _wait("the directory", directory_url)
            _wait("two serving servers", lambda: _get(url + "/")["serving_servers"] == 2)
            yield {"url": url, "log": log.name}
            servers = [s["server_pid"] for s in _get(url + "/servers")["servers"]]
        finally:
            driver.send_signal(signal.SIGTERM)
            try:
                driver.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
    finally:
        sim.stdin.close()  # it shuts down the cluster it started, and only that one
        sim.wait(120)
        log.close()
    # the driver's stop stops every server it started; one left behind would serve on, orphaned
    deadline = time.time() + 20
    while time.time() < deadline and any(group_pids(p) for p in servers):  # each server leads its group
        time.sleep(0.2)
    left = [p for p in servers if group_pids(p)]
    for p in left:
        os.killpg(p, signal.SIGKILL)
    assert not left, f"servers left running after the cluster stopped: {left}"


def test_directory_lists_one_server_per_node_and_says_why_a_node_has_none(cluster):
    url = cluster["url"]
    listing = _get(url + "/servers")
    servers = listing["servers"]
    assert sorted(s["node_rank"] for s in servers) == [0, 1]
    assert len({s["node_id"] for s in servers}) == 2 and len({s["url"] for s in servers}) == 2
    assert all(s["serving"] and s["health"] == "ok" and s["capacity"] == 2000 for s in servers)
    # the labelled node without a CPU to give: named, with the key to change
    (problem,) = listing["problems"]
    assert problem["node_id"] not in {s["node_id"] for s in servers}
    assert problem["node_id"][:12] in problem["reason"] and "cluster.cpus_per_server" in problem["reason"]

    with ActivationClient(url) as c:  # the control client works against a directory too
        h = c.health()
        assert h["kind"] == "actdata-directory" and h["servers"] == 2 and h["status"] == "degraded"
        st = c.get_stats()
        assert st["capacity"] == 4000 and st["server_count"] == 2
        assert c.wait_for_data(min_samples=100, timeout=30)
        # a directory serves no rows: a clear 409 at once, not a hang
        with pytest.raises(ActivationServerError) as e:
            c.get_activations_tensor(8)
        assert e.value.status == 409 and "/servers" in e.value.detail
    with pytest.raises(NotADirectory, match="is an actdata server"):
        DirectoryClient(servers[0]["url"]).servers()
    for s in servers:  # the servers Ray started run without Ray: no Ray library mapped into them
        with open(f"/proc/{s['server_pid']}/maps") as f:
            assert "/site-packages/ray/" not in f.read()


def test_dataloader_reads_every_node_and_rows_are_disjoint(cluster):
    ds = RemoteActivationDataset(cluster["url"], batch_size=128, max_batches=40, retry_for_s=60)
    ids = []
    for x in make_loader(ds, num_workers=2):
        got, ok = verify_rows(x)
        assert ok.all()
        ids.append(got)
    ids = torch.cat(ids)
    assert len(ids) == 40 * 128
    assert set((ids >> 40).tolist()) == {0, 1}  # generator g = node_rank * 1 + 0: both nodes were read
    assert len(torch.unique(ids)) == len(ids)  # serve-once per server, disjoint id ranges across nodes
    assert not [m for m in sys.modules if m == "ray" or m.startswith("ray.")]  # the reading side needs no Ray


def test_killed_server_is_dropped_restarted_and_read_again(cluster):
    url = cluster["url"]
    victim = next(s for s in _get(url + "/servers")["servers"] if s["node_rank"] == 0)
    ds = RemoteActivationDataset(url, batch_size=128, retry_for_s=60)
    it = iter(make_loader(ds, num_workers=2))
    gens = lambda x: set((verify_rows(x)[0] >> 40).tolist())
    seen = set()
    for _ in range(10):
        seen |= gens(next(it))
    assert seen == {0, 1}

    os.kill(victim["actor_pid"], signal.SIGKILL)  # the actor; its server gets SIGTERM from the kernel
    ranks = lambda: {s["node_rank"]: s for s in _get(url + "/servers")["servers"]}
    phase, after_drop, after_return, deadline = "drop", 0, set(), time.time() + 150
    while phase != "done":
        assert time.time() < deadline, f"stuck in phase {phase}; driver log:\n{open(cluster['log']).read()[-3000:]}"
        x = next(it)  # the loop keeps delivering throughout: no error reaches it
        listed = ranks()
        if phase == "drop" and 0 not in listed:
            phase = "restart"
        elif phase == "restart":
            after_drop += 1
            assert 1 in listed  # the survivor stays listed
            if 0 in listed and listed[0]["url"] != victim["url"] and listed[0]["serving"]:
                assert listed[0]["restarted"] and listed[0]["node_id"] == victim["node_id"]
                phase = "read"
        elif phase == "read":
            after_return |= gens(x)
            if 0 in after_return:
                phase = "done"
    assert after_drop > 0  # batches arrived while node 0 was gone


def test_no_ray_cluster_at_the_address_is_one_line():
    _need_ray()
    r = subprocess.run([sys.executable, "-m", "actdata.cluster", "generator.source=synthetic",
                        "cluster.address=127.0.0.1:9"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no Ray cluster at cluster.address=127.0.0.1:9" in lines[0]
    assert "ray start --head" in lines[0]


def test_node_selection_and_missing_resources():
    from actdata.cluster.driver import missing_resources, select_nodes
    from actdata.config import ClusterConfig, ConfigError

    def node(i, **res):
        return {"NodeID": f"{i:02d}" + "ab" * 27, "NodeManagerAddress": f"10.0.0.{i}", "Alive": True,
                "Resources": {"CPU": 8.0, "memory": 1e10, f"node:10.0.0.{i}": 1.0, **res}}

    nodes = [node(2, GPU=4.0), node(1), node(3, GPU=8.0, actdata=1.0), {**node(4, GPU=1.0), "Alive": False}]
    assert [n["NodeManagerAddress"] for n in select_nodes(nodes, ClusterConfig())] == ["10.0.0.2", "10.0.0.3"]
    assert len(select_nodes(nodes, ClusterConfig(nodes=3))) == 3
    assert [n["NodeManagerAddress"] for n in select_nodes(nodes, ClusterConfig(nodes="actdata"))] == ["10.0.0.3"]
    with pytest.raises(ConfigError, match="cluster.nodes: asks for 4 nodes, the Ray cluster has 3 alive"):
        select_nodes(nodes, ClusterConfig(nodes=4))
    with pytest.raises(ConfigError, match="no alive node has the resource 'big'"):
        select_nodes(nodes, ClusterConfig(nodes="big"))
    assert missing_resources(nodes[0], ClusterConfig()) is None
    why = missing_resources(nodes[1], ClusterConfig(gpus_per_server=1))
    assert "node 01abab" in why and "10.0.0.1" in why and "offers GPU 0" in why and "cluster.gpus_per_server" in why


def test_directory_conventions_without_ray():
    """The directory alone (no Ray): API key on all but GET /, {"detail"} errors, a silent member not listed."""
    import urllib.error

    from actdata.cluster.directory import Directory

    d = Directory(api_key="sekret", poll_interval_s=0.1, drop_after_s=0.3)
    url = d.start()
    try:
        d.set_member("node-a", "http://127.0.0.1:9", node_rank=0)  # nothing answers there
        d.set_problem("node-b", "node node-b (10.0.0.2) offers GPU 0, a server asks for 1 (cluster.gpus_per_server)")

        def call(path, key=None, method="GET"):
            req = urllib.request.Request(url + path, method=method,
                                         headers={"Authorization": f"Bearer {key}"} if key else {})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        status, h = call("/")
        assert status == 200 and h["kind"] == "actdata-directory" and h["servers"] == 0
        assert h["problems"][0]["node_id"] == "node-b" and h["down"][0]["url"] == "http://127.0.0.1:9"
        assert call("/servers")[0] == 401 and "API key" in call("/servers")[1]["detail"]
        status, listing = call("/servers", "sekret")
        assert status == 200 and listing["servers"] == [] and listing["down"][0]["health"] == "starting"
        assert call("/stats", "sekret")[1]["capacity"] == 0
        assert call("/activations/tensor?num_samples=4", "sekret")[0] == 409
        assert call("/nope", "sekret")[0] == 404 and "detail" in call("/nope", "sekret")[1]
        assert call("/servers", "sekret", method="POST")[0] == 405
        assert DirectoryClient(url, api_key="sekret").servers() == []
    finally:
        d.stop()
