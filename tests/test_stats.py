import numpy as np
import pytest
import torch

from actdata.stats import RunningStats, merged


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
    np.testing.assert_allclose(a.mean, x.mean(0).numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a.var, x.var(0, unbiased=False).numpy(), rtol=1e-10)
    np.testing.assert_allclose(a.mean_sq_norm, (x * x).sum(-1).mean(0).numpy(), rtol=1e-10)
    np.testing.assert_allclose(a.mean_norm, x.norm(dim=-1).mean(0).numpy(), rtol=1e-10)
    y = torch.cat([rows[:600].to(torch.float64), c_direct]).reshape(1000, -1, shape[-1])
    np.testing.assert_allclose(b.mean, y.mean(0).numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b.var, y.var(0, unbiased=False).numpy(), rtol=1e-9)
    # the normalising factor makes the scaled rows' mean squared norm equal the width
    f = a.scaling_factor()
    scaled = x * torch.from_numpy(f)[None, :, None]
    np.testing.assert_allclose((scaled * scaled).sum(-1).mean(0).numpy(), shape[-1], rtol=1e-9)


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
