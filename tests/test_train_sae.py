"""Smoke test of examples/train_sae.py against a live synthetic server: both modes run and report."""
import os
import re
import subprocess
import sys

from conftest import SYNTHETIC

from actdata.serving.process import ServerProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_sae_compare_flattens_multi_dim_rows():
    srv = ServerProcess([*SYNTHETIC, "buffer.size=4000", "buffer.min_fill=0.25", "buffer.sample_shape=[2,3,32]"])
    try:
        out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_sae.py"), "--url", srv.url,
                              "--compare", "--steps", "12", "--batch-size", "128", "--expansion", "2", "--k", "8",
                              "--memory-batches", "4", "--warmup", "2", "--log-every", "6", "--num-workers", "1"],
                             capture_output=True, text=True, timeout=240)
    finally:
        srv.stop()
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    results = {m.group(1): m.group(0) for m in re.finditer(r"RESULT mode=(\S+) .*", out.stdout)}
    assert set(results) == {"served", "in-memory"}
    for line in results.values():
        assert "steps=12" in line and "d_in=192" in line and "d_sae=384" in line
        fve = float(re.search(r"fve=(\S+)", line).group(1))
        sps = float(re.search(r"steps_per_s=(\S+)", line).group(1))
        assert fve == fve and sps > 0  # numbers, not NaN
    assert "RESULT P4 served/in-memory" in out.stdout
    assert "rows [2, 3, 32]" in out.stdout


def test_train_sae_defaults_fit_the_test_presets_buffer():
    """serve.sh's test preset holds 1,000 rows: the default batch must fit it instead of waiting 300 s."""
    srv = ServerProcess([*SYNTHETIC, "buffer.size=1000", "buffer.min_fill=0.1"])
    try:
        out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_sae.py"), "--url", srv.url,
                              "--steps", "3", "--warmup", "1", "--log-every", "3", "--num-workers", "0"],
                             capture_output=True, text=True, timeout=240)
    finally:
        srv.stop()
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "batch 500, 3 steps" in out.stdout and "RESULT mode=served" in out.stdout


def test_train_sae_without_a_server_is_one_line():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_sae.py"), "--url",
                          "http://127.0.0.1:9"], capture_output=True, text=True, timeout=120)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert out.returncode == 1 and len(lines) == 1 and "no actdata server answers" in lines[0], lines
