"""The GPU path's design, proven on the CPU where a stand-in shows it (issue 10).

- the threaded (CUDA) pipeline forced on the CPU: a full buffer plus a stop ends it with no thread left
  and every staging buffer back in its pool;
- a restart frees the old source before the new one is built; a CUDA error that poisons the context
  ends the worker process (a real process) with POISONED_EXIT;
- outlier and float16-overflow filtering on the rows' device: only kept rows come out, the same rows a
  host-side filter keeps; overflow rows are counted (status, /metrics);
- blocks after the last captured one are not loaded, and the rows stay exactly the full model's;
- config checks: context_length beyond the model's positions, model.dtype=auto, model.device by hand
  with several devices, a config whose staging buffers cannot fit in memory;
- buffer pages populated ahead of the writer.
The GPU itself is exercised by scripts/gpu_check.sh.
"""
import os
import subprocess
import sys
import threading
import time
import weakref

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch
from test_capture import build, make_cfg, reference

from actdata.config import Config, ConfigError, validate
from actdata.generation import loop as gen
from actdata.generation.loading import load_model
from actdata.generation.model_source import ModelSource
from actdata.generation.placement import cpu_auto_dtype, poisons_context, resolve_dtype
from actdata.generation.sites import OutlierFilter, sample_shape
from actdata.generation.status import read_statuses
from actdata.shm import SharedActivationBuffer
from actdata.shm.pages import populate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg_for(model, corpus, **gen_kw):
    cfg = make_cfg(model, corpus, **gen_kw)
    cfg.model.dtype = "float32"
    return cfg


# -- 1: no hang, staging back in the pool ------------------------------------------------------------------
@pytest.mark.parametrize("staging", [3, 5], ids=["blocked-on-the-pool", "blocked-on-the-queue"])
def test_threaded_pipeline_stops_on_a_full_buffer_with_no_thread_left(llama, corpus, staging):
    """3 staging buffers: the forward thread ends up waiting for one (consumer, finished item and copy in
    flight hold them all); 5 (the default): it ends up waiting for room in the finished queue."""
    cfg = cfg_for(llama, corpus)
    src = ModelSource(cfg, "cpu", 0, threaded=True)
    src.STAGING = staging
    buf = SharedActivationBuffer.create(40, src.plan.shape, "float32")
    stop, ended = threading.Event(), threading.Event()

    def consumer():  # what run_supervised does: write every item, waiting while the buffer is full
        items = iter(src)
        try:
            for rows, origin, _ in items:
                buf.write(rows, origin, stop)
                if stop.is_set():
                    break
        finally:
            items.close()
            ended.set()

    t = threading.Thread(target=consumer, daemon=True)
    t.start()
    try:
        deadline = time.time() + 60
        # saturated: buffer full, every staging buffer held (consumer, finished queue, copy in flight)
        while time.time() < deadline and not (buf.stats()["free"] == 0 and src.pipeline
                                               and src.pipeline["pool"].qsize() == 0):
            time.sleep(0.02)
        assert buf.stats()["free"] == 0 and src.pipeline["pool"].qsize() == 0, "pipeline never saturated"
        threads = src.pipeline["threads"]
        assert all(th.is_alive() for th in threads)
        t0 = time.perf_counter()
        stop.set()
        t.join(10)
        took = time.perf_counter() - t0
        assert ended.is_set() and not t.is_alive()
        # close() joins the pipeline threads within JOIN_S (1 s) in all; none is left
        assert [th.name for th in threads if th.is_alive()] == [], f"threads left after {took:.2f} s"
        assert src.pipeline["pool"].qsize() == src.STAGING  # every staging buffer is back
    finally:
        stop.set()
        buf.close()
        src.close()


def test_threaded_pipeline_on_the_cpu_yields_the_inline_rows(llama, corpus):
    cfg = cfg_for(llama, corpus, layers=(0,), outlier_factor=1.2)
    got = {}
    for threaded in (False, True):
        src = ModelSource(cfg, "cpu", 0, loop=False, threaded=threaded)
        items = list((r.clone(), o, i) for r, o, i in src)
        got[threaded] = items
        if threaded:
            assert src.pipeline["pool"].qsize() == src.STAGING
        src.close()
    assert len(got[True]) == len(got[False]) > 2
    for (ra, oa, _), (rb, ob, _) in zip(got[False], got[True]):
        torch.testing.assert_close(ra, rb)
        assert oa.tolist() == ob.tolist()


# -- 2: restarts ------------------------------------------------------------------------------------------
class _Failing:
    """A source holding a large tensor (the 'model') that yields one batch, then fails."""

    made: list = []

    def __init__(self, shape, message):
        self.weights = torch.zeros(1 << 20)
        self.shape, self.message = shape, message
        previous = [r() for r in _Failing.made]
        self.alive_at_build = sum(p is not None for p in previous)
        _Failing.made.append(weakref.ref(self))

    def __iter__(self):
        yield torch.ones(4, *self.shape), np.arange(4, dtype=np.int64), {"contexts": 1, "tokens": 4}
        raise RuntimeError(self.message)

    def close(self):
        self.weights = None


def test_restart_frees_the_old_source_before_building_the_new_one(monkeypatch):
    buf = SharedActivationBuffer.create(400, (16,), "float32")
    spec = buf.spec
    _Failing.made = []
    built = []

    def make(cfg, spec_, device, index, *resume):
        s = _Failing((16,), "boom")
        built.append(s.alive_at_build)
        return s

    monkeypatch.setattr(gen, "make_source", make)
    stop = threading.Event()
    cfg = Config()
    cfg.generator.state_dir = None  # no saved position: this test is about freeing sources
    t = threading.Thread(target=gen.run_supervised, args=(cfg, spec, "cpu", 0, stop),
                         kwargs={"max_backoff_s": 0.01}, daemon=True)
    t.start()
    try:
        deadline = time.time() + 30
        while len(built) < 3 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        t.join(10)
        buf.close()
    assert len(built) >= 3
    assert built[1:] == [0] * (len(built) - 1), "a new source was built while the old one was still alive"


POISON_SCRIPT = r"""
import sys, threading
import numpy as np, torch
from actdata.generation import loop as gen
from actdata.shm import BufferSpec
from actdata.config import Config

class Poisoned:
    def __iter__(self):
        yield torch.ones(2, 16), np.arange(2, dtype=np.int64), {"contexts": 1, "tokens": 2}
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered") \
            if hasattr(torch, "AcceleratorError") \
            else RuntimeError("CUDA error: an illegal memory access was encountered")

gen.make_source = lambda *a: Poisoned()
spec = BufferSpec(sys.argv[1], 100, (16,), "float32")
cfg = Config()
cfg.generator.state_dir = None
gen.run_supervised(cfg, spec, "cpu", 0, threading.Event())
print("returned instead of exiting")
"""


def test_a_poisoned_cuda_context_ends_the_worker_process():
    buf = SharedActivationBuffer.create(100, (16,), "float32")
    try:
        r = subprocess.run([sys.executable, "-c", POISON_SCRIPT, buf.spec.path], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
        assert r.returncode == gen.POISONED_EXIT, r.stdout + r.stderr
        assert "returned instead" not in r.stdout
        st = read_statuses(buf.spec)[0]
        assert st["state"] == "dead" and "illegal memory access" in st["last_error"]
        assert buf.stats()["rows_written"] == 2
    finally:
        buf.close()


def test_poisoned_context_errors_are_told_apart():
    assert poisons_context(RuntimeError("CUDA error: device-side assert triggered"))
    assert poisons_context(RuntimeError("CUDA error: an illegal memory access was encountered"))
    try:
        try:
            raise RuntimeError("CUDA error: unspecified launch failure")
        except RuntimeError as e:
            raise ValueError("while writing") from e
    except ValueError as e:
        assert poisons_context(e)
    assert not poisons_context(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not poisons_context(ValueError("illegal value for generator.layers"))


# -- 3 / 9: filtering on the device ------------------------------------------------------------------------
def test_outlier_filter_keeps_exactly_what_a_host_filter_keeps(llama, corpus):
    plain = ModelSource(cfg_for(llama, corpus, layers=(0,)), "cpu", 0, loop=False)
    filtered = ModelSource(cfg_for(llama, corpus, layers=(0,), outlier_factor=1.05), "cpu", 0, loop=False,
                           threaded=True)
    host = OutlierFilter(1.05)
    dropped = 0
    for (ra, oa, _), (rb, ob, _) in zip(plain, filtered):
        keep = host(ra.reshape(len(ra), 1, 1, -1)).numpy()
        dropped += int((~keep).sum())
        torch.testing.assert_close(rb, ra[torch.from_numpy(keep)])
        assert ob.tolist() == oa[keep].tolist()
    assert dropped > 0, "the factor dropped nothing: the test shows nothing"
    plain.close()
    filtered.close()


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory):
    """The tiny Llama with the embeddings of half the vocabulary scaled past float16's range."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("overflow")
    build("llama", path)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[::2] = emb[::2] / emb[::2].abs().amax(dim=1, keepdim=True) * 1e6
    model.save_pretrained(path)
    return str(path)


def test_float16_overflow_rows_are_dropped_and_counted(overflowing, corpus):
    cfg = cfg_for(overflowing, corpus, sites=("resid_pre",), layers=(0,))
    cfg.buffer.dtype = "float16"
    src = ModelSource(cfg, "cpu", 0, loop=False)
    kept = overflowed = 0
    for rows, origin, info in src:
        assert rows.dtype == torch.float16 and torch.isfinite(rows).all()
        assert len(origin) == len(rows)
        kept, overflowed = kept + len(rows), overflowed + info["rows_overflowed"]
    assert overflowed > 0 and kept > 0
    src.close()


def test_overflow_count_reaches_status_and_metrics(overflowing, corpus, tmp_path):
    from actdata.serving.metrics import ServingMetrics, render

    cfg = cfg_for(overflowing, corpus, sites=("resid_pre",), layers=(0,))
    cfg.buffer.dtype = "float16"
    buf = SharedActivationBuffer.create(60, sample_shape(cfg), "float16")
    stop = threading.Event()
    t = threading.Thread(target=gen.run_supervised, args=(cfg, buf.spec, "cpu", 0, stop), daemon=True)
    t.start()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not any(s.get("rows_overflowed") for s in read_statuses(buf.spec)):
            time.sleep(0.05)
        st = read_statuses(buf.spec)[0]
        assert st["rows_overflowed"] > 0
        metrics = ServingMetrics(str(tmp_path / "m"), create=True)
        text = render(buf, metrics).decode()
        line = next(l for l in text.splitlines() if l.startswith("actdata_generator_rows_overflowed_total{"))
        assert float(line.rsplit(" ", 1)[1]) > 0
    finally:
        stop.set()
        t.join(30)
        buf.close()


# -- 8: blocks after the last captured one are not loaded ---------------------------------------------------
def test_blocks_after_the_last_site_are_not_loaded_and_rows_are_unchanged(llama, corpus):
    for layer in (0, 1):
        cfg = cfg_for(llama, corpus, sites=("resid_post", "mlp_out"), layers=(layer,), drop_bos=False,
                      drop_special=False)
        src = ModelSource(cfg, "cpu", 0, loop=False)
        assert len(src.model.layers) == layer + 1
        ids = torch.randint(3, 200, (2, 16))
        rows = src.capture(ids, None, torch.arange(32))
        ref, _, _ = reference("llama", llama, ids)
        torch.testing.assert_close(rows[:, 0, 0], ref["resid_post"][layer].reshape(32, -1))
        torch.testing.assert_close(rows[:, 1, 0], ref["mlp_out"][layer].reshape(32, -1))
        src.close()
    # a site outside the blocks (the final norm) needs them all
    cfg = cfg_for(llama, corpus, sites=("norm:output",), layers=(0,))
    src = ModelSource(cfg, "cpu", 0, loop=False)
    assert len(src.model.layers) == 3
    src.close()
    assert len(load_model(cfg, "cpu", n_blocks=2).layers) == 2


def test_staging_is_sized_to_the_rows_a_batch_can_keep(llama, corpus):
    cfg = cfg_for(llama, corpus)
    src = ModelSource(cfg, "cpu", 0, threaded=True)
    assert src._staging().shape[0] == 2 * 15  # batch 2 x (16 positions - BOS)
    from actdata.generation.placement import pinned_block, pinned_bytes

    # staging rounded up as the pinned allocator rounds it, plus the token batches and statistics sums
    assert src.memory.pinned == pinned_bytes(cfg, 64) >= src.STAGING * pinned_block(2 * 15 * 64 * 4)
    src.close()


# -- 5 / 6 / 8 / 9: config checks ------------------------------------------------------------------------
def test_context_longer_than_the_model_positions_is_a_config_error(llama, corpus):
    with pytest.raises(ConfigError, match=r"^generator\.context_length: 65 exceeds the model's maximum of 64"):
        sample_shape(cfg_for(llama, corpus, context_length=65))
    with pytest.raises(ConfigError, match=r"^generator\.context_length"):
        ModelSource(cfg_for(llama, corpus, context_length=65), "cpu")


def test_model_dtype_auto_and_device_by_hand():
    assert Config().model.dtype == "auto"
    assert resolve_dtype("auto", "cuda:1") == "bfloat16"
    assert resolve_dtype("auto", "cpu") == cpu_auto_dtype() in ("bfloat16", "float32")
    assert resolve_dtype("float32", "cuda:0") == "float32"
    cfg = Config()
    validate(cfg)
    cfg.model.device = "cuda:1"
    with pytest.raises(ConfigError, match=r"^model\.device: set by hand .* server\.devices=1"):
        validate(cfg)
    cfg.server.devices = 2
    with pytest.raises(ConfigError, match=r"^model\.device"):
        validate(cfg)
    cfg.server.devices = 1
    validate(cfg)
    cfg.server.devices, cfg.server.accelerator = "auto", "cpu"
    validate(cfg)


def test_a_config_whose_staging_cannot_fit_is_refused_with_numbers(llama, corpus):
    cfg = cfg_for(llama, corpus, batch_size=10 ** 8)
    with pytest.raises(ConfigError, match=r"^generator\.batch_size: the staging buffers need [\d.]+ TB of pinned "
                                          r"host memory but only [\d.]+ [GMT]B is available"):
        ModelSource(cfg, "cpu", threaded=True)


# -- 4: pages populated ahead of the writer ------------------------------------------------------------------
def _rss_shmem() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    return 0


def test_populate_maps_every_row_page_ahead_of_the_writer():
    buf = SharedActivationBuffer.create(16384, (1024,), "float32")  # 64 MB in /dev/shm
    try:
        before = _rss_shmem()
        done = populate(buf)
        assert done >= 64 << 20
        assert _rss_shmem() - before >= 60 << 20  # resident and mapped in this process, before any write
        buf.write(torch.ones(8, 1024))
        assert buf.stats()["ready"] == 8
        buf.populate_in_background(threads=2)
        ts = buf._populating.threads
        buf.close()  # stops and joins the populating threads before unmapping
        assert not any(t.is_alive() for t in ts)
    finally:
        if buf.data is not None:
            buf.close()
