"""The trainer's side as users write it: the literal DataLoader forms, the server's per-request maximum,
the same-host path, resuming a StatefulDataLoader, a client without the server stack, and a client that
does not trust the server's headers. Real servers on loopback (synthetic rows)."""
import http.server
import json
import re
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from conftest import SYNTHETIC
from torch.utils.data import DataLoader

from actdata import wire
from actdata.generation.synthetic import verify_rows
from actdata.reading.client import ActivationClient, ActivationServerError, TensorReader
from actdata.reading.dataset import RemoteActivationDataset
from actdata.serving.process import ServerProcess


def start(*overrides, base=SYNTHETIC) -> ServerProcess:
    srv = ServerProcess([*base, *overrides])
    assert ActivationClient(srv.url).wait_for_data(1, timeout=60)
    return srv


@pytest.fixture(scope="module")
def server():
    """1,000 rows (the test preset), per-request maximum 300 rows."""
    srv = start("buffer.min_fill=0.25", "server.max_samples_per_request=300")
    yield srv
    srv.stop()


def tensor_requests(url) -> int:
    """Requests the tensor route has answered with rows (2xx, all HTTP processes), from /metrics; a 503
    while the buffer refills is not counted."""
    text = ActivationClient(url).session.get(url + "/metrics").text
    found = re.findall(r'actdata_http_requests_total\{([^}]*)\} ([0-9.e+]+)', text)
    return sum(int(float(v)) for labels, v in found
               if 'route="/activations/tensor"' in labels and 'code="2xx"' in labels)


def rows_read(url) -> int:
    return ActivationClient(url).get_stats()["rows_read"]


def test_dataloader_of_the_dataset_yields_batches_within_the_server_maximum(server):
    # The design's own usage line: the DataLoader's default batch_size=1 gives the dataset's batches.
    batches = list(DataLoader(RemoteActivationDataset(server.url, max_batches=3, local=False)))
    assert [tuple(x.shape) for x in batches] == [(300, 768)] * 3  # min(4096, maximum 300, half of 1,000)
    assert verify_rows(torch.cat(batches))[1].all()
    with_workers = list(DataLoader(RemoteActivationDataset(server.url, max_batches=4, local=False), num_workers=2))
    assert [tuple(x.shape) for x in with_workers] == [(300, 768)] * 4


def test_batch_size_b_gives_b_rows_in_one_request_per_batch(server):
    before = tensor_requests(server.url)
    ds = RemoteActivationDataset(server.url, max_batches=6, local=False)
    batches = list(DataLoader(ds, batch_size=128, num_workers=2))
    assert [tuple(x.shape) for x in batches] == [(128, 768)] * 6
    ids, ok = verify_rows(torch.cat(batches))
    assert ok.all() and len(set(ids.tolist())) == 6 * 128
    assert tensor_requests(server.url) - before == 6  # not one per row


def test_an_explicit_batch_above_the_maximum_is_split_not_refused(server):
    before = tensor_requests(server.url)
    for loader in (DataLoader(RemoteActivationDataset(server.url, batch_size=700, max_batches=2, local=False),
                              batch_size=None, num_workers=1),
                   DataLoader(RemoteActivationDataset(server.url, max_batches=2, local=False), batch_size=700)):
        xs = list(loader)
        assert [tuple(x.shape) for x in xs] == [(700, 768)] * 2
        ids, ok = verify_rows(torch.cat(xs))
        assert ok.all() and len(set(ids.tolist())) == 1400
    assert tensor_requests(server.url) - before == 2 * 2 * 3  # 300 + 300 + 100 rows per batch


def test_budgets_and_a_custom_collate(server):
    ds = RemoteActivationDataset(server.url, max_samples=250, local=False)
    assert [len(x) for x in DataLoader(ds, batch_size=100)] == [100, 100, 50]
    before = rows_read(server.url)
    assert [len(x) for x in DataLoader(ds, batch_size=100, drop_last=True)] == [100, 100]
    assert rows_read(server.url) - before == 200  # the short batch is not even read (nor read ahead)
    assert [len(x) for x in DataLoader(ds, batch_size=100, drop_last=True, num_workers=2)] == [100] * 2
    rows = list(DataLoader(RemoteActivationDataset(server.url, batch_size=8, max_batches=1, local=False),
                           batch_size=4, collate_fn=lambda rows: torch.stack(rows)))
    assert [tuple(x.shape) for x in rows] == [(4, 768), (4, 768)]  # a custom collate_fn gets rows


@pytest.mark.parametrize("preset,overrides,rows,width", [
    ("test", [], 500, 768),
    ("env", [], 1024, 768),                                   # $BUFFER_SIZE default 2,048
    ("production", ["buffer.size=20000"], 4096, 4096),
    ("large-scale", ["buffer.size=20000"], 4096, 4096),
])
def test_datamodule_defaults_work_against_every_preset(preset, overrides, rows, width):
    from actdata import ActivationDataModule

    srv = start(*overrides, "generator.source=synthetic", base=[f"+preset={preset}"])
    try:
        dm = ActivationDataModule(srv.url)
        it = iter(dm.train_dataloader())
        x = next(it)
        assert x.shape == (rows, width) and torch.isfinite(x).all()
        if x.dtype == torch.float32:  # float16 rows cannot carry the synthetic ids exactly
            assert verify_rows(x)[1].all()
        del it
    finally:
        srv.stop()


# -- the same-host path ------------------------------------------------------------------------------------
def test_same_host_reads_the_buffer_directly_and_serve_once_holds_with_http(server):
    before_requests, before_rows = tensor_requests(server.url), rows_read(server.url)
    local = DataLoader(RemoteActivationDataset(server.url, max_batches=20), batch_size=100, num_workers=2)
    remote = DataLoader(RemoteActivationDataset(server.url, max_batches=20, local=False), batch_size=100,
                        num_workers=2)
    got = {}
    threads = [threading.Thread(target=lambda k=k, l=l: got.__setitem__(k, list(l)))
               for k, l in (("local", local), ("http", remote))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [tuple(x.shape) for x in got["local"]] == [(100, 768)] * 20
    assert tensor_requests(server.url) - before_requests == 20  # only the HTTP loader's batches
    assert rows_read(server.url) - before_rows == 4000  # the same-host rows count in the buffer's reads
    ids, ok = verify_rows(torch.cat(got["local"] + got["http"]))
    assert ok.all() and len(set(ids.tolist())) == 4000  # no row served twice, across both paths


def test_same_host_identity_checks(server):
    from actdata.reading.samehost import open_same_host

    published = ActivationClient(server.url).get_stats()["server"]["same_host"]
    reader, why = open_same_host(published)
    assert reader is not None and why == ""
    reader.close()
    for change, reason in (({"nonce": published["nonce"] + 1}, "not the server's buffer"),
                           ({"host": "elsewhere/0/0"}, "another host"),
                           ({"path": published["path"] + ".missing"}, "cannot open"),
                           ({"nbytes": published["nbytes"] + 4096}, "layout")):
        reader, why = open_same_host({**published, **change})
        assert reader is None and reason in why, why


def test_claims_of_a_dead_same_host_reader_are_reclaimed(server):
    code = textwrap.dedent(f"""
        import os
        from actdata.reading.client import ActivationClient
        from actdata.reading.samehost import open_same_host
        reader, why = open_same_host(ActivationClient({server.url!r}).get_stats()["server"]["same_host"])
        ids, epoch = reader.buffer.claim_ready(50)
        print(len(ids), flush=True)
        os._exit(0)  # dies holding 50 claimed rows
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "50", out.stderr
    deadline = time.monotonic() + 30
    while ActivationClient(server.url).get_stats()["reading"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ActivationClient(server.url).get_stats()["reading"] == 0


def test_same_host_falls_back_to_http_when_the_server_goes(caplog):
    srv = start("buffer.min_fill=0.25")
    srv2 = None
    try:
        it = iter(DataLoader(RemoteActivationDataset(srv.url, batch_size=100, retry_for_s=90), batch_size=None))
        before = [next(it) for _ in range(3)]
        port, url = srv.port, srv.url
        srv.stop()
        srv2 = ServerProcess([*SYNTHETIC, "buffer.min_fill=0.25", f"server.port={port}"])
        reqs = tensor_requests(url)
        after = [next(it) for _ in range(3)]
        # over HTTP now, from the new server: batches 5 and 6 at least (batch 4 may have been read ahead
        # from the old buffer before it went, batch 7 may be being read ahead now)
        assert 2 <= tensor_requests(url) - reqs <= 4
        assert any("same-host path stopped" in r.getMessage() for r in caplog.records)
        assert verify_rows(torch.cat(before + after))[1].all()
        del it
    finally:
        srv.stop()
        if srv2 is not None:
            srv2.stop()


# -- resuming ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader_resumes_the_budget_mid_stream(server, workers):
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader():
        ds = RemoteActivationDataset(server.url, max_samples=1000, local=False)
        return StatefulDataLoader(ds, batch_size=100, num_workers=workers)

    first = loader()
    it = iter(first)
    seen = [next(it) for _ in range(4)]
    state = first.state_dict()
    del it, first
    second = loader()
    second.load_state_dict(state)
    rest = list(second)
    assert len(seen) + len(rest) == 10 and sum(len(x) for x in seen + rest) == 1000
    assert verify_rows(torch.cat(seen + rest))[1].all()


# -- the lean client -------------------------------------------------------------------------------------
LEAN = """
import importlib.abc, sys
BLOCKED = {"lightning", "pytorch_lightning", "litserve", "transformers", "hydra", "omegaconf", "fastapi",
           "uvicorn", "starlette", "datasets"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed here")
sys.meta_path.insert(0, Block())
from torch.utils.data import DataLoader
from actdata.reading.client import ActivationClient
from actdata.reading.dataset import RemoteActivationDataset
url = sys.argv[1]
print(ActivationClient(url).get_stats()["valid_samples"] > 0)
for local in (True, False):
    x = next(iter(DataLoader(RemoteActivationDataset(url, local=local), batch_size=64, num_workers=1)))
    print(tuple(x.shape))
try:
    from actdata import ActivationDataModule
except ImportError as e:
    print("datamodule:", e)
print(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


def test_client_and_dataset_work_without_the_server_stack(server):
    out = subprocess.run([sys.executable, "-c", LEAN, server.url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[:3] == ["True", "(64, 768)", "(64, 768)"], out.stdout
    assert lines[3].startswith("datamodule:") and "lightning" in lines[3]
    assert lines[4] == "[]"


# -- a client that does not trust the server -------------------------------------------------------------
class _LyingHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    answers = {}

    def do_GET(self):
        headers, body = self.answers[self.server.mode]
        self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


_LyingHandler.answers = {
    "huge": ({"X-Tensor-Shape": "4,1000000000", "X-Tensor-Dtype": "float32", "Content-Length": "16"}, b"x" * 16),
    "length": ({"X-Tensor-Shape": "4,4", "X-Tensor-Dtype": "float32", "Content-Length": "lots"}, b"x" * 64),
    "rows": ({"X-Tensor-Shape": "400,4", "X-Tensor-Dtype": "float32", "Content-Length": "6400"}, b"x" * 6400),
}


@pytest.mark.parametrize("mode,words", [("huge", "Content-Length 16"), ("length", "not an integer"),
                                        ("rows", "4 rows were asked")])
def test_bad_headers_are_refused_before_allocating(mode, words):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LyingHandler)
    srv.mode, srv.handle_error = mode, lambda *a: None  # the client hangs up mid-body, as it should
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    allocated = []
    try:
        reader = TensorReader(f"http://127.0.0.1:{srv.server_address[1]}", retry=None)
        with pytest.raises(ActivationServerError) as e:
            reader.fetch(4, empty=lambda shape, dtype: allocated.append(shape) or torch.empty(shape, dtype=dtype))
        assert words in str(e.value) and e.value.status == 200 and allocated == []
    finally:
        srv.shutdown()
        srv.server_close()


# -- reading ahead in the main process ---------------------------------------------------------------------
def _read_ahead_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "actdata-read-ahead"]


def test_main_process_reads_the_next_batch_while_the_trainer_works(server):
    """num_workers=0: while the loop holds batch 1, batches 2 and 3 are already requested (on two
    connections, one request each, never past the budget), and stopping early leaves no thread behind."""
    before = tensor_requests(server.url)
    it = iter(DataLoader(RemoteActivationDataset(server.url, batch_size=100, max_batches=4, local=False),
                         batch_size=None))
    assert next(it).shape == (100, 768)
    deadline = time.monotonic() + 30
    while tensor_requests(server.url) - before < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tensor_requests(server.url) - before == 3  # batches 2 and 3 read ahead, nothing more
    assert [x.shape for x in it] == [(100, 768)] * 3
    assert tensor_requests(server.url) - before == 4  # the budget's 4 batches, not a 5th read ahead
    assert _read_ahead_threads() == []

    it = iter(RemoteActivationDataset(server.url, batch_size=100, local=False))
    next(it)
    it.close()  # the loop stops with a batch being read ahead: waited for, then the thread ends
    deadline = time.monotonic() + 10
    while _read_ahead_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _read_ahead_threads() == []


class _SilentAfterOneHandler(http.server.BaseHTTPRequestHandler):
    """A server that answers /stats and one batch, then accepts requests and never answers."""
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if not self.path.startswith("/activations/tensor"):  # GET / (is it a directory?) and /stats
            body = json.dumps({"sample_shape": [4], "dtype": "float32", "capacity": 100,
                               "server": {"max_samples_per_request": 100}}).encode()
            headers = {"Content-Type": "application/json"}
        else:
            self.server.tensor_requests += 1
            if self.server.tensor_requests > 1:
                time.sleep(60)
                return
            body, headers = b"\0" * 64, {"X-Tensor-Shape": "4,4", "X-Tensor-Dtype": "float32"}
        self.send_response(200)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_stopping_while_a_read_ahead_hangs_returns():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SilentAfterOneHandler)
    srv.tensor_requests, srv.daemon_threads = 0, True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        it = iter(RemoteActivationDataset(f"http://127.0.0.1:{srv.server_address[1]}", batch_size=4,
                                          local=False, timeout=60, retry_for_s=60))
        assert next(it).shape == (4, 4)
        closing = threading.Thread(target=it.close)  # batches 2 and 3 hang on the server: the reads are woken
        closing.start()
        closing.join(30)
        assert not closing.is_alive() and srv.tensor_requests == 3  # and not retried
    finally:
        srv.shutdown()
        srv.server_close()


def test_readers_spread_over_the_server_processes(server, monkeypatch):
    """Each answer names its HTTP process as i/n. The readers of one trainer (here the two read-ahead lanes
    of num_workers=0) each prefer another process and reconnect, a bounded number of times, until theirs
    answers; with one HTTP process nobody reconnects."""
    connects = []
    real = TensorReader._connect
    monkeypatch.setattr(TensorReader, "_connect", lambda self: connects.append(self) or real(self))
    seen = {TensorReader(server.url).fetch(4)[1][wire.PROCESS] for _ in range(20)}  # 20 fresh connections
    assert seen <= {"0/2", "1/2"} and len(seen) == 2
    connects.clear()
    ds = RemoteActivationDataset(server.url, batch_size=50, max_batches=40, local=False)
    it = iter(ds)
    for _ in range(30):
        next(it)
    readers = [lane.sources[0].http for lane in ds._stream.ahead.lanes]
    assert sorted(r.prefer for r in readers) == [0, 1]
    for r in readers:  # on its own process, or out of tries
        assert r.server_process[0] == r.prefer % 2 or r.spread_tries == 0
        assert 1 <= sum(c is r for c in connects) <= 1 + TensorReader.SPREAD_TRIES - r.spread_tries
    assert sum(len(x) for x in it) == 10 * 50

    single = start("buffer.min_fill=0.25", "server.workers=1")
    try:
        connects.clear()
        ds = RemoteActivationDataset(single.url, batch_size=50, max_batches=20, local=False)
        assert sum(len(x) for x in ds) == 1000
        assert len(connects) == 2  # one connection per lane, never moved
    finally:
        single.stop()
