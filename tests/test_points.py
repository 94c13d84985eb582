"""Per-reader point selection (`?points=`, `points=`): real servers on loopback with the synthetic source.
Synthetic rows are a function of their id (the first values of point 0, and the provenance's doc id), so
every test recomputes the whole row and checks that exactly the selected points came back, in order."""
import json
import time
import urllib.request

import pytest
import requests
import torch
from torch.utils.data import DataLoader

from actdata import ActivationClient, RemoteActivationDataset, wire
from actdata import points as pts
from actdata.generation.synthetic import make_rows, row_ids
from actdata.storage.catalog import open_store

SHAPE = (2, 4, 64)  # two sites at four layers: 8 points of 64 values
NAMES = [f"{s}@{layer}" for s in ("resid_post", "mlp_out") for layer in range(4)]
POINTED = ["buffer.sample_shape=[2,4,64]", "generator.sites=[resid_post,mlp_out]", "generator.layers=[0,1,2,3]"]


def expected(ids: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """The selected points of the rows with these ids: [k, len(indices), width]."""
    return make_rows(ids.to(torch.int64), SHAPE, torch.float32).reshape(len(ids), -1, SHAPE[-1])[:, indices]


def check_with_point0(x: torch.Tensor, indices: list[int]) -> None:
    """x [k, len(indices), width] holds point 0 at indices.index(0): its first values are the row's id."""
    ids = row_ids(x[:, indices.index(0)])
    assert torch.equal(x, expected(ids, indices))
    assert len(set(ids.tolist())) == len(ids)  # serve-once: no row twice


def wait_ready(url: str, n: int, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = requests.get(url + "/").json()
        if h["serving"] and h["ready"] >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{url}: {n} rows not ready")


@pytest.fixture(scope="module")
def server():
    """Rows [2, 4, 64] float32 with provenance; whole rows: at most 100 per request, one point: 800."""
    from actdata.serving.process import ServerProcess

    srv = ServerProcess(["+preset=test", "generator.source=synthetic", "generator.state_dir=null",
                         "buffer.prefix=actdata-points", "buffer.size=4000", "buffer.min_fill=0.25",
                         "generator.provenance=true", "server.max_bytes_per_request=204800", *POINTED])
    yield srv
    srv.stop()


def test_names_parsing_and_resolution_without_a_server():
    assert pts.point_names(SHAPE, ["resid_post", "mlp_out"], [0, 1, 2, 3]) == NAMES
    assert pts.point_names((576,), ["resid_post"], [6]) == ["resid_post@6"]  # a squeezed row: one point
    assert pts.point_names((1, 3, 8), ["mlp_in"], "all") == ["mlp_in@0", "mlp_in@1", "mlp_in@2"]
    assert pts.point_names((2, 1, 8), ["model.norm:output", "x.y:input"], [5]) == ["model.norm:output", "x.y:input"]
    assert pts.point_names((3, 8)) == ["0", "1", "2"]  # rows the sites do not describe: named by index
    assert pts.parse("mlp_out@2,0") == (["mlp_out@2", 0], False)
    assert pts.parse("mlp_out@2") == (["mlp_out@2"], True) and pts.parse(3) == ([3], True)
    assert pts.parse([3]) == ([3], False)
    assert pts.resolve(pts.parse(["mlp_out@2", 0, "3"])[0], NAMES) == [6, 0, 3]
    for bad, phrase in ((["x@1"], "no point is named 'x@1'"), ([8], "index 8 is out of range"),
                        ([1, "resid_post@1"], "a second time"), ([-1], "out of range")):
        with pytest.raises(pts.PointsError, match=phrase) as e:
            pts.resolve(bad, NAMES)
        assert "second" in phrase or "7=mlp_out@3" in str(e.value)  # the valid names are listed
    for bad in ("", "1,,2", True, 1.5):
        with pytest.raises(pts.PointsError):
            pts.parse(bad)


def test_http_selection_by_name_and_index_with_provenance(server):
    wait_ready(server.url, 300)
    st = requests.get(server.url + "/stats").json()
    assert st["points"] == NAMES
    # by name and index, out of order, with provenance: the doc ids name the rows
    r = requests.get(server.url + wire.TENSOR_PATH, params={"num_samples": 50, "points": "mlp_out@2,0",
                                                             "provenance": 1})
    assert r.status_code == 200, r.text
    t, _ = wire.decode_tensors(bytearray(r.content))
    assert t["activations"].shape == (50, 2, 64)
    assert torch.equal(t["activations"], expected(t["doc_ids"], [6, 0]))
    # raw tensor bytes: [k, points, width], a single point keeps its axis
    r = requests.get(server.url + wire.TENSOR_PATH, params={"num_samples": 40, "points": "7,0,resid_post@3"})
    x = wire.decode(r.content, r.headers)
    assert r.headers[wire.SHAPE] == "40,3,64" and len(r.content) == 40 * 3 * 64 * 4
    check_with_point0(x, [7, 0, 3])
    r = requests.get(server.url + wire.TENSOR_PATH, params={"num_samples": 5, "points": "0"})
    assert r.headers[wire.SHAPE] == "5,1,64"
    # the JSON route selects the same way
    d = requests.get(server.url + wire.JSON_PATH, params={"num_samples": 3, "points": "0,mlp_out@0"}).json()
    assert d["shape"] == [3, 2, 64]
    assert torch.equal(torch.tensor(d["activations"]), expected(torch.tensor(d["doc_ids"]), [0, 4]))


@pytest.mark.parametrize("path", [wire.TENSOR_PATH, wire.JSON_PATH])
@pytest.mark.parametrize("value, phrase", [("8", "index 8 is out of range"), ("mlp_out@9", "no point is named"),
                                           ("1,resid_post@1", "a second time"), ("0,,1", "empty entry"),
                                           ("", "empty entry"), ("-2", "out of range")])
def test_a_bad_selection_is_a_422_listing_the_points(server, path, value, phrase):
    r = requests.get(server.url + path, params={"num_samples": 2, "points": value})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith("points:") and phrase in detail
    if "of range" in phrase or "named" in phrase:
        assert "4=mlp_out@0" in detail


def test_smaller_rows_are_more_rows_per_request(server):
    wait_ready(server.url, 900)
    get = lambda n, **p: requests.get(server.url + wire.TENSOR_PATH, params={"num_samples": n, **p})  # noqa: E731
    assert get(101).status_code == 422 and "num_samples" in get(101).json()["detail"]  # whole rows: 100
    assert get(800, points="mlp_out@1").status_code == 200  # one point: 8x as many
    r = get(801, points="mlp_out@1")
    assert r.status_code == 422 and "num_samples" in r.json()["detail"]
    assert get(400, points="0,1").status_code == 200 and get(401, points="0,1").status_code == 422


def test_client_splits_by_the_selected_size_and_squeezes_one_point(server):
    wait_ready(server.url, 1100)
    with ActivationClient(server.url, points="mlp_out@1") as c:
        lim = c.limits()
        assert lim.points == tuple(NAMES) and lim.max_rows == 100
        assert lim.max_rows_for(lim.pick("mlp_out@1")) == 800
        b = c.get_activations_tensor(1000, provenance=True)  # two requests of at most 800 rows
        assert b.activations.shape == (1000, 64)  # one name alone: [n, width], as trainers take it
        assert torch.equal(b.activations, expected(b.doc_ids, [5])[:, 0])
    with ActivationClient(server.url, points=[0, "resid_post@3"]) as c:
        x, meta = c.get_activations_tensor(450)  # above 400, the maximum of two points per request
        assert x.shape == (450, 2, 64) and meta["shape"] == [450, 2, 64]
        check_with_point0(x, [0, 3])
    with ActivationClient(server.url, points="resid_post@7") as c:
        with pytest.raises(pts.PointsError, match="no point is named 'resid_post@7'.*3=resid_post@3"):
            c.get_activations_tensor(4)
    with pytest.raises(pts.PointsError):
        ActivationClient(server.url, points="0,,1")  # malformed: refused before any request
    # the dataset's default batch is the per-request maximum of the points read, not of whole rows
    wait_ready(server.url, 900)
    (x,) = list(RemoteActivationDataset(server.url, points="mlp_out@1", max_batches=1, local=False))
    assert x.shape == (800, 64)


def test_dataset_same_host_and_http_workers(server):
    wait_ready(server.url, 800)
    ds = RemoteActivationDataset(server.url, batch_size=256, max_batches=3, points="mlp_out@3", provenance=True)
    it = iter(ds)
    first = next(it)
    assert ds._stream.sources[0].local is not None  # the same-host path gathered the points itself
    for b in [first, *it]:
        assert b.activations.shape == (256, 64)
        assert torch.equal(b.activations, expected(b.doc_ids, [7])[:, 0])
    ds = RemoteActivationDataset(server.url, batch_size=128, max_batches=4, points=[5, 0], local=False)
    batches = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert len(batches) == 4
    for x in batches:
        assert x.shape == (128, 2, 64)
        check_with_point0(x, [5, 0])


def test_directory_reader_passes_the_selection(server):
    from actdata.cluster.directory import Directory

    wait_ready(server.url, 400)
    d = Directory(poll_interval_s=0.1)
    url = d.start()
    try:
        d.set_member("node-a", server.url, node_rank=0)
        ds = RemoteActivationDataset(url, batch_size=100, max_batches=2, points="0,mlp_out@2")
        batches = list(ds)
        assert len(batches) == 2
        for x in batches:
            assert x.shape == (100, 2, 64)
            check_with_point0(x, [0, 6])
    finally:
        d.stop()


def test_replay_serves_selected_points_by_the_stored_names(tmp_path, start_server):
    store = str(tmp_path / "store")
    srv = start_server("buffer.prefix=actdata-points-w", "buffer.size=600", "buffer.min_fill=0.25", "store.write=true",
                       f"store.path={store}", "store.shard_rows=200", *POINTED)
    wait_ready(srv.url, 200)
    for _ in range(3):
        assert requests.get(srv.url + wire.TENSOR_PATH, params={"num_samples": 100}).status_code == 200
        wait_ready(srv.url, 200)
    srv.stop()
    s = open_store(store)
    assert s.manifests[0]["points"] == NAMES  # the manifest names the stored rows' points
    rep = start_server("generator.source=store", f"store.path={store}", "store.passes=1", "buffer.size=200",
                       "buffer.min_fill=0.25", "buffer.prefix=actdata-points-r", base=["+preset=test"])
    wait_ready(rep.url, 60)
    assert requests.get(rep.url + "/stats").json()["points"] == NAMES
    with ActivationClient(rep.url, points=["mlp_out@3", "resid_post@0"]) as c:
        x, _ = c.get_activations_tensor(60)
    assert x.shape == (60, 2, 64)
    check_with_point0(x, [7, 0])


def test_stats_of_a_one_point_server_name_it_by_the_config(start_server):
    srv = start_server("buffer.prefix=actdata-points-1", "buffer.activation_dim=32", "buffer.size=200")
    with urllib.request.urlopen(srv.url + "/stats", timeout=10) as r:
        assert json.loads(r.read())["points"] == ["resid_post@6"]  # the test preset's site and layer
