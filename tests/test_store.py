"""The store: rows written while serving, replayed without a model, used to warm-start; real servers on
loopback, real files. Synthetic rows carry their id, so a served multiset is checked exactly."""
import collections
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
import torch

from actdata import wire
from actdata.config import Config, ConfigError
from actdata.generation.synthetic import SyntheticSource, make_rows, row_ids, verify_rows
from actdata.serving.main import sample_shape
from actdata.storage.catalog import open_store
from actdata.storage.format import verify_shard
from actdata.storage.replay import StoreSource
from actdata.storage.writer import StoreWriter

SYN = ["+preset=test", "generator.source=synthetic", "buffer.activation_dim=64"]


def meta(g=0, G=1, dtype="float32", shape=(64,)):
    return {"format": "actdata-store", "version": 1, "source": "synthetic", "model": None, "dataset": None,
            "sites": None, "layers": None, "context_length": None, "dtype": dtype, "sample_shape": list(shape),
            "row_bytes": int(np.prod(shape)) * 4, "generator": g, "generators": G}


def write_synthetic(path, batches, shard_rows=300, g=0, G=1, provenance=True):
    """Rows of the synthetic source through a StoreWriter; returns the ids written."""
    w = StoreWriter(str(path), meta(g, G), shard_rows=shard_rows)
    src, ids = iter(SyntheticSource((64,), torch.float32, first_id=g << 40, batch_rows=128)), []
    for _ in range(batches):
        rows, origin, _ = next(src)
        prov = {"token_ids": row_ids(rows).to(torch.int32).numpy(), "positions": np.arange(len(rows), dtype=np.int32),
                "doc_ids": origin} if provenance else None
        w.put(rows, origin, prov)
        ids += row_ids(rows).tolist()
    w.close()
    return ids, w.state()


def get_rows(url, n, timeout=60, chunk=250):
    """Exactly n rows from the server, in requests of at most `chunk` (retrying while rows are not ready)."""
    out, deadline = [], time.time() + timeout
    while sum(len(t) for t in out) < n:
        assert time.time() < deadline, "rows did not arrive"
        k = min(chunk, n - sum(len(t) for t in out))
        r = requests.get(url + wire.TENSOR_PATH, params={"num_samples": k})
        if r.status_code == 503:
            time.sleep(0.05)
            continue
        assert r.status_code == 200, r.text
        out.append(wire.decode(r.content, r.headers))
    return torch.cat(out)


def gen_status(url):
    return requests.get(url + "/stats").json()["generators"][0]


def test_writer_shards_manifest_and_replay_round_trip(tmp_path):
    ids, st = write_synthetic(tmp_path, 8)  # 1,024 rows: shards of 300, 300, 300 and a last one of 124
    assert st["state"] == "closed" and st["rows"] == 1024 and st["rows_not_stored"] == 0
    s = open_store(str(tmp_path))
    assert [sh.rows for sh in s.shards] == [300, 300, 300, 124] and s.sample_shape == (64,)
    assert sorted(os.listdir(tmp_path)) == (["manifest-g00000.json"]
                                            + [f"shard-g00000-00000{i}.safetensors" for i in range(4)])
    assert all(verify_shard(s, sh) is None for sh in s.shards)
    # statistics describe exactly the stored rows
    rows = make_rows(torch.arange(1024), (64,), torch.float32)
    assert s.stats.count == 1024
    np.testing.assert_allclose(s.stats.mean[0], rows.double().mean(0).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.stats.var[0], rows.double().var(0, correction=0).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.stats.mean_sq_norm[0], (rows.double() ** 2).sum(1).mean().item(), rtol=1e-6)
    # the shards are plain safetensors files
    from safetensors import safe_open

    with safe_open(s.shards[0].file, "pt") as f:
        assert set(f.keys()) == {"rows", "origin", "token_ids", "positions", "doc_ids"}
        assert torch.equal(f.get_tensor("rows"), rows[:300])
    # one pass serves every stored row once, provenance aligned with the rows
    got = []
    for rows_, origin, info in StoreSource(s, passes=1, idle=False):
        ids_, ok = verify_rows(rows_)
        assert ok.all() and (info["provenance"]["token_ids"] == ids_.numpy()).all()
        got += ids_.tolist()
    assert collections.Counter(got) == collections.Counter(ids)
    # two generators partition the shards
    a = sum(sh.rows for sh in StoreSource(s, 0, 2).mine)
    b = sum(sh.rows for sh in StoreSource(s, 1, 2).mine)
    assert a + b == 1024 and {sh.file for sh in StoreSource(s, 0, 2).mine}.isdisjoint(
        sh.file for sh in StoreSource(s, 1, 2).mine)


def test_generators_share_a_directory_and_a_writer_continues(tmp_path):
    ids0, _ = write_synthetic(tmp_path, 3, g=0, G=2)
    ids1, _ = write_synthetic(tmp_path, 2, g=1, G=2)
    more, _ = write_synthetic(tmp_path, 1, g=1, G=2)  # generator 1 again (a restart): appends after its shards
    s = open_store(str(tmp_path))
    assert s.rows == len(ids0) + len(ids1) + len(more) and s.stats.count == s.rows
    assert len(s.manifests) == 2 and sum(len(m["shards"]) for m in s.manifests) == len(s.shards)
    got = [i for rows, _, _ in StoreSource(s, passes=1, idle=False) for i in row_ids(rows).tolist()]
    assert collections.Counter(got) == collections.Counter(ids0 + ids1 + more)


def test_a_full_disk_stops_writing_removes_the_partial_shard(tmp_path):
    # a real write error: a file-size limit in a child process (EFBIG, as ENOSPC would be)
    code = f"""
import resource, sys, torch
sys.path.insert(0, {os.getcwd()!r})
from test_store import write_synthetic
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
ids, st = write_synthetic({str(tmp_path)!r}, 8, shard_rows=1000)
print(st["state"], st["rows"], st["rows_not_stored"], st["error"])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(__file__),
                         env={**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.path.dirname(__file__)})
    assert out.returncode == 0, out.stderr
    state, rows, lost, *err = out.stdout.split()
    assert state == "stopped:" or state.startswith("stopped"), out.stdout
    assert not [n for n in os.listdir(tmp_path) if "shard" in n]  # nothing half-written is left
    m = json.load(open(tmp_path / "manifest-g00000.json"))
    assert m["shards"] == [] and "File too large" in out.stdout


def test_write_while_serving_then_replay_then_warm_start(tmp_path, start_server):
    store = str(tmp_path / "store")
    srv = start_server("buffer.size=1000", "store.write=true", f"store.path={store}", "store.shard_rows=500", base=SYN)
    get_rows(srv.url, 3000)
    assert gen_status(srv.url)["store_writer"]["state"] == "writing"
    srv.stop()
    s = open_store(store)
    per_shard = [row_ids(torch.from_numpy(np.memmap(sh.file, np.float32, mode="r", offset=4096,
                                                    shape=(sh.rows, 64)).copy())).tolist() for sh in s.shards]
    stored = [i for ids in per_shard for i in ids]
    assert s.rows >= 3000 and len(set(stored)) == len(stored) == s.rows  # every row once
    assert s.stats.count == s.rows and s.manifests[0]["source"] == "synthetic"
    bad = s.shards[1]
    with open(bad.file, "r+b") as f:  # flip a byte in the rows of the second shard
        f.seek(4096 + 1000)
        b = f.read(1)
        f.seek(4096 + 1000)
        f.write(bytes([b[0] ^ 0xFF]))
    good = [i for sh, ids in zip(s.shards, per_shard) if sh is not bad for i in ids]

    # replay, one pass: exactly the stored rows of the good shards, through a buffer smaller than the store
    rep = start_server("generator.source=store", f"store.path={store}", "store.passes=1", "buffer.size=700",
                       "buffer.min_fill=0", base=["+preset=test"])
    got = get_rows(rep.url, len(good))
    ids, ok = verify_rows(got)
    assert ok.all() and collections.Counter(ids.tolist()) == collections.Counter(good)
    st = requests.get(rep.url + "/stats").json()
    assert st["sample_shape"] == [64]
    g = st["generators"][0]
    assert g["source"] == "store" and g["store_replay"]["pass"] == 1
    assert g["store_replay"]["shards_bad"] == 1 and "CRC-32" in g["store_replay"]["bad"][os.path.basename(bad.file)]
    rep.stop()

    # warm start: the buffer is full of stored rows before the generator writes one
    warm = start_server(f"buffer.warm_start={store}", "buffer.size=1500", "buffer.min_fill=1.0",
                        "generator.rows_per_second=1", base=SYN)
    assert requests.get(warm.url + "/").json()["serving"]
    r = requests.get(warm.url + wire.TENSOR_PATH, params={"num_samples": 1500})  # every row of the buffer
    assert r.status_code == 200, r.text
    ids, ok = verify_rows(wire.decode(r.content, r.headers))
    assert ok.all() and len(set(ids.tolist())) == 1500 and set(ids.tolist()) <= set(stored)


def test_passes_repeat_in_a_new_order(tmp_path):
    ids, _ = write_synthetic(tmp_path, 8)
    src = StoreSource(open_store(str(tmp_path)), seed=3, passes=3, idle=False)
    orders = collections.defaultdict(list)
    for rows, _, info in src:
        orders[info["store"]["pass"]].append(int(row_ids(rows[:1])[0]))
    assert sorted(orders) == [1, 2, 3] and len({tuple(v) for v in orders.values()}) > 1  # shuffled per pass


def test_replay_reads_every_next_shard_ahead_and_checks_it_once(tmp_path):
    """Each shard's checksum is checked once (first pass), and every later pass still reads each next
    shard ahead on the read-ahead thread, not on the thread that serves the rows."""
    import threading

    write_synthetic(tmp_path, 8)  # 4 shards
    src = StoreSource(open_store(str(tmp_path)), passes=2, idle=False)
    reader_threads = set()
    orig = src._check

    def check(shard):
        reader_threads.add(threading.current_thread().name)
        return orig(shard)

    src._check = check
    served = sum(len(rows) for rows, _, _ in src)
    st = src.status(0)
    assert served == 2 * 1024 and src.verified == {sh.file for sh in src.mine}
    assert st["verify_s"] > 0 and st["read_ahead_s"] > 0  # pass 1 checks, pass 2 reads ahead
    assert reader_threads and all(n.startswith("actdata-replay-ahead") for n in reader_threads)


def test_saelens_layout_is_served(tmp_path, start_server):
    datasets = pytest.importorskip("datasets")
    ctx, d, n = 8, 32, 40
    x = np.random.default_rng(0).standard_normal((n, ctx, d)).astype(np.float32)
    x[:, :, 0] = np.arange(n * ctx).reshape(n, ctx)  # a row's first value is its index
    feats = datasets.Features({"blocks.0.hook_resid_post": datasets.Array2D((ctx, d), "float32"),
                               "token_ids": datasets.Sequence(datasets.Value("int32"), length=ctx)})
    ds = datasets.Dataset.from_dict({"blocks.0.hook_resid_post": x,
                                     "token_ids": np.arange(n * ctx, dtype=np.int32).reshape(n, ctx)}, features=feats)
    ds.save_to_disk(str(tmp_path / "cache"))
    s = open_store(str(tmp_path / "cache"))
    assert s.kind == "datasets" and s.sample_shape == (d,) and s.rows == n * ctx
    srv = start_server("generator.source=store", f"store.path={tmp_path / 'cache'}", "store.passes=1",
                       "store.column=blocks.0.hook_resid_post", "buffer.size=100", "buffer.min_fill=0",
                       base=["+preset=test"])
    got = get_rows(srv.url, n * ctx, chunk=100).numpy()
    assert sorted(got[:, 0].astype(int).tolist()) == list(range(n * ctx))
    assert np.array_equal(got[np.argsort(got[:, 0])], x.reshape(-1, d))


def cfg_with(**groups):
    cfg = Config()
    for group, kv in groups.items():
        for k, v in kv.items():
            setattr(getattr(cfg, group), k, v)
    return cfg


def test_bad_stores_are_named_before_anything_is_allocated(tmp_path):
    def err(**groups):
        with pytest.raises(ConfigError) as e:
            sample_shape(cfg_with(**groups))
        return str(e.value)

    from actdata.config import validate

    for groups, key in [({"generator": {"source": "store"}}, "store.path"),
                        ({"generator": {"source": "store"}, "store": {"path": "x", "write": True}}, "store.write"),
                        ({"store": {"write": True}}, "store.path"),
                        ({"store": {"shard_rows": 0}}, "store.shard_rows"),
                        ({"store": {"max_bytes": 0}}, "store.max_bytes"),
                        ({"generator": {"source": "store"}, "store": {"path": "x"}, "buffer": {"warm_start": "y"}},
                         "buffer.warm_start")]:
        with pytest.raises(ConfigError, match=f"^{key}:"):
            validate(cfg_with(**groups))
    assert err(generator={"source": "store"}, store={"path": str(tmp_path / "missing")}).startswith("store.path:")
    (tmp_path / "empty").mkdir()
    assert "no store manifest" in err(generator={"source": "store"}, store={"path": str(tmp_path / "empty")})
    half = tmp_path / "half"
    half.mkdir()
    (half / ".shard-g00000-000000.safetensors.tmp").write_bytes(b"\0" * 100)
    assert "only a shard being written" in err(generator={"source": "store"}, store={"path": str(half)})
    write_synthetic(tmp_path / "ok", 3)
    os.unlink(tmp_path / "ok" / "shard-g00000-000001.safetensors")
    assert "missing" in err(generator={"source": "store"}, store={"path": str(tmp_path / "ok")})
    write_synthetic(tmp_path / "ok2", 3)
    assert sample_shape(cfg_with(generator={"source": "store"}, store={"path": str(tmp_path / "ok2")})) == (64,)
    assert err(generator={"source": "store"}, store={"path": str(tmp_path / "ok2")},
               buffer={"dtype": "float16"}).startswith("buffer.dtype:")
    assert err(generator={"source": "store"}, store={"path": str(tmp_path / "ok2")},
               buffer={"activation_dim": 65}).startswith("buffer.activation_dim:")
    assert err(generator={"source": "synthetic"}, buffer={"activation_dim": 128},
               store={"path": str(tmp_path / "ok2"), "write": True}).startswith("store.path:")
    assert err(generator={"source": "synthetic"}, buffer={"activation_dim": 128, "warm_start": str(tmp_path / "ok2")}
               ).startswith("buffer.warm_start:")
    # through the command line: one line naming the key, exit 2, nothing allocated
    out = subprocess.run([sys.executable, "-m", "actdata.serve", "+preset=test", "generator.source=store",
                          f"store.path={tmp_path / 'empty'}", "server.log_file=null"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("actdata: bad config: store.path:")


def test_inspect_command(tmp_path):
    write_synthetic(tmp_path, 3)
    out = subprocess.run([sys.executable, "-m", "actdata.store", str(tmp_path), "--verify"], capture_output=True,
                         text=True, timeout=60)
    assert (out.returncode == 0 and "rows: 384" in out.stdout and "all match" in out.stdout
            and "statistics" in out.stdout)
    shard = sorted(p for p in os.listdir(tmp_path) if p.startswith("shard"))[0]
    with open(tmp_path / shard, "r+b") as f:
        f.seek(5000)
        f.write(b"\x7f")
    out = subprocess.run([sys.executable, "-m", "actdata.store", str(tmp_path), "--verify"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and f"BAD {shard}" in out.stdout


def test_shards_carry_a_crc32c_and_version_1_stores_with_crc32_still_read_and_verify(tmp_path):
    """New shards name their checksum (CRC-32C) in the manifest; a version-1 store (zlib CRC-32) is still
    opened, verified, replayed and continued, and a flipped byte in it is still caught by --verify."""
    import zlib

    ids, _ = write_synthetic(tmp_path, 5)  # 640 rows: shards of 300, 300, 40
    m = json.load(open(tmp_path / "manifest-g00000.json"))
    assert m["version"] == 2 and all(isinstance(s["crc32c"], int) and "crc32" not in s for s in m["shards"])
    for s in m["shards"]:  # rewrite as the version-1 format wrote it
        with open(tmp_path / s["file"], "rb") as f:
            f.seek(4096)
            s["crc32"] = zlib.crc32(f.read())
        del s["crc32c"]
    m["version"] = 1
    json.dump(m, open(tmp_path / "manifest-g00000.json", "w"))
    s = open_store(str(tmp_path))
    assert [sh.crc_kind for sh in s.shards] == ["crc32"] * 3 and all(verify_shard(s, sh) is None for sh in s.shards)
    got = [i for rows, _, _ in StoreSource(s, passes=1, idle=False) for i in row_ids(rows).tolist()]
    assert collections.Counter(got) == collections.Counter(ids)
    write_synthetic(tmp_path, 1)  # a writer continues the old store: old entries keep their CRC-32
    s = open_store(str(tmp_path))
    assert [sh.crc_kind for sh in s.shards] == ["crc32"] * 3 + ["crc32c"] and s.rows == 768
    assert all(verify_shard(s, sh) is None for sh in s.shards)
    first = s.shards[0].file
    with open(first, "r+b") as f:
        f.seek(5000)
        b = f.read(1)
        f.seek(5000)
        f.write(bytes([b[0] ^ 0xFF]))
    out = subprocess.run([sys.executable, "-m", "actdata.store", str(tmp_path), "--verify"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and f"BAD {os.path.basename(first)}: CRC-32 " in out.stdout


def test_the_writer_takes_a_batch_reduction_from_its_caller(tmp_path):
    """Statistics handed to put() with a batch are the shard's statistics (the writer does not reduce those
    rows again); a batch that spans two shards is reduced by the writer, per shard."""
    from actdata.storage.writer import batch_stats

    w = StoreWriter(str(tmp_path), meta(), shard_rows=300)
    rows = make_rows(torch.arange(256), (64,), torch.float32)
    told = batch_stats(rows * 2, (64,))  # not these rows' statistics: shows which ones the manifest keeps
    w.put(rows, np.arange(256), stats=told)
    w.put(rows, np.arange(256), stats=told)  # 44 rows in shard 0, 212 in shard 1: reduced by the writer
    w.close()
    s = open_store(str(tmp_path))
    want = batch_stats(rows * 2, (64,))
    want.merge(batch_stats(rows, (64,)))
    assert [sh.rows for sh in s.shards] == [300, 212] and s.stats.count == 512
    np.testing.assert_allclose(s.stats.mean, want.mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(s.stats.m2, want.m2, rtol=1e-4)


def row_hashes(t: torch.Tensor) -> list[bytes]:
    import hashlib

    return [hashlib.blake2b(r.numpy().tobytes(), digest_size=16).digest() for r in t.reshape(len(t), -1)]


def test_embedded_model_write_replay_warm_start(tmp_path, start_server):
    """The model path: rows of SmolLM2 (block 6) stored while serving, replayed exactly, warm-starting a
    model-backed server whose first rows are the stored ones."""
    store, env = str(tmp_path / "store"), {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    srv = start_server("buffer.size=200", "buffer.min_fill=0.2", "store.write=true", f"store.path={store}",
                       "store.shard_rows=100", base=["+preset=test"], timeout=300, env=env)
    get_rows(srv.url, 300, timeout=300, chunk=100)
    srv.stop()
    s = open_store(store)
    m = s.manifests[0]
    assert m["source"] == "model" and m["model"]["name"] == "embedded" and m["layers"] == [6]
    assert m["sites"] == ["resid_post"] and s.sample_shape == (576,) and s.rows >= 300 and s.stats.count == s.rows
    stored = collections.Counter(h for sh in s.shards for h in row_hashes(torch.from_numpy(np.memmap(
        sh.file, np.float32, mode="r", offset=4096, shape=(sh.rows, 576)).copy())))
    rep = start_server("generator.source=store", f"store.path={store}", "store.passes=1", "buffer.size=200",
                       "buffer.min_fill=0", base=["+preset=test"])
    assert collections.Counter(row_hashes(get_rows(rep.url, s.rows, chunk=100))) == stored
    rep.stop()
    warm = start_server(f"buffer.warm_start={store}", "buffer.size=150", "buffer.min_fill=1.0",
                        base=["+preset=test"], timeout=300, env=env)
    r = requests.get(warm.url + wire.TENSOR_PATH, params={"num_samples": 150})  # served at once, model loading
    assert r.status_code == 200, r.text
    got = row_hashes(wire.decode(r.content, r.headers))
    assert len(set(got)) == 150 and set(got) <= set(stored)


def test_max_bytes_stops_writing_and_says_so(tmp_path):
    w = StoreWriter(str(tmp_path), meta(), shard_rows=300, max_bytes=200_000)
    src = iter(SyntheticSource((64,), torch.float32, batch_rows=128))
    for _ in range(8):
        rows, origin, _ = next(src)
        w.put(rows, origin)
    w.close()
    st = w.state()
    s = open_store(str(tmp_path))
    assert st["state"] == "full (store.max_bytes)" and st["bytes"] <= 200_000 and len(s.shards) == 2
    assert st["rows"] == s.rows == 600 and st["rows_not_stored"] == 1024 - 600


def test_replay_continues_from_a_saved_position(tmp_path):
    """From the position saved after any batch (across a pass boundary), a new source yields exactly what
    the old one would have yielded next."""
    write_synthetic(tmp_path, 8, shard_rows=256)  # 4 shards of 256 rows
    fresh = [(row_ids(rows).tolist(), info["position"])
             for rows, _, info in StoreSource(open_store(str(tmp_path)), seed=1, passes=2, idle=False, batch_rows=100)]
    flat = [i for ids, _ in fresh for i in ids]
    assert len(flat) == 2 * 1024
    for cut in (0, 2, 5, len(fresh) // 2, len(fresh) - 2):  # after batch `cut`, mid-shard, end of shard, new pass
        done = sum(len(ids) for ids, _ in fresh[:cut + 1])
        resumed = StoreSource(open_store(str(tmp_path)), seed=1, passes=2, idle=False, batch_rows=100,
                              start={"position": fresh[cut][1]})
        assert [i for rows, _, _ in resumed for i in row_ids(rows).tolist()] == flat[done:]


def test_a_restarted_replay_server_continues_its_pass(tmp_path, start_server):
    """generator.state_dir set: a replay server stopped mid-pass and started again serves the rest of the
    pass, never a row it served before (rows still in the first buffer at the stop are skipped)."""
    ids, _ = write_synthetic(tmp_path / "store", 16, shard_rows=256)  # 2,048 rows in 8 shards
    args = ["generator.source=store", f"store.path={tmp_path / 'store'}", "store.passes=1", "buffer.size=300",
            "buffer.min_fill=0", f"generator.state_dir={tmp_path / 'state'}"]
    first = start_server(*args, base=["+preset=test"])
    before = row_ids(get_rows(first.url, 600)).tolist()
    first.stop()
    second = start_server(*args, base=["+preset=test"])
    after, deadline, ask = [], time.time() + 60, 50
    while time.time() < deadline:
        r = requests.get(second.url + wire.TENSOR_PATH, params={"num_samples": ask})
        if r.status_code == 200:
            after += row_ids(wire.decode(r.content, r.headers)).tolist()
            continue
        ready = requests.get(second.url + "/stats").json()["ready"]
        if gen_status(second.url)["store_replay"]["state"] == "done":  # the pass is over: take what is left
            if ready == 0:
                break
            ask = min(50, ready)
        time.sleep(0.05)
    assert after and not set(before) & set(after)  # the second server went on; nothing served twice
    assert len(set(after)) == len(after) and set(before) | set(after) <= set(ids)
    assert len(before) + len(after) <= len(ids)
    assert gen_status(second.url)["store_replay"]["pass"] == 1
