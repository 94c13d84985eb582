"""The model source's CUDA pipeline on a real GPU (skipped without one): side-stream copies into pinned
staging, blocking events, the staging pool and the stop path, against the same rows made on the CPU.

A tiny Llama and its tokenizer are built here (test_capture.build) and the corpus is a list of texts
handed to TokenBlocks, so the test needs neither the embedded model nor `datasets`.
"""
import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from test_capture import TEXT, build, make_cfg

import actdata.generation.model_source as model_source
from actdata.generation.model_source import ModelSource
from actdata.generation.text import TokenBlocks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def texts(d, epoch, g=0, G=1):
    for i, t in enumerate(TEXT):
        if i % G == g:
            yield f"{t} Number {i}, pass {epoch}."


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(autouse=True)
def listed_corpus(monkeypatch):
    monkeypatch.setattr(model_source, "TokenBlocks", functools.partial(TokenBlocks, docs=texts))
    monkeypatch.setattr(model_source, "check_corpus", lambda *a: None)


def rows_of(cfg, device, n=None, threaded=None):
    src = ModelSource(cfg, device, 0, loop=n is not None, threaded=threaded)
    items = iter(src)
    out = []
    for rows, origin, info in items:
        out.append((rows.clone(), origin.copy(), info, rows.is_pinned()))
        if n is not None and len(out) == n:
            break
    items.close()
    return src, out


@pytest.mark.parametrize("filtered", [False, True], ids=["every-row", "outliers-dropped"])
def test_cuda_threaded_rows_equal_cpu_inline_rows(llama, filtered):
    cfg = make_cfg(llama, "listed", sites=("resid_pre", "mlp_out"), layers=(0, 2),
                   outlier_factor=1.5 if filtered else None)
    _, cpu = rows_of(cfg, "cpu")
    src, gpu = rows_of(cfg, "cuda:0")
    assert src.threaded and len(gpu) == len(cpu) > 2
    for (r, o, i, pinned), (cr, co, ci, _) in zip(gpu, cpu):
        assert pinned and r.device.type == "cpu"
        assert o.tolist() == co.tolist()
        assert i["contexts"] == ci["contexts"] and i["position"] == ci["position"]
        torch.testing.assert_close(r, cr, atol=2e-2, rtol=2e-2)  # CUDA float32 matmuls run in TF32
    assert src.pipeline["pool"].qsize() == src.STAGING
    assert not any(t.is_alive() for t in src.pipeline["threads"])
    src.close()


def test_cuda_pipeline_closed_early_stops_its_threads_and_returns_staging(llama):
    cfg = make_cfg(llama, "listed")
    src, got = rows_of(cfg, "cuda:0", n=2)
    assert len(got) == 2
    assert not any(t.is_alive() for t in src.pipeline["threads"])
    assert src.pipeline["pool"].qsize() == src.STAGING
    src.close()
