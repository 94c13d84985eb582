"""scripts/gpu_check.sh runs on a machine without a GPU: `--device cpu --small` runs every check a CPU can
run (the generators through run_supervised in their own processes, a reader draining every buffer, the
forced float16 overflow, the outlier filter, the stop, the memory estimate, the end-to-end run with
statistics, saved state and status on), each under its own time limit, and prints one table with no FAIL.
The same script, on a device machine, is the GPU check."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_CHECKS = ["env", "placement", "dtype", "bf16->f32", "f16 overflow", "outliers", "stop", "memory", "e2e"]


def test_gpu_check_small_on_the_cpu_passes_and_prints_one_table():
    env = {**os.environ, "PYTHON": sys.executable, "LIMIT_S": "240"}
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu", "--small"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = {line.split("|")[1].strip(): line.split("|")[4].strip()
             for line in r.stdout.splitlines() if line.startswith("| ") and not line.startswith("| check")}
    assert all(table.get(name) == "PASS" for name in CPU_CHECKS), table
    assert set(table.values()) <= {"PASS", "SKIP"} and "compile" in table and "overlap" in table, table
