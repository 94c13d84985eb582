"""The host side of a generator at a GPU's pace (issue 20), shown on the CPU where a stand-in shows it.

- filter decisions (outliers, float16 overflow) are read one batch late: the next forward is launched
  before the previous batch's mask is read, and the rows kept are the rows kept before (test_gpu_path);
- closing the pipeline waits for a forward in progress, so a restart never holds two models;
- `server.devices=auto` is resolved by counting GPUs before LitServe sees it; `accelerator=cuda` with no
  GPU is refused in one line (exit 2); `buffer.dtype=auto` in the production presets;
- pinned memory is estimated as the allocator rounds it, for all of a host's generators, in the parent;
- each generator publishes its device, GPU UUID and thread shares, and sizes its threads to its share
  of the cores; statistics are on for the synthetic source by default.
"""
import os
import subprocess
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from test_capture import make_cfg

from actdata.client import ActivationClient
from actdata.config import Config, ConfigError
from actdata.generation.model_source import ModelSource
from actdata.generation.placement import (
    buffer_dtype,
    check_pinned,
    device_identity,
    pinned_block,
    pinned_bytes,
    resolve_accelerator,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_filter_decisions_are_read_one_batch_late(llama, corpus):
    """In the threaded (CUDA) pipeline the forward of batch i+1 is launched before the mask of batch i is
    read: the device always has work queued while the host waits for a mask's copy."""
    cfg = make_cfg(llama, corpus, layers=(0,), outlier_factor=1.2)
    src = ModelSource(cfg, "cpu", 0, loop=False, threaded=True)
    events, lock = [], threading.Lock()
    capture, decide = src.capture, src._filter

    def forward(*a):
        with lock:
            events.append("forward")
        return capture(*a)

    def filter_(*a):
        with lock:
            events.append("decide")
        return decide(*a)

    src.capture, src._filter = forward, filter_
    items = [r.clone() for r, _, _ in src]
    src.capture = capture
    src.close()
    assert len(items) > 3 and events.count("forward") == events.count("decide") == len(items)
    forwards = [i for i, e in enumerate(events) if e == "forward"]
    decides = [i for i, e in enumerate(events) if e == "decide"]
    for k in range(len(decides) - 1):  # every batch's mask is read after the next batch's forward (but the last)
        assert decides[k] > forwards[k + 1], f"batch {k}'s mask was read before batch {k + 1} was launched"


def test_closing_waits_for_a_forward_in_progress(llama, corpus):
    """A forward (or a compile) longer than a second is waited for: when close() returns, no pipeline
    thread is left to hold the model while the next source loads its own."""
    cfg = make_cfg(llama, corpus, layers=(0,))
    src = ModelSource(cfg, "cpu", 0, threaded=True)
    capture, slow = src.capture, threading.Event()

    def forward(*a):
        if slow.is_set():
            time.sleep(2.5)
        return capture(*a)

    src.capture = forward
    items = iter(src)
    next(items)
    slow.set()
    time.sleep(0.3)  # the forward thread is inside a slow forward now
    t0 = time.perf_counter()
    items.close()
    assert not [t.name for t in src.pipeline["threads"] if t.is_alive()], "a pipeline thread outlived close()"
    assert time.perf_counter() - t0 >= 1.0, "close() had a forward to wait for"
    assert src.pipeline["pool"].qsize() == src.STAGING
    src.capture = capture
    src.close()


# -- devices ---------------------------------------------------------------------------------------------
def test_devices_auto_is_resolved_by_counting_gpus():
    assert resolve_accelerator("auto", "auto", gpus=0) == ("cpu", 1)
    assert resolve_accelerator("auto", "auto", gpus=4) == ("cuda", 4)
    assert resolve_accelerator("gpu", 2, gpus=4) == ("cuda", 2)
    assert resolve_accelerator("cpu", "auto", gpus=8) == ("cpu", 1)
    with pytest.raises(ConfigError, match="^server.accelerator: cuda, but no CUDA device"):
        resolve_accelerator("cuda", "auto", gpus=0)
    with pytest.raises(ConfigError, match="^server.devices: 3 asked for"):
        resolve_accelerator("cuda", 3, gpus=2)
    if not torch.cuda.is_available():
        assert resolve_accelerator("auto", "auto") == ("cpu", 1)  # counted here, through NVML
        assert device_identity("cpu") == {"device": "cpu", "gpu_uuid": None}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_accelerator_cuda_without_a_gpu_is_refused_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "actdata.serve", "+preset=test", "generator.source=synthetic",
                        "server.accelerator=cuda", "server.log_file=null", "generator.state_dir=null",
                        "buffer.prefix=acthostcuda"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("actdata: bad config: server.accelerator: cuda, but no")
    assert "Traceback" not in r.stderr


def test_buffer_dtype_auto_follows_the_model_in_the_production_presets():
    from hydra import compose, initialize_config_dir

    from actdata.config import register, to_config
    from actdata.serving.main import CONF_DIR, resolve

    register()
    for preset in ("production", "large-scale"):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = to_config(compose(config_name="config", overrides=[f"+preset={preset}"]))
        assert cfg.buffer.dtype == "auto" and cfg.model.dtype == "bfloat16"
        assert resolve(cfg).buffer.dtype == "bfloat16"
    cfg = Config()
    cfg.generator.source, cfg.buffer.dtype = "model", "auto"
    for model, want in (("float16", "float16"), ("float32", "float32"), ("bfloat16", "bfloat16")):
        cfg.model.dtype = model
        assert buffer_dtype(cfg, "cuda") == want
    cfg.model.dtype = "auto"
    assert buffer_dtype(cfg, "cuda") == "bfloat16"
    cfg.generator.source = "synthetic"
    assert buffer_dtype(cfg, "cuda") == "float32"


def test_tokens_per_forward_on_cuda_grow_within_the_memory_estimate():
    from actdata.generation.placement import TOKENS_PER_FORWARD, forward_batch, largest_batch

    cfg = Config()
    cfg.generator.batch_size, cfg.generator.context_length = 8, 128
    gb = 1 << 30
    assert forward_batch(cfg, lambda b: b * gb, free=20 * gb) == 12  # 0.6 x 20 GB at 1 GB per context
    assert forward_batch(cfg, lambda b: b * gb // 1000, free=80 * gb) == TOKENS_PER_FORWARD // 128
    assert forward_batch(cfg, lambda b: b * gb, free=gb) == 8, "never below the configured batch"
    assert largest_batch(cfg) == 256
    cfg.generator.auto_batch = False
    assert largest_batch(cfg) == 8


# -- pinned memory ---------------------------------------------------------------------------------------
def test_pinned_memory_is_estimated_as_the_allocator_rounds_it_for_every_generator():
    assert [pinned_block(n) for n in (0, 1, 4096, 4097, 3 << 20)] == [0, 1, 4096, 8192, 4 << 20]
    cfg = Config()
    cfg.generator.batch_size, cfg.generator.context_length, cfg.buffer.dtype = 8, 128, "bfloat16"
    cfg.generator.auto_batch = False  # (with it, the check counts the largest batch a GPU may grow to)
    staging = 8 * 127 * 4096 * 2  # rows a batch can keep x row bytes: not a power of two
    each = pinned_bytes(cfg, 4096)
    assert each >= 5 * pinned_block(staging) > 5 * staging
    assert check_pinned(cfg, 4096, 2) == 2 * each
    from actdata.host import mem_available

    fits_once = mem_available() // each  # this many generators fit; one more does not
    with pytest.raises(ConfigError, match=f"^generator.batch_size: {fits_once + 1} generator"):
        check_pinned(cfg, 4096, fits_once + 1)


# -- a real server ---------------------------------------------------------------------------------------
def test_generators_publish_device_threads_and_statistics_by_default(start_server):
    """Two CPU generators on this host: each sizes its threads to its share of the cores and says where it
    runs; the synthetic source keeps statistics without being asked."""
    srv = start_server("server.generators_per_device=2", "buffer.size=2048", "buffer.prefix=acthostthreads",
                       timeout=240)
    c = ActivationClient(srv.url, retry_for_s=120)
    assert c.wait_for_data(1024, timeout=120)
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    deadline = time.time() + 30
    while time.time() < deadline:
        gens = c.get_stats()["generators"]
        if len(gens) == 2 and all("threads" in g for g in gens) and c.get_statistics()["count"] > 0:
            break
        time.sleep(0.5)
    assert len(gens) == 2
    for g in gens:
        assert g["device"] == "cpu" and g["gpu_uuid"] is None
        assert g["threads"] == share and g["tokenizer_threads"] == share
    s = c.get_statistics()
    assert s["enabled"] is True and s["count"] > 0
