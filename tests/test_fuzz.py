"""R4, short: schemathesis against the published OpenAPI schema finds no server error, no undocumented
status and no response that breaks its schema (scripts/fuzz_api.sh runs the long version)."""
import os
import shutil
import subprocess
import sys

import requests


def _fuzz(url, tmp_path):
    st = shutil.which("st") or os.path.join(os.path.dirname(sys.executable), "st")
    schema = requests.get(url + "/openapi.json").json()
    assert {"/", "/stats", "/activations", "/activations/tensor", "/refresh", "/metrics", "/groups",
            "/groups/{name}"} <= set(schema["paths"])
    assert "group" in {p["name"] for p in schema["paths"]["/activations/tensor"]["get"]["parameters"]}
    r = subprocess.run([st, "run", url + "/openapi.json", "--checks", "all", "-n", "12",
                        "--generation-deterministic", "--request-timeout", "30", "--report-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-4000:]
    assert "No issues found" in r.stdout


def test_schemathesis_finds_nothing(synthetic_server, tmp_path):
    _fuzz(synthetic_server.url, tmp_path)


def test_schemathesis_finds_nothing_with_consumer_groups(start_server, tmp_path):
    """The group parameter and routes where groups are on (the server above has none: they answer 409). Three
    groups at most, so the 409 of a fourth is met; `skip` and a short idle time keep rows coming for whichever
    group the fuzzer reads as (with `wait`, a group that read everything waits for the others: a 503)."""
    srv = start_server("buffer.size=4000", "buffer.min_fill=0.1", "buffer.max_groups=3", "buffer.group_lag=skip",
                       "buffer.group_idle_s=2", "server.max_samples_per_request=256", "buffer.prefix=t19fuzz")
    _fuzz(srv.url, tmp_path)
