"""actdata on a Ray cluster: `python -m actdata.cluster +preset=NAME cluster.address=auto key=value ...`.

The only module that imports Ray (`pip install actdata[cluster]`). Order of work: compose and validate
the config (the same schema and overrides as actdata.serve, plus the `cluster` group), connect to an
existing Ray cluster (`cluster.address`), choose the nodes (`cluster.nodes`: auto = nodes with GPUs, all
nodes when none has one; a number; or a resource label), report nodes that lack the resources a server
asks for, and start one `ServerActor` per remaining node, pinned to it (node affinity, not soft). Node
i of N runs the ordinary server (`python -m actdata.serve` with the same overrides and
`server.node_rank=i server.num_nodes=N`, so that its generators are g = i * local + index of the global
numbering) in its own process group; the server gets SIGTERM if its actor dies, and the actor exits if
its server dies, so that Ray restarts the pair (`cluster.max_restarts`) with the same node rank.

On the head, in this process: the directory (actdata.cluster.directory), told each server's URL as soon as its
actor reports it, and the supervision loop (every 0.25 s: each actor's `info()`, asked again a second
after its last answer). Ctrl-C / SIGTERM stops the servers, the actors and the directory.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Optional

from ..auth import API_KEY_ENV, resolve_api_key
from ..config import ClusterConfig, Config, ConfigError, to_config, validate

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class NoCluster(RuntimeError):
    """No Ray cluster answers at cluster.address."""


# -- choosing nodes (plain functions over `ray.nodes()` records) --------------------------------------

def select_nodes(nodes: list[dict], c: ClusterConfig) -> list[dict]:
    """The alive nodes `cluster.nodes` asks for, in a stable order (address, node id)."""
    alive = sorted((n for n in nodes if n.get("Alive")), key=lambda n: (n["NodeManagerAddress"], n["NodeID"]))
    if c.nodes == "auto":
        return [n for n in alive if n["Resources"].get("GPU", 0) > 0] or alive
    if isinstance(c.nodes, int):
        if len(alive) < c.nodes:
            raise ConfigError(f"cluster.nodes: asks for {c.nodes} nodes, the Ray cluster has {len(alive)} alive")
        return alive[:c.nodes]
    chosen = [n for n in alive if n["Resources"].get(c.nodes, 0) > 0]
    if not chosen:
        labels = sorted({k for n in alive for k in n["Resources"]
                         if not k.startswith(("node:", "accelerator_type:"))
                         and k not in ("memory", "object_store_memory")})
        raise ConfigError(f"cluster.nodes: no alive node has the resource {c.nodes!r} (resources in the cluster: "
                          f"{', '.join(labels)}); start nodes with `ray start --resources='{{\"{c.nodes}\": 1}}'`")
    return chosen


def server_resources(node: dict, c: ClusterConfig) -> dict:
    """What one server actor on `node` reserves: cluster.cpus_per_server CPUs, and GPUs (auto = all of the node's)."""
    gpus = node["Resources"].get("GPU", 0) if c.gpus_per_server == "auto" else c.gpus_per_server
    return {"CPU": float(c.cpus_per_server), "GPU": float(gpus)}


def missing_resources(node: dict, c: ClusterConfig) -> Optional[str]:
    """Why `node` cannot hold a server (one line naming the node and the key), or None."""
    for name, need in server_resources(node, c).items():
        have = node["Resources"].get(name, 0)
        if need > have:
            key = "cluster.cpus_per_server" if name == "CPU" else "cluster.gpus_per_server"
            return (f"node {node['NodeID'][:12]} ({node['NodeManagerAddress']}) offers {name} {have:g}, "
                    f"a server asks for {need:g} ({key})")
    return None


# -- the actor --------------------------------------------------------------------------------------------

class ServerActor:
    """One node's server: `python -m actdata.serve` with this node's rank, its URL reachable from
    elsewhere (`public_host`: the node's address when bound to all interfaces). Made a Ray actor by
    `start_servers` (`ray.remote(ServerActor).options(...)`)."""

    def __init__(self, overrides: list[str], node_rank: int, num_nodes: int, public_host: str,
                 start_timeout: float, env: Optional[dict] = None):
        from ..serving.process import ServerProcess

        self.node_rank, self.started_at = node_rank, time.time()
        args = [*overrides, f"server.node_rank={node_rank}", f"server.num_nodes={num_nodes}"]
        self.server = ServerProcess(args, timeout=start_timeout, env=env, die_with_parent=True)
        host = f"[{public_host}]" if ":" in public_host else public_host
        self.url = f"http://{host}:{self.server.port}"
        threading.Thread(target=self._exit_with_server, name="actdata-server-watch", daemon=True).start()

    def _exit_with_server(self) -> None:
        code = self.server.proc.wait()
        if not getattr(self, "_stopping", False):  # the server died: so does the actor, and Ray restarts both
            sys.stderr.write(f"actdata server exited with code {code}; log tail:\n{self.server.log_tail()}\n")
            os._exit(1)

    def info(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {"url": self.url, "node_rank": self.node_rank, "actor_pid": os.getpid(),
                "server_pid": self.server.proc.pid, "node_id": ctx.get_node_id(),
                "restarted": bool(ctx.was_current_actor_reconstructed), "started_at": self.started_at}

    def stop(self) -> int:
        self._stopping = True
        return self.server.stop()


# -- the driver -----------------------------------------------------------------------------------------

def connect(address: str) -> None:
    """ray.init to an existing cluster, or NoCluster with how to start one."""
    how = ("start one with `ray start --head` on the head node (and `ray start --address=HEAD:6379` on the others), "
           "then run this on the head with cluster.address=auto, or pass cluster.address=HOST:PORT")
    if address not in ("auto",) and not address.startswith("ray://"):
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=3.0).close()
        except (OSError, ValueError) as e:
            raise NoCluster(f"no Ray cluster at cluster.address={address} ({type(e).__name__}: {e}); {how}") from None
    import ray

    try:
        ray.init(address=address, namespace="actdata", logging_level=logging.WARNING, log_to_driver=False,
                 configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NoCluster(f"no Ray cluster at cluster.address={address} ({first}); {how}") from None


def _server_overrides(overrides: list[str]) -> list[str]:
    """The command line's overrides that concern a server (not cluster.*, hydra.*, the node numbering)."""
    skip = ("cluster.", "hydra.", "server.node_rank=", "server.num_nodes=", "server.ready_file=")
    return [o for o in overrides if not o.lstrip("+~").startswith(skip)]


class _Node:
    def __init__(self, node: dict, rank: int, actor):
        self.node, self.rank, self.actor = node, rank, actor
        self.id = node["NodeID"]
        self.ref, self.next_at, self.asked_at, self.answered_at = None, 0.0, time.time(), None


def start_servers(cfg: Config, overrides: list[str], directory) -> list[_Node]:
    """Choose the nodes, report those lacking resources, start one pinned ServerActor on each of the rest."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    c = cfg.cluster
    chosen = select_nodes(ray.nodes(), c)
    usable = []
    for n in chosen:
        why = missing_resources(n, c)
        if why:
            log.error("%s: no server on this node", why)
            directory.set_problem(n["NodeID"], why)
        else:
            usable.append(n)
    if not usable:
        raise ConfigError(f"cluster.nodes: none of the {len(chosen)} chosen nodes can hold a server "
                          f"(see GET / of the directory, or the lines above)")
    directory.expected = len(usable)
    bind_all = cfg.server.host in ("0.0.0.0", "::")
    server_args = _server_overrides(overrides)
    env = {API_KEY_ENV: cfg.server.api_key} if cfg.server.api_key else {}
    out = []
    for rank, n in enumerate(usable):
        res = server_resources(n, c)
        actor = ray.remote(ServerActor).options(
            name=f"actdata-server-{rank}", num_cpus=res["CPU"], num_gpus=res["GPU"],
            max_restarts=c.max_restarts, max_task_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
        ).remote(server_args, rank, len(usable), n["NodeManagerAddress"] if bind_all else
                 {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(cfg.server.host, cfg.server.host),
                 c.start_timeout_s, env)
        log.info("node %d/%d: %s (%s), %s", rank, len(usable), n["NodeID"][:12], n["NodeManagerAddress"], res)
        out.append(_Node(n, rank, actor))
    return out


def supervise(nodes: list[_Node], directory, stop: threading.Event, c: ClusterConfig) -> None:
    """Keep the directory's member table in step with the actors until `stop` is set."""
    import ray
    from ray.exceptions import ActorDiedError, RayActorError

    while not stop.is_set():
        now = time.time()
        for s in nodes:
            if s.ref is None and now >= s.next_at:
                s.ref, s.asked_at = s.actor.info.remote(), now
        refs = [s.ref for s in nodes if s.ref is not None]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0.25) if refs else ([], [])
        ready = set(ready)
        for s in nodes:
            if s.ref is None:
                continue
            if s.ref in ready:
                try:
                    info = ray.get(s.ref)
                except ActorDiedError as e:  # restarts exhausted, or its __init__ failed
                    reason = str(e).strip().splitlines()
                    directory.remove_member(s.id)
                    directory.set_problem(s.id, f"node {s.id[:12]} ({s.node['NodeManagerAddress']}): server actor "
                                                f"dead: {' '.join(reason)[:600]}")
                    s.next_at = time.time() + 5.0
                except RayActorError:  # died in flight; Ray restarts it and answers the next call
                    s.next_at = time.time() + 0.25
                else:
                    directory.set_member(s.id, info["url"], node_rank=s.rank, node_ip=s.node["NodeManagerAddress"],
                                         actor_pid=info["actor_pid"], server_pid=info["server_pid"],
                                         restarted=info["restarted"])
                    s.answered_at, s.next_at = time.time(), time.time() + 1.0
                s.ref = None
            elif now - s.asked_at > c.start_timeout_s:
                directory.set_problem(s.id, f"node {s.id[:12]} ({s.node['NodeManagerAddress']}): server actor has "
                                            f"not answered for {now - s.asked_at:.0f} s (pending resources "
                                            f"{server_resources(s.node, c)}, or its server is still starting)")


def run(cfg: Config, overrides: list[str]) -> None:
    """Connect, start the directory and the servers, supervise until interrupted, then stop everything."""
    from ..serving.procs import setup_logging
    from .directory import Directory

    setup_logging(cfg.log_level, cfg.server.log_file)
    validate(cfg)
    c = cfg.cluster
    api_key = resolve_api_key(cfg.server.api_key)
    for key, host in (("cluster.directory_host", c.directory_host), ("server.host", cfg.server.host)):
        if host not in LOOPBACK and not api_key:
            raise ConfigError(f"{key}: binding {host} (reachable from other machines) needs an API key: "
                              f"set server.api_key or ACTDATA_API_KEY")
    cfg.server.api_key = api_key
    connect(c.address)
    import ray

    directory = Directory(c.directory_host, c.directory_port, api_key, poll_interval_s=c.poll_interval_s,
                          drop_after_s=c.drop_after_s)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    nodes: list[_Node] = []
    try:
        url = directory.start()
        nodes = start_servers(cfg, overrides, directory)
        log.info("actdata directory on %s (GET /servers, /stats); point trainers at it: "
                 "RemoteActivationDataset(%r)", url, url)
        if c.ready_file:
            tmp = c.ready_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"url": url, "port": directory.port, "pid": os.getpid()}, f)
            os.replace(tmp, c.ready_file)
        supervise(nodes, directory, stop, c)
    finally:
        log.info("stopping %d servers", len(nodes))
        stops = [s.actor.stop.remote() for s in nodes]
        if stops:
            ray.wait(stops, num_returns=len(stops), timeout=30)
        for s in nodes:
            ray.kill(s.actor, no_restart=True)
        directory.stop()
        ray.shutdown()
        if c.ready_file:
            try:
                os.unlink(c.ready_file)
            except OSError:
                pass


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from ..config import register
    from ..serving.main import CONF_DIR

    register()

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
    def _main(node) -> None:
        try:
            run(to_config(node), list(HydraConfig.get().overrides.task))
        except ConfigError as e:
            print(f"actdata.cluster: bad config: {e}", file=sys.stderr)
            sys.exit(2)
        except NoCluster as e:
            print(f"actdata.cluster: {e}", file=sys.stderr)
            sys.exit(2)

    _main()


if __name__ == "__main__":
    main()
