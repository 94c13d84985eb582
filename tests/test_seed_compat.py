"""The original service's documented calls, as its users typed them (package name changed to actdata)."""
import os
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import SYNTHETIC

from actdata.reading.client import ActivationClient

# The "Client Usage" snippet of the original service's README, verbatim but for the package name.
README_SNIPPET = '''
from actdata.reading.client import ActivationClient

client = ActivationClient("http://localhost:8000")

# Wait for data to be ready
client.wait_for_data(min_samples=100)

# Get activations as tensor
tensor, metadata = client.get_activations_tensor(num_samples=10)
print(f"Shape: {tensor.shape}")

# Get server stats
stats = client.get_stats()
print(f"Valid samples: {stats['valid_samples']}")
'''

# Its demo as a user writes it from the same README: no URL anywhere.
NO_URL_SNIPPET = '''
from actdata.reading.client import ActivationClient

client = ActivationClient()
print(client.health_check())
stats = client.get_stats()
print(stats['valid_samples'])
data = client.get_activations(num_samples=2)
print(len(data['activations']), data['shape'], data['buffer_stats']['valid_samples'] >= 0)
'''

# Runs inside a private network namespace, where port 8000 is ours whatever else runs on this machine.
DRIVER = '''
import subprocess, sys
from actdata.serving.process import ServerProcess
with ServerProcess([*sys.argv[2:], "server.port=8000"]) as srv:
    r = subprocess.run([sys.executable, "-c", sys.argv[1]], capture_output=True, text=True, timeout=120)
    r2 = subprocess.run([sys.executable, "-m", "actdata.client", "--num-samples", "64", "--reps", "1"],
                        capture_output=True, text=True, timeout=120)
print("SNIPPET", r.returncode, r.stdout, r.stderr[-2000:])
print("DEMO", r2.returncode, r2.stdout, r2.stderr[-2000:])
'''


def port_8000_runner():
    """A command prefix under which localhost:8000 is free for the test: a private network namespace
    (`unshare -rn`), or nothing when port 8000 of this machine is free; None when neither is possible."""
    if shutil.which("unshare") and shutil.which("ip"):
        probe = subprocess.run(["unshare", "-rn", "sh", "-c", "ip link set lo up"], capture_output=True)
        if probe.returncode == 0:
            return ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 8000))
            return []
        except OSError:
            return None


@pytest.mark.parametrize("snippet", [README_SNIPPET, NO_URL_SNIPPET], ids=["readme", "no-url"])
def test_original_client_snippets_run_unchanged(snippet):
    runner = port_8000_runner()
    if runner is None:
        pytest.skip("port 8000 is taken and no private network namespace is available")
    env = {k: v for k, v in os.environ.items() if k not in ("ACTDATA_URL", "ACTDATA_API_KEY")}
    out = subprocess.run([*runner, sys.executable, "-c", DRIVER, snippet, *SYNTHETIC, "buffer.min_fill=0.25"],
                         capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    snippet_part, demo_part = out.stdout.split("DEMO", 1)
    assert snippet_part.startswith("SNIPPET 0"), snippet_part
    if snippet is README_SNIPPET:
        assert "Shape: torch.Size([10, 768])" in snippet_part and "Valid samples: " in snippet_part
    else:
        assert "True" in snippet_part and "2 [2, 768] True" in snippet_part
    assert demo_part.startswith(" 0") and "valid_samples=" in demo_part and "shape=(64, 768)" in demo_part, demo_part


def test_valid_samples_and_the_url_from_the_environment(synthetic_server, monkeypatch):
    monkeypatch.setenv("ACTDATA_URL", synthetic_server.url)
    c = ActivationClient()
    assert c.url == synthetic_server.url
    assert c.wait_for_data(100, timeout=60)
    st = c.get_stats()
    assert st["valid_samples"] == st["ready"] and st["valid_samples"] >= 100
    assert st["valid_percentage"] == pytest.approx(100 * st["ready"] / st["capacity"])
    assert "valid_samples" in c.get_activations(num_samples=3)["buffer_stats"]
    monkeypatch.delenv("ACTDATA_URL")
    assert ActivationClient().url == "http://localhost:8000"


@pytest.mark.parametrize("var,value,key", [("BUFFER_SIZE", "lots", "buffer.size"), ("PORT", "x", "server.port")])
def test_env_preset_bad_value_is_one_line_naming_key_and_variable(var, value, key, tmp_path):
    out = subprocess.run([sys.executable, "-m", "actdata.serve", "+preset=env", "generator.source=synthetic"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, var: value})
    lines = [l for l in (out.stdout + out.stderr).splitlines() if l.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stdout + out.stderr
    assert key in lines[0] and f"${var}='{value}'" in lines[0] and "Traceback" not in lines[0]
