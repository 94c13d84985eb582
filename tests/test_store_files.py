"""Malformed store files: every way a manifest or a shard header can be wrong ends in one StoreError line
that names the file (never another exception), and the commands that open a store exit 2 with that line.

A real small store is written once (StoreWriter, 384 rows in shards of 100); each case copies it and
breaks one thing: hand-picked mutations that must all be refused, then seeded random ones (keys deleted,
values of another type, the JSON cut or overwritten, bytes of a shard header flipped) that must either be
refused that way or leave a store that still opens."""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
from test_store import write_synthetic

from actdata.storage.catalog import open_store
from actdata.storage.format import DATA_START, StoreError

MANIFEST = "manifest-g00000.json"
SHARD = "shard-g00000-000001.safetensors"  # the second shard: 100 rows of [64] float32 with provenance


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "store"
    write_synthetic(path, 3, shard_rows=100)
    assert [s.rows for s in open_store(str(path)).shards] == [100, 100, 100, 84]
    return path


def copy_of(pristine, tmp_path):
    d = tmp_path / "store"
    shutil.copytree(pristine, d)
    return d


def edit_json(d, fn):
    p = d / MANIFEST
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


def put(obj, path, value):
    """Set obj[path[0]][path[1]]... = value."""
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def drop(obj, path):
    for k in path[:-1]:
        obj = obj[k]
    del obj[path[-1]]


def write_bytes_at(d, name, offset, data):
    with open(d / name, "r+b") as f:
        f.seek(offset)
        f.write(data)


def header_text(d, name=SHARD):
    with open(d / name, "rb") as f:
        return f.read(DATA_START)[8:]


def set_header(d, text, name=SHARD):
    """Replace the JSON of a shard's header, keeping its length (space-padded)."""
    assert len(text.rstrip()) <= DATA_START - 8
    write_bytes_at(d, name, 8, text.rstrip().ljust(DATA_START - 8))


def retitle(d, old, new):
    set_header(d, header_text(d).replace(old, new, 1))


def resize_shard(d, rows):
    """The manifest and the file both say `rows` rows; the header still says 100."""
    def fn(m):
        s = m["shards"][1]
        delta = (s["rows"] - rows) * (64 * 4 + 8 + 16)
        s["rows"], s["bytes"] = rows, s["bytes"] - delta
        m["rows"], m["bytes"] = m["rows"] - (100 - rows), m["bytes"] - delta
    edit_json(d, fn)
    os.truncate(d / SHARD, os.path.getsize(d / SHARD) - (100 - rows) * (64 * 4 + 8 + 16))


def manifest_case(fn):
    return lambda d: edit_json(d, fn)


def raw_manifest(data):
    return lambda d: (d / MANIFEST).write_bytes(data)


HAND_PICKED = {
    "not JSON": raw_manifest(b"{not json"),
    "empty file": raw_manifest(b""),
    "binary": raw_manifest(bytes(range(256))),
    "truncated": lambda d: (d / MANIFEST).write_bytes((d / MANIFEST).read_bytes()[:300]),
    "a list": raw_manifest(b"[]"),
    "a string": raw_manifest(b'"manifest"'),
    "null": raw_manifest(b"null"),
    "a number": raw_manifest(b"3"),
    "no format": manifest_case(lambda m: drop(m, ["format"])),
    "other format": manifest_case(lambda m: put(m, ["format"], "safetensors")),
    "version 3": manifest_case(lambda m: put(m, ["version"], 3)),
    "unknown dtype": manifest_case(lambda m: put(m, ["dtype"], "float64")),
    "dtype a number": manifest_case(lambda m: put(m, ["dtype"], 4)),
    "dtype a list": manifest_case(lambda m: put(m, ["dtype"], ["float32"])),
    "no dtype": manifest_case(lambda m: drop(m, ["dtype"])),
    "sample_shape a string": manifest_case(lambda m: put(m, ["sample_shape"], "64")),
    "sample_shape an int": manifest_case(lambda m: put(m, ["sample_shape"], 64)),
    "sample_shape empty": manifest_case(lambda m: put(m, ["sample_shape"], [])),
    "sample_shape zero": manifest_case(lambda m: put(m, ["sample_shape"], [0])),
    "sample_shape negative": manifest_case(lambda m: put(m, ["sample_shape"], [-64])),
    "sample_shape float": manifest_case(lambda m: put(m, ["sample_shape"], [64.0])),
    "sample_shape bool": manifest_case(lambda m: put(m, ["sample_shape"], [True])),
    "sample_shape null": manifest_case(lambda m: put(m, ["sample_shape"], None)),
    "generator a string": manifest_case(lambda m: put(m, ["generator"], "0")),
    "generator negative": manifest_case(lambda m: put(m, ["generator"], -1)),
    "generators zero": manifest_case(lambda m: put(m, ["generators"], 0)),
    "rows a string": manifest_case(lambda m: put(m, ["rows"], "384")),
    "rows not the sum": manifest_case(lambda m: put(m, ["rows"], 383)),
    "bytes negative": manifest_case(lambda m: put(m, ["bytes"], -1)),
    "row_bytes wrong": manifest_case(lambda m: put(m, ["row_bytes"], 128)),
    "model a string": manifest_case(lambda m: put(m, ["model"], "gpt2")),
    "no shards": manifest_case(lambda m: drop(m, ["shards"])),
    "shards an object": manifest_case(lambda m: put(m, ["shards"], {})),
    "shards a string": manifest_case(lambda m: put(m, ["shards"], "shard-g00000-000000.safetensors")),
    "shards null": manifest_case(lambda m: put(m, ["shards"], None)),
    "shard an int": manifest_case(lambda m: put(m, ["shards", 1], 3)),
    "shard a list": manifest_case(lambda m: put(m, ["shards", 1], [SHARD, 100])),
    "shard without file": manifest_case(lambda m: drop(m, ["shards", 1, "file"])),
    "shard name null": manifest_case(lambda m: put(m, ["shards", 1, "file"], None)),
    "shard name outside": manifest_case(lambda m: put(m, ["shards", 1, "file"], "../" + SHARD)),
    "shard name not a shard": manifest_case(lambda m: put(m, ["shards", 1, "file"], MANIFEST)),
    "shard listed twice": manifest_case(lambda m: put(m, ["shards", 2], m["shards"][1])),
    "shard missing": manifest_case(lambda m: put(m, ["shards", 1, "file"], "shard-g00000-000009.safetensors")),
    "shard without rows": manifest_case(lambda m: drop(m, ["shards", 1, "rows"])),
    "shard rows a string": manifest_case(lambda m: put(m, ["shards", 1, "rows"], "100")),
    "shard rows a float": manifest_case(lambda m: put(m, ["shards", 1, "rows"], 100.5)),
    "shard rows bool": manifest_case(lambda m: put(m, ["shards", 1, "rows"], True)),
    "shard rows negative": manifest_case(lambda m: put(m, ["shards", 1, "rows"], -100)),
    "shard rows wrong": manifest_case(lambda m: put(m, ["shards", 1, "rows"], 101)),
    "shard without bytes": manifest_case(lambda m: drop(m, ["shards", 1, "bytes"])),
    "shard bytes null": manifest_case(lambda m: put(m, ["shards", 1, "bytes"], None)),
    "shard bytes wrong": manifest_case(lambda m: put(m, ["shards", 1, "bytes"], m["shards"][1]["bytes"] + 1)),
    "shard provenance a string": manifest_case(lambda m: put(m, ["shards", 1, "provenance"], "yes")),
    "shard provenance false": manifest_case(lambda m: put(m, ["shards", 1, "provenance"], False)),
    "shard crc32c a string": manifest_case(lambda m: put(m, ["shards", 1, "crc32c"], "deadbeef")),
    "shard crc32c negative": manifest_case(lambda m: put(m, ["shards", 1, "crc32c"], -1)),
    "shard crc32 (version 1) too big": manifest_case(lambda m: put(m, ["shards", 1, "crc32"], 1 << 32)),
    "stats a string": manifest_case(lambda m: put(m, ["stats"], "none")),
    "stats empty": manifest_case(lambda m: put(m, ["stats"], {})),
    "stats without mean": manifest_case(lambda m: drop(m, ["stats", "mean"])),
    "stats mean short": manifest_case(lambda m: put(m, ["stats", "mean"], [[0.0] * 63])),
    "stats mean strings": manifest_case(lambda m: put(m, ["stats", "mean"], [["x"] * 64])),
    "stats of other rows": manifest_case(lambda m: put(m, ["stats", "sample_shape"], [2, 32])),
    "stats count null": manifest_case(lambda m: put(m, ["stats", "count"], None)),
    # the same row bytes, so the manifest alone looks right: only the shard headers disagree
    "sample_shape of other rows": manifest_case(lambda m: (put(m, ["sample_shape"], [2, 32]), drop(m, ["stats"]))),
    "dtype of other rows": manifest_case(lambda m: (put(m, ["dtype"], "float16"), put(m, ["sample_shape"], [128]),
                                                    drop(m, ["stats"]))),
    "shard shorter than its header says": lambda d: resize_shard(d, 99),
    "shard file truncated": lambda d: os.truncate(d / SHARD, 5000),
    "shard file empty": lambda d: os.truncate(d / SHARD, 0),
    "header length garbage": lambda d: write_bytes_at(d, SHARD, 0, b"\xff" * 8),
    "header length short": lambda d: write_bytes_at(d, SHARD, 0, (100).to_bytes(8, "little")),
    "header length past the file": lambda d: write_bytes_at(d, SHARD, 0, (1 << 40).to_bytes(8, "little")),
    "header not JSON": lambda d: write_bytes_at(d, SHARD, 8, b"{{{{"),
    "header not UTF-8": lambda d: write_bytes_at(d, SHARD, 8, b"\xff\xfe"),
    "header zeros": lambda d: write_bytes_at(d, SHARD, 8, b"\0" * (DATA_START - 8)),
    "header a list": lambda d: set_header(d, b"[]"),
    "header without rows": lambda d: retitle(d, b'"rows"', b'"rowz"'),
    "header rows of other shape": lambda d: retitle(d, b"[100,64]", b"[50,128]"),
    "header rows disagree": lambda d: retitle(d, b"[100,64]", b"[99,64]"),
    "header unknown dtype": lambda d: retitle(d, b'"F32"', b'"F99"'),
    "header other dtype": lambda d: retitle(d, b'"F32"', b'"I32"'),
    "header without origin": lambda d: retitle(d, b'"origin"', b'"origen"'),
    "header without provenance": lambda d: retitle(d, b'"doc_ids"', b'"doc_idz"'),
    "header offsets a string": lambda d: retitle(d, b'"data_offsets":[0,', b'"data_offsets":["0",'),
}


def assert_refused(d, case):
    with pytest.raises(StoreError) as e:
        open_store(str(d))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("store.path: "), (case, msg)
    assert MANIFEST in msg or "shard-g00000-" in msg, (case, msg)  # names the file
    return msg


@pytest.mark.parametrize("case", list(HAND_PICKED))
def test_a_malformed_file_is_one_line_naming_it(pristine, tmp_path, case):
    d = copy_of(pristine, tmp_path)
    HAND_PICKED[case](d)
    msg = assert_refused(d, case)
    if case.startswith(("header", "shard file", "shard shorter")):
        assert SHARD in msg, msg


def random_value(rng):
    return rng.choice([None, True, -1, 0, 1.5, 10 ** 20, "", "x", "float32", [], [0], [-1, "a"], {}, {"a": 1},
                       [[1.0, 2.0]]])


def paths_of(obj, path=()):
    yield path
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        if isinstance(obj, list) and len(obj) > 8 and k > 2:  # a long array of numbers: its head is enough
            break
        yield from paths_of(v, path + (k,))


def random_mutation(rng, d):
    """One random damage to the manifest or to a shard's header; returns its description."""
    op = rng.choice(["delete", "replace", "replace", "cut", "bytes", "header"])
    if op in ("delete", "replace"):
        m = json.loads((d / MANIFEST).read_text())
        path = rng.choice([p for p in paths_of(m) if p])
        if op == "delete" and isinstance(path[-1], str):
            drop(m, list(path))
        else:
            put(m, list(path), random_value(rng))
        (d / MANIFEST).write_text(json.dumps(m))
        return f"{op} {path}"
    if op == "cut":
        raw = (d / MANIFEST).read_bytes()
        at = rng.randrange(len(raw))
        (d / MANIFEST).write_bytes(raw[:at])
        return f"cut at {at}"
    if op == "bytes":
        raw = bytearray((d / MANIFEST).read_bytes())
        at = rng.randrange(len(raw))
        raw[at:at + 4] = bytes(rng.randrange(256) for _ in range(4))
        (d / MANIFEST).write_bytes(bytes(raw))
        return f"bytes at {at}"
    name = f"shard-g00000-00000{rng.randrange(4)}.safetensors"
    text = header_text(d, name).rstrip()
    at = rng.randrange(8 + len(text))  # the length field or the JSON, not only its padding
    write_bytes_at(d, name, at, bytes([rng.randrange(256)]))
    return f"header byte {at} of {name}"


def test_random_damage_is_refused_in_one_line_or_harmless(pristine, tmp_path):
    rng = random.Random(20261204)
    refused = 0
    for i in range(150):
        d = tmp_path / f"case{i}"
        shutil.copytree(pristine, d)
        what = random_mutation(rng, d)
        try:
            open_store(str(d))
        except StoreError as e:
            msg = str(e)
            assert "\n" not in msg and (MANIFEST in msg or "shard-g00000-" in msg), (what, msg)
            refused += 1
        except Exception as e:
            pytest.fail(f"{what}: {type(e).__name__}: {e}")
        shutil.rmtree(d)
    assert refused > 100  # most damage matters; the rest hit fields a reader does not rely on


def run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["shards an object", "shard rows a string", "header rows disagree", "binary"])
def test_inspect_command_says_one_line(pristine, tmp_path, case):
    d = copy_of(pristine, tmp_path)
    HAND_PICKED[case](d)
    out = run("actdata.store", str(d))
    assert out.returncode == 2 and out.stdout == "", (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"actdata.store: path: {d}/"), out.stderr


@pytest.mark.parametrize("how", ["replay", "warm start"])
def test_servers_refuse_a_malformed_store_in_one_line(pristine, tmp_path, how):
    d = copy_of(pristine, tmp_path)
    HAND_PICKED["shard rows a string"](d)
    key, args = (("store.path", ["generator.source=store", f"store.path={d}"]) if how == "replay" else
                 ("buffer.warm_start", ["generator.source=synthetic", "buffer.activation_dim=64",
                                        f"buffer.warm_start={d}"]))
    out = run("actdata.serve", "+preset=test", *args, "generator.state_dir=null", "server.log_file=null")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"actdata: bad config: {key}: {d}/{MANIFEST}: shard {SHARD}: rows"), lines[0]


def test_writing_into_a_store_with_a_malformed_manifest_is_refused(pristine, tmp_path):
    from test_store import meta

    from actdata.config import Config
    from actdata.serving.main import sample_shape
    from actdata.storage.writer import StoreWriter

    d = copy_of(pristine, tmp_path)
    HAND_PICKED["shard an int"](d)
    cfg = Config()
    cfg.generator.source, cfg.buffer.activation_dim, cfg.store.write, cfg.store.path = "synthetic", 64, True, str(d)
    with pytest.raises(StoreError, match=f"^store.path: {d}/{MANIFEST}: shards\\[1\\] is a JSON int"):
        sample_shape(cfg)
    with pytest.raises(StoreError, match=f"^store.path: {d}/{MANIFEST}: "):
        StoreWriter(str(d), meta(), shard_rows=100)
