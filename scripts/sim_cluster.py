"""A simulated Ray cluster on this machine, in its own process, for tests and benchmarks.

    python scripts/sim_cluster.py --cpus 1 1 0 [--resource actdata] [--object-store-mb 75]

Starts ray.cluster_utils.Cluster: a head without CPUs and one node per `--cpus` value, each with that
many CPUs and the custom resource `--resource` (simulated nodes share one IP, so the resource is what
tells them from the head). Prints `ADDRESS <host:port>` on stdout, then waits until stdin is closed (its
parent ended it or died) or SIGTERM, and shuts down this cluster only (never `ray stop`). Keeping Ray in
this process leaves the caller free of Ray's threads, so it can fork DataLoader workers safely.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpus", type=float, nargs="+", default=[1, 1])
    p.add_argument("--resource", default="actdata")
    p.add_argument("--object-store-mb", type=int, default=75, help="per node; Ray's store lives in /dev/shm")
    a = p.parse_args()
    from ray.cluster_utils import Cluster

    store = a.object_store_mb * 1024 * 1024
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": store,
                                                            "include_dashboard": False})
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        for cpus in a.cpus:
            cluster.add_node(num_cpus=cpus, resources={a.resource: 1}, object_store_memory=store)
        cluster.wait_for_nodes()
        print(f"ADDRESS {cluster.address}", flush=True)
        threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
        done.wait()
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
