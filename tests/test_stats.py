"""Running statistics: batch reductions in float32 where the rows are, merged in float64, equal a float64
reference; the statistics thread beside the writer; on by default for every source."""
import threading

import numpy as np
import pytest
import torch

from actdata.config import Config
from actdata.generation.progress import statistics_enabled
from actdata.generation.statistics import StatsWorker
from actdata.stats import RunningStats, merged, reduce_rows


@pytest.mark.parametrize("shape", [(16,), (2, 3, 8)])
def test_running_stats_match_direct_computation_in_any_batching(shape):
    g = torch.Generator().manual_seed(0)
    rows = torch.randn((1000, *shape), generator=g) * 3 + 1
    a, b = RunningStats(shape), RunningStats(shape)
    for part in rows.split(137):  # ragged batches
        a.update(part)
    for part in rows[:600].split(50):  # two "generators", merged
        b.update(part)
    c = RunningStats(shape)
    c.update(rows[600:].to(torch.float16).to(torch.float32))
    c_direct = rows[600:].to(torch.float16).to(torch.float64)
    b.merge(c)
    x = rows.to(torch.float64).reshape(1000, -1, shape[-1])
    assert a.count == 1000
    np.testing.assert_allclose(a.mean, x.mean(0).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(a.var, x.var(0, unbiased=False).numpy(), rtol=1e-6)
    np.testing.assert_allclose(a.mean_sq_norm, (x * x).sum(-1).mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(a.mean_norm, x.norm(dim=-1).mean(0).numpy(), rtol=1e-6)
    y = torch.cat([rows[:600].to(torch.float64), c_direct]).reshape(1000, -1, shape[-1])
    np.testing.assert_allclose(b.mean, y.mean(0).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(b.var, y.var(0, unbiased=False).numpy(), rtol=1e-6)
    # the normalising factor makes the scaled rows' mean squared norm equal the width
    f = a.scaling_factor()
    scaled = x * torch.from_numpy(f)[None, :, None]
    np.testing.assert_allclose((scaled * scaled).sum(-1).mean(0).numpy(), shape[-1], rtol=1e-6)


def test_state_dict_round_trip_and_merge_of_many():
    s = RunningStats((4,))
    s.update(torch.arange(40, dtype=torch.float32).reshape(10, 4))
    t = RunningStats.from_state_dict(s.state_dict())
    assert t.count == 10 and np.array_equal(t.mean, s.mean) and np.array_equal(t.m2, s.m2)
    m = merged([s, t])
    assert m.count == 20 and np.allclose(m.mean, s.mean) and np.allclose(m.var, s.var)
    assert merged([]) is None
    with pytest.raises(ValueError, match="cannot merge"):
        s.merge(RunningStats((5,)))
    assert RunningStats((3,)).summary()["count"] == 0


def float64_reference(rows: torch.Tensor, points: int, width: int) -> dict:
    x = rows.to(torch.float64).reshape(len(rows), points, width)
    n = x.norm(dim=-1)
    return {"mean": x.mean(0).numpy(), "var": x.var(0, unbiased=False).numpy(),
            "mean_sq_norm": (n * n).mean(0).numpy(), "mean_norm": n.mean(0).numpy()}


def assert_matches(s: RunningStats, ref: dict, rtol: float) -> None:
    scale = np.abs(ref["mean"]).max()
    np.testing.assert_allclose(s.mean, ref["mean"], rtol=0, atol=rtol * scale)
    np.testing.assert_allclose(s.var, ref["var"], rtol=rtol)
    np.testing.assert_allclose(s.mean_sq_norm, ref["mean_sq_norm"], rtol=rtol)
    np.testing.assert_allclose(s.mean_norm, ref["mean_norm"], rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_float32_chunk_reductions_equal_a_float64_reference(dtype):
    """bf16/fp16/fp32 rows far from zero (a mean 40x their spread: float32 sums of raw squares would lose
    every digit of the variance), in ragged batches across chunk boundaries: within 1e-5 of float64
    (float32 sums of 256 squares, added up in float64)."""
    g = torch.Generator().manual_seed(1)
    rows = (torch.randn((3000, 2, 3, 96), generator=g) + 40 + torch.arange(96) / 10).to(dtype)
    s = RunningStats((2, 3, 96))
    for part in rows.split(777):
        s.update(part)
    assert s.count == 3000
    assert_matches(s, float64_reference(rows, 6, 96), rtol=1e-5)
    m = reduce_rows(rows[:5], 6, 96)  # a batch is a handful of small sums, never a float64 copy of its rows
    assert m.s1.shape == m.s2.shape == m.shift.shape == (6, 96) and m.s1.dtype == torch.float64
    assert m.norm_sum.shape == (6,)


def test_the_statistics_thread_reduces_beside_the_writer_and_merges_device_sums():
    g = torch.Generator().manual_seed(2)
    rows = torch.randn((4000, 128), generator=g).to(torch.bfloat16) * 5 - 3
    published = []
    s = RunningStats((128,))
    w = StatsWorker(s, lambda st, force: published.append(st.count), every_s=0.0)
    seen = set()
    for i, part in enumerate(rows.split(500)):
        if i % 2:  # the CUDA path: the source reduced the batch on its device; only its sums are handed in
            w.add(reduce_rows(part, 1, 128))
        else:
            buf = part.clone()  # a staging buffer the source reuses once the writer asks for the next batch
            w.reduce(buf)
            seen.add(threading.get_ident())
            w.settle()
            buf.fill_(float("nan"))  # overwritten after settle(): must not reach the statistics
    w.settle()
    w.publish(force=True)
    w.close()
    assert s.count == 4000 and published and published[-1] == 4000
    assert_matches(s, float64_reference(rows, 1, 128), rtol=1e-6)


def test_statistics_are_on_by_default_for_every_source():
    for source in ("model", "synthetic", "store"):
        cfg = Config()
        cfg.generator.source = source
        assert statistics_enabled(cfg), source
        cfg.generator.statistics = False
        assert not statistics_enabled(cfg)


def test_the_statistics_thread_runs_on_one_core_and_leaves_other_threads_their_share():
    """Its ops must not start a team of every core beside the writer's copies; threads started after it
    (a pipeline's) still get the share of the thread that started it, whatever default another thread left."""
    before = torch.get_num_threads()
    stray = threading.Thread(target=torch.set_num_threads, args=(1,))  # e.g. an earlier helper's setting
    stray.start()
    stray.join()
    seen = {}
    s = RunningStats((64,))
    w = StatsWorker(s, lambda st, force: seen.setdefault("stats", torch.get_num_threads()), every_s=0.0)
    w.reduce(torch.randn(300, 64))
    w.settle()
    later = threading.Thread(target=lambda: seen.setdefault("later", torch.get_num_threads()))
    later.start()
    later.join()
    w.close()
    assert seen["stats"] == 1
    assert seen["later"] == before and torch.get_num_threads() == before
