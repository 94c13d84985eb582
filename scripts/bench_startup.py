"""P5 and P6: start-up time against capacity, and the cost of a request against capacity.

    .venv/bin/python scripts/bench_startup.py

P5: time from `python -m actdata.serve` to the first answered `GET /` (synthetic source), and the buffer
allocation alone, at 1 GB and 16 GB of rows (4096 wide, float32). Goal: 16 GB within 1.2 x the 1 GB time.
P6: `GET /activations/tensor?num_samples=4096` (768 wide, float32, rows reused) at capacity 10,000 and
1,000,000. Goal: the large buffer costs at most 1.5 x the small one. Both buffers are written full first,
so the large one really is 3 GB of touched memory that random rows are gathered from.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import requests

from actdata.reading.client import TensorReader
from actdata.serving.process import ServerProcess
from actdata.shm import SharedActivationBuffer
from actdata.shm.segment import SHM_DIR

GB = 1e9


def startup(rows: int, dim: int = 4096) -> float:
    t = time.perf_counter()
    with ServerProcess(["+preset=test", "generator.source=synthetic", f"buffer.size={rows}",
                        f"buffer.activation_dim={dim}", "generator.rows_per_second=1"]):
        return time.perf_counter() - t


def allocate(rows: int, dim: int = 4096) -> float:
    t = time.perf_counter()
    SharedActivationBuffer.create(rows, (dim,), "float32").close()
    return time.perf_counter() - t


def request_cost(rows: int, k: int = 4096, reps: int = 40) -> float:
    with ServerProcess(["+preset=test", "generator.source=synthetic", f"buffer.size={rows}",
                        "buffer.max_reads=1000000000", "buffer.min_fill=0.01", "server.workers=1"]) as srv:
        while requests.get(srv.url + "/stats").json()["fill"] < 0.999:
            time.sleep(0.5)
        reader = TensorReader(srv.url)
        for _ in range(5):
            reader.fetch(k)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            reader.fetch(k)
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)


def main() -> None:
    need = 16.5 * GB
    st = os.statvfs(SHM_DIR)
    if st.f_bavail * st.f_frsize < need:
        sys.exit(f"P5 needs {need / GB:.1f} GB free in {SHM_DIR}")
    small, large = 1 * GB // (4096 * 4), 16 * GB // (4096 * 4)
    a_small = statistics.median(allocate(int(small)) for _ in range(3))
    a_large = statistics.median(allocate(int(large)) for _ in range(3))
    s_small = statistics.median(startup(int(small)) for _ in range(3))
    s_large = statistics.median(startup(int(large)) for _ in range(3))
    print("| P5 | 1 GB | 16 GB | ratio (goal <= 1.2) |\n|---|---|---|---|")
    print(f"| buffer allocation | {a_small * 1e3:.1f} ms | {a_large * 1e3:.1f} ms | {a_large / a_small:.2f} |")
    print(f"| server start to first answer | {s_small:.2f} s | {s_large:.2f} s | {s_large / s_small:.2f} |")
    c_small, c_large = request_cost(10_000), request_cost(1_000_000)
    print("\n| P6 | capacity 10,000 | capacity 1,000,000 | ratio (goal <= 1.5) |\n|---|---|---|---|")
    print(f"| GET /activations/tensor, k=4096 x 768 fp32 | {c_small * 1e3:.1f} ms | {c_large * 1e3:.1f} ms | "
          f"{c_large / c_small:.2f} |")


if __name__ == "__main__":
    main()
