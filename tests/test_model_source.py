"""The embedded SmolLM2 on the embedded corpus: real rows, and the generator loop into a real buffer."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import threading
import time

import numpy as np
import pytest
import torch

from actdata.config import Config, ConfigError
from actdata.generation.loop import run_supervised
from actdata.generation.model_source import ModelSource
from actdata.generation.sites import sample_shape
from actdata.generation.status import read_statuses
from actdata.shm import BufferSpec, SharedActivationBuffer


def embedded_cfg(**gen) -> Config:
    cfg = Config()
    cfg.generator.source = "model"
    cfg.generator.batch_size, cfg.generator.context_length = 2, 32
    cfg.generator.state_dir = None  # no saved position from other runs
    for k, v in gen.items():
        setattr(cfg.generator, k, v)
    return cfg


def assert_real(rows: torch.Tensor) -> None:
    assert torch.isfinite(rows).all()
    assert rows.float().std() > 0.1, "rows are constant"
    assert (rows.float().std(dim=0) > 0).float().mean() > 0.9, "rows do not vary across tokens"


def test_embedded_shapes_from_config_alone():
    assert sample_shape(embedded_cfg(layers=[6])) == (576,)
    assert sample_shape(embedded_cfg(sites=["mlp_in", "mlp_out"], layers="all")) == (2, 30, 576)
    with pytest.raises(ConfigError, match=r"^generator\.layers: block 30 does not exist"):
        sample_shape(embedded_cfg(layers=[30]))


def test_embedded_model_yields_real_rows():
    src = ModelSource(embedded_cfg(sites=["resid_pre", "resid_post"], layers=[2, 5]), "cpu", index=1)
    it = iter(src)
    rows, origin, info = next(it)
    it.close()
    assert rows.shape[1:] == (2, 2, 576) and rows.dtype == torch.float32
    assert 0 < len(rows) <= 2 * 31 and len(origin) == len(rows) and origin.dtype == np.int64
    assert set(origin.tolist()) <= {(1 << 40) | 0, (1 << 40) | 1}
    assert info["contexts"] == 2 and info["tokens"] == 64
    assert_real(rows)


def test_run_supervised_fills_a_shared_buffer_with_real_rows():
    cfg = embedded_cfg(layers=[3])
    shape = sample_shape(cfg)
    buf = SharedActivationBuffer.create(200, shape, "float16", min_fill=0.5)
    cfg.buffer.dtype = "float16"
    spec = BufferSpec(buf.spec.path, buf.spec.capacity, buf.spec.sample_shape, buf.spec.dtype, 0.5, 1)
    stop = threading.Event()
    t = threading.Thread(target=run_supervised, args=(cfg, spec, "cpu", 0, stop), daemon=True)
    t.start()
    try:
        deadline = time.time() + 60
        while buf.stats()["ready"] < 150 and time.time() < deadline and t.is_alive():
            time.sleep(0.1)
        stats = buf.stats()
        assert stats["ready"] >= 150, (stats, read_statuses(spec))
        _, rows = buf.read(100)
        assert rows.shape == (100, 576) and rows.dtype == torch.float16
        assert_real(rows)
        st = read_statuses(spec)[0]
        assert st["state"] == "running" and st["last_error"] is None
        assert buf.stats()["contexts_seen"] >= 3
    finally:
        stop.set()
        t.join(timeout=30)
        buf.close()  # the owner removes the buffer and its status files
    assert not t.is_alive()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rows_match_cpu_rows():
    cfg = embedded_cfg(layers=[4])
    cpu_rows, cpu_origin, _ = next(iter(ModelSource(cfg, "cpu", 0)))
    items = iter(ModelSource(cfg, "cuda:0", 0))
    rows, origin, _ = next(items)
    rows = rows.clone()  # staging memory is reused once the next item is asked for
    items.close()
    assert rows.device.type == "cpu" and rows.is_pinned()
    assert origin.tolist() == cpu_origin.tolist()
    torch.testing.assert_close(rows, cpu_rows, atol=1e-2, rtol=1e-2)
