"""Rows that know their origin: corpus shares per generator, resumable positions, provenance, statistics.

The partition and the position are checked on the text side (exact, fast); provenance, statistics and
resume through real servers: two LitServe generator workers on the CPU (server.generators_per_device=2).
"""
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import requests
import safetensors.torch
import torch

from actdata import wire
from actdata.config import Config, ConfigError, DatasetConfig
from actdata.generation.state import GeneratorState, check_state_dir, identity
from actdata.generation.synthetic import CONTEXT_ROWS, make_rows, row_ids
from actdata.generation.text import TokenBlocks, documents, share
from actdata.reading.client import ActivationClient, ActivationServerError, ProvenanceBatch, scaling_factor
from actdata.stats import RunningStats


class WordTokenizer:
    """One id per distinct word (10 + its number), BOS 1, EOS 2, pad 0."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self):
        self.vocab = {}

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[10 + self.vocab.setdefault(w, len(self.vocab)) for w in t.split()] for t in texts]}


def write_jsonl(path, docs):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")


DOCS = [f"doc{i} " + " ".join(f"w{i}_{j}" for j in range(3 + i % 7)) for i in range(40)]


# -- the partition -------------------------------------------------------------------------------------

def test_embedded_corpus_is_split_into_disjoint_shares_ordered_per_generator_and_pass():
    from actdata.generation.embedded import kjv_chapters

    d = DatasetConfig(name="embedded", seed=3)
    shares = [list(documents(d, 0, g, 3)) for g in range(3)]
    assert sorted(sum(shares, [])) == sorted(kjv_chapters()), "together the shares are the corpus, once"
    assert shares[0] == list(documents(d, 0, 0, 3)), "same (seed, g, pass): same order"
    assert shares[0] != list(documents(d, 1, 0, 3)) and sorted(shares[0]) == sorted(documents(d, 1, 0, 3))
    assert shares[1] != list(documents(DatasetConfig(name="embedded", seed=4), 0, 1, 3))


@pytest.mark.parametrize("streaming", [True, False])
def test_local_files_are_split_by_document_index(tmp_path, streaming):
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    d = DatasetConfig(name=str(tmp_path / "a.jsonl"), streaming=streaming, shuffle_buffer=100, seed=1)
    shares = [list(documents(d, 0, g, 3)) for g in range(3)]
    for g in range(3):
        assert sorted(shares[g]) == sorted(DOCS[g::3]), f"generator {g} reads documents i % 3 == {g}"
    assert shares[0] != DOCS[0::3], "and in a shuffled order"


@pytest.mark.parametrize("files", [1, 2])
def test_streamed_hub_style_dataset_is_split_by_node(tmp_path, files):
    """A streamed `datasets` IterableDataset (what a hub name gives) goes through split_dataset_by_node:
    whole shards when their number divides by G, every G-th example otherwise."""
    from datasets import load_dataset

    paths = []
    for k in range(files):
        paths.append(str(tmp_path / f"part{k}.jsonl"))
        write_jsonl(paths[-1], DOCS[k::files])
    seen = []
    for g in range(2):
        ds = share(load_dataset("json", data_files=paths, split="train", streaming=True), g, 2, local=False)
        seen.append([row["text"] for row in ds])
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(DOCS)


# -- the position --------------------------------------------------------------------------------------

@pytest.mark.parametrize("cut", [0, 1, 3, 7, 12])
def test_a_saved_position_continues_exactly_where_the_run_stopped(tmp_path, cut):
    """Blocks made after resuming at batch `cut`'s position are the blocks an uninterrupted run makes next,
    across pass boundaries (40 short documents, 2 shares, blocks of 6 tokens)."""
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    d = DatasetConfig(name=str(tmp_path / "a.jsonl"), streaming=False, seed=5)
    tok = WordTokenizer()

    def run(start=None, n=30):
        out = []
        for b in TokenBlocks(d, tok, 6, 3, g=1, G=2, start=start):
            out.append(b)
            if len(out) == n:
                return out

    full = run()
    assert full[-1].corpus_passes >= 2, "the run crosses pass boundaries"
    resumed = run(full[cut].position, n=30 - cut - 1)
    for a, b in zip(full[cut + 1:], resumed):
        assert torch.equal(a.input_ids, b.input_ids) and a.position == b.position
        assert a.corpus_passes == b.corpus_passes


def test_state_file_round_trip_foreign_and_corrupt_files(tmp_path, caplog):
    cfg = Config()
    cfg.generator.source = "model"
    st = GeneratorState(str(tmp_path), 1, 2, identity(cfg))
    assert st.load() is None
    st.save(position={"pass": 0, "documents": 5, "offset": 3}, next_context=17, contexts=17, tokens=99, rows=90)
    assert st.load()["position"] == {"pass": 0, "documents": 5, "offset": 3}
    other = Config()
    other.generator.source, other.dataset.seed = "model", 1
    assert GeneratorState(str(tmp_path), 1, 2, identity(other)).load() is None, "another config's state"
    assert "belongs to another config" in caplog.text
    with open(st.path, "w") as f:
        f.write("{not json")
    caplog.clear()
    assert st.load() is None and st.path in caplog.text, "a corrupt file: a warning naming it, a fresh start"


def test_unwritable_state_dir_is_a_one_line_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = Config()
    cfg.generator.state_dir = str(blocker / "state")
    with pytest.raises(ConfigError, match=r"^generator\.state_dir: "):
        check_state_dir(cfg)
    r = subprocess.run([sys.executable, "-m", "actdata.serve", "+preset=test", "generator.source=synthetic",
                        f"generator.state_dir={blocker / 'state'}", "server.log_file=null"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "generator.state_dir" in r.stderr.strip().splitlines()[-1]


# -- through real servers ------------------------------------------------------------------------------

TWO_SYNTHETIC = ["+preset=test", "generator.source=synthetic", "server.generators_per_device=2",
                 "generator.statistics=true", "generator.provenance=true", "buffer.size=1024", "buffer.min_fill=1.0"]


def wait_counts_settle(client, timeout=60):
    """The statistics once the full buffer has blocked both generators (counts stop moving)."""
    import time

    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        s = client.get_statistics()
        key = sorted((g["name"], g["count"]) for g in s["generators"])
        if len(key) == 2 and key == last:
            return s
        last = key
        time.sleep(2.5)
    raise AssertionError(f"statistics never settled: {last}")


def test_two_cpu_generators_provenance_statistics_and_422(start_server, tmp_path):
    srv = start_server(*TWO_SYNTHETIC, f"generator.state_dir={tmp_path}", base=[], timeout=240)
    c = ActivationClient(srv.url, retry_for_s=120)
    assert c.wait_for_data(1024, timeout=120)
    stats = wait_counts_settle(c)
    gens = c.get_stats()["generators"]
    assert sorted(g["position"]["g"] for g in gens) == [0, 1] and {g["position"]["G"] for g in gens} == {2}

    # statistics == statistics computed directly from every row the two generators wrote (rows are a
    # pure function of their id; generator g wrote ids g<<40 .. g<<40 + count_g - 1)
    direct = RunningStats((768,))
    for g in stats["generators"]:
        base = int(g["name"][-1]) << 40
        direct.update(make_rows(torch.arange(base, base + g["count"]), (768,), torch.float32))
    full = c.get_statistics(tensors=True)
    assert int(full["count"][0]) == direct.count == stats["count"]
    # batches are reduced in float32 chunks and merged in float64: equal to the direct reduction within 1e-5
    np.testing.assert_allclose(full["mean"].numpy(), direct.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(full["var"].numpy(), direct.var, rtol=1e-5)
    np.testing.assert_allclose(stats["mean_sq_norm"], direct.mean_sq_norm, rtol=1e-5)
    np.testing.assert_allclose(stats["mean_norm"], direct.mean_norm, rtol=1e-5)
    assert scaling_factor(stats) == pytest.approx(direct.scaling_factor().tolist(), rel=1e-5)
    raw = requests.get(srv.url + "/statistics", params={"format": "safetensors"}).content
    assert torch.equal(safetensors.torch.load(raw)["mean"], full["mean"]), "a standard safetensors body"

    # provenance comes with its rows: a synthetic row's id is written into the row itself
    r = requests.get(srv.url + wire.TENSOR_PATH, params={"num_samples": 300, "provenance": 1})
    body = safetensors.torch.load(r.content)
    assert sorted(body) == ["activations", "doc_ids", "positions", "token_ids"]
    assert torch.equal(row_ids(body["activations"]), body["doc_ids"])
    assert torch.equal(body["positions"], (body["doc_ids"] % CONTEXT_ROWS).to(torch.int32))
    b = c.get_activations_tensor(500, provenance=True)
    assert isinstance(b, ProvenanceBatch) and b.activations.shape == (500, 768)
    assert torch.equal(row_ids(b.activations), b.doc_ids)
    # both generators' rows carry their provenance (one batch may hold only one's: a generator that
    # started late can have written a handful of the buffer's rows; serve-once brings fresh ones)
    seen = set((b.doc_ids >> 40).tolist())
    for _ in range(40):
        if seen == {0, 1}:
            break
        b = c.get_activations_tensor(100, provenance=True)
        assert torch.equal(row_ids(b.activations), b.doc_ids)
        seen |= set((b.doc_ids >> 40).tolist())
    assert seen == {0, 1}
    j = c.get_activations(3)
    assert torch.equal(row_ids(torch.tensor(j["activations"])), torch.tensor(j["doc_ids"]))

    # a server without provenance: 422 naming the key; the plain route unchanged
    plain = start_server("buffer.size=300", "buffer.min_fill=0.2")
    r = requests.get(plain.url + wire.TENSOR_PATH, params={"num_samples": 4, "provenance": 1})
    assert r.status_code == 422 and "generator.provenance" in r.json()["detail"]
    with pytest.raises(ActivationServerError, match="generator.provenance"):
        ActivationClient(plain.url).get_activations_tensor(4, provenance=True)


def tensor_route_answers(url) -> int:
    """2xx answers of the tensor route over HTTP, all HTTP processes together (/metrics)."""
    import re

    text = requests.get(url + "/metrics", timeout=30).text
    return sum(int(float(v)) for labels, v in re.findall(r'actdata_http_requests_total\{([^}]*)\} ([0-9.e+]+)', text)
               if 'route="/activations/tensor"' in labels and 'code="2xx"' in labels)


def test_a_trainer_beside_a_provenance_server_reads_its_buffer_not_http(start_server, caplog):
    """The same-host path holds for a buffer with provenance arrays, for plain and provenance batches."""
    import logging

    from torch.utils.data import DataLoader

    from actdata import RemoteActivationDataset

    srv = start_server("generator.provenance=true", "buffer.size=2000", "buffer.min_fill=0.25")
    c = ActivationClient(srv.url)
    assert c.wait_for_data(600, timeout=120)
    answers, rows_read = tensor_route_answers(srv.url), c.get_stats()["rows_read"]
    with caplog.at_level(logging.DEBUG, logger="actdata.reading"):
        plain = list(DataLoader(RemoteActivationDataset(srv.url, batch_size=100, max_batches=3), batch_size=None))
        origin = list(DataLoader(RemoteActivationDataset(srv.url, batch_size=100, max_batches=2, provenance=True),
                                 batch_size=None))
    assert not [r.getMessage() for r in caplog.records if "same-host" in r.getMessage()]
    assert tensor_route_answers(srv.url) == answers  # not one batch over HTTP
    assert c.get_stats()["rows_read"] - rows_read == 500  # yet the buffer served them
    assert [tuple(x.shape) for x in plain] == [(100, 768)] * 3
    for b in origin:
        assert isinstance(b, ProvenanceBatch)
        assert torch.equal(row_ids(b.activations), b.doc_ids)  # each row with its own origin
        assert torch.equal(b.positions, (b.doc_ids % CONTEXT_ROWS).to(torch.int32))


def test_killed_worker_and_restarted_server_never_reissue_an_id(start_server, tmp_path):
    """Serve-once across restarts: a generator worker killed (SIGKILL) and restarted by LitServe, then the
    whole server restarted with the same state dir: every id served is new."""
    import signal
    import time

    args = ["+preset=test", "generator.source=synthetic", "buffer.size=512", "buffer.min_fill=1.0",
            f"generator.state_dir={tmp_path}", "generator.statistics=true"]
    ids = []
    for run in range(2):
        srv = start_server(*args, base=[])
        c = ActivationClient(srv.url, retry_for_s=120)
        assert c.wait_for_data(512, timeout=120)
        if run == 1:  # the statistics were saved with the state: they count run 0's last worker's rows too
            deadline = time.time() + 30  # (published every 2 s: the rows of this run may not be in yet)
            while c.get_statistics()["count"] < 512 + 512 and time.time() < deadline:
                time.sleep(0.2)
            assert c.get_statistics()["count"] >= 512 + 512
        x, _ = c.get_activations_tensor(512)
        ids.append(row_ids(x).tolist())
        if run == 0:  # kill the generator worker mid-stream; LitServe starts it again, it resumes
            pid = c.get_stats()["generators"][0]["pid"]
            os.kill(pid, signal.SIGKILL)
            deadline = time.time() + 120
            while time.time() < deadline:
                g = c.get_stats()["generators"][0]
                if g["pid"] != pid and g["state"] == "running":
                    break
                time.sleep(0.5)
            assert c.wait_for_data(512, timeout=120)
            x, _ = c.get_activations_tensor(512)
            ids.append(row_ids(x).tolist())
            # the restarted worker refills; its statistics (published every 2 s) are saved when it stops.
            # (Statistics of the killed worker's last seconds are lost by design: saved every few seconds.)
            assert c.wait_for_data(512, timeout=120)
            deadline = time.time() + 60
            while c.get_statistics()["count"] < 512 and time.time() < deadline:
                time.sleep(0.2)
        srv.stop()
    every = sum(ids, [])
    assert len(every) == len(set(every)) == 3 * 512, "no id was served twice across a kill and a restart"


MODEL = ["+preset=test", "server.generators_per_device=2", "generator.provenance=true", "generator.layers=[0]",
         "generator.batch_size=2", "generator.context_length=32", "buffer.size=200", "buffer.min_fill=0.5",
         "dataset.seed=7"]


def share_stream(tok, g, G, seed):
    """Generator g's token stream, tokenised here: its documents in order, each followed by EOS."""
    stream = []
    for text in documents(DatasetConfig(name="embedded", seed=seed), 0, g, G):
        stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(stream) > 200_000:
            break
    return stream


def test_model_provenance_matches_an_independent_tokenisation_and_resumes(start_server, tmp_path):
    """Two real generator workers on the CPU with the embedded model: every sampled row's token id is the
    token at its position in its context, where context c of generator g is BOS + tokens
    c*(T-1) .. (c+1)*(T-1)-1 of g's share of the corpus. After a full server restart with the same state
    dir, the generators continue: later contexts of the same streams, never an earlier one."""
    from transformers import AutoTokenizer

    from actdata.generation.embedded import model_dir

    tok = AutoTokenizer.from_pretrained(model_dir())
    T = 32
    streams = {g: share_stream(tok, g, 2, 7) for g in range(2)}
    assert not set(map(tuple, np.array_split(streams[0][:3000], 100))) & set(
        map(tuple, np.array_split(streams[1][:3000], 100))), "the two shares are different text"
    rng = np.random.default_rng(0)

    def check(batch):
        ctx = {}
        for i in rng.choice(len(batch.doc_ids), size=25, replace=False):
            doc, pos, token = int(batch.doc_ids[i]), int(batch.positions[i]), int(batch.token_ids[i])
            g, counter = doc >> 40, doc & ((1 << 40) - 1)
            assert 1 <= pos < T, "BOS rows are dropped"
            assert token == streams[g][counter * (T - 1) + pos - 1], (g, counter, pos)
            ctx.setdefault(g, []).append(counter)
        return ctx

    counters = []
    for run in range(2):
        srv = start_server(*MODEL, f"generator.state_dir={tmp_path}", base=[], timeout=300)
        c = ActivationClient(srv.url, retry_for_s=240)
        assert c.wait_for_data(100, timeout=240)
        seen = {}
        for _ in range(200):  # until rows of both generators were served (the second may load later)
            for g, cs in check(c.get_activations_tensor(50, provenance=True)).items():
                seen.setdefault(g, []).extend(cs)
            if len(seen) == 2:
                break
        assert set(seen) == {0, 1}, "both generators' rows are served"
        counters.append(seen)
        srv.stop()
        if run == 0:
            saved = {g: json.load(open(tmp_path / f"gen-{g}-of-2.json"))["next_context"] for g in range(2)}
    for g in range(2):
        assert min(counters[1][g]) >= saved[g] > max(counters[0][g]), \
            f"generator {g} resumed after its saved position ({saved[g]}), not from the start"
