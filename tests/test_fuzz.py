"""R4, short: schemathesis against the published OpenAPI schema finds no server error, no undocumented
status and no response that breaks its schema (scripts/fuzz_api.sh runs the long version). The server's
rows hold several points, so the fuzzer's `points=` values meet real names and indices."""
import os
import shutil
import subprocess
import sys
import time

import pytest
import requests
from conftest import SYNTHETIC

from actdata import wire
from actdata.serving.process import ServerProcess

POINTED = ["buffer.sample_shape=[2,3,32]", "generator.sites=[resid_post,mlp_out]", "generator.layers=[0,1,2]"]


@pytest.fixture(scope="module")
def pointed_server():
    """Synthetic rows of 2 sites x 3 layers x 32 values (points resid_post@0 ... mlp_out@2)."""
    srv = ServerProcess([*SYNTHETIC, "buffer.prefix=actdata-fuzz", "buffer.size=2000", "buffer.min_fill=0.25",
                         *POINTED, "server.max_samples_per_request=500"])
    deadline = time.time() + 60  # full: four requests of the most rows (500) can be served at once
    while requests.get(srv.url + "/").json()["ready"] < 2000 and time.time() < deadline:
        time.sleep(0.1)
    yield srv
    srv.stop()


def _fuzz(url, tmp_path):
    st = shutil.which("st") or os.path.join(os.path.dirname(sys.executable), "st")
    schema = requests.get(url + "/openapi.json").json()
    assert {"/", "/stats", "/activations", "/activations/tensor", "/refresh", "/metrics", "/groups",
            "/groups/{name}"} <= set(schema["paths"])
    for path in (wire.TENSOR_PATH, wire.JSON_PATH):
        params = {p["name"]: p for p in schema["paths"][path]["get"]["parameters"]}
        assert "group" in params
        assert "mlp_out@2" in params["points"]["description"]  # the schema names the points a fuzzer may use
    r = subprocess.run([st, "run", url + "/openapi.json", "--checks", "all", "-n", "12",
                        "--generation-deterministic", "--request-timeout", "30", "--report-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-4000:]
    assert "No issues found" in r.stdout


def test_schemathesis_finds_nothing(pointed_server, tmp_path):
    _fuzz(pointed_server.url, tmp_path)


def test_schemathesis_finds_nothing_with_consumer_groups(start_server, tmp_path):
    """The group parameter and routes where groups are on (the server above has none: they answer 409). Three
    groups at most, so the 409 of a fourth is met; `skip` and a short idle time keep rows coming for whichever
    group the fuzzer reads as (with `wait`, a group that read everything waits for the others: a 503)."""
    srv = start_server("buffer.size=4000", "buffer.min_fill=0.1", "buffer.max_groups=3", "buffer.group_lag=skip",
                       "buffer.group_idle_s=2", "server.max_samples_per_request=256", "buffer.prefix=t19fuzz", *POINTED)
    _fuzz(srv.url, tmp_path)
