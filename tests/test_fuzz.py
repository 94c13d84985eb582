"""R4, short: schemathesis against the published OpenAPI schema finds no server error, no undocumented
status and no response that breaks its schema (scripts/fuzz_api.sh runs the long version)."""
import os
import shutil
import subprocess
import sys

import requests


def test_schemathesis_finds_nothing(synthetic_server, tmp_path):
    st = shutil.which("st") or os.path.join(os.path.dirname(sys.executable), "st")
    schema = requests.get(synthetic_server.url + "/openapi.json").json()
    assert {"/", "/stats", "/activations", "/activations/tensor", "/refresh", "/metrics"} <= set(schema["paths"])
    r = subprocess.run([st, "run", synthetic_server.url + "/openapi.json", "--checks", "all", "-n", "12",
                        "--generation-deterministic", "--request-timeout", "30", "--report-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-4000:]
    assert "No issues found" in r.stdout
