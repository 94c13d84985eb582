"""Batch memory of DataLoader workers (actdata.reading.batchslots): a slot is reused only when neither process holds
its batch, and batches reach the main process as plain tensors with the worker's bytes."""
import gc

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from actdata.generation.synthetic import verify_rows
from actdata.reading import batchslots as batches
from actdata.reading.batchslots import BatchPool, SlotBatch, worker_pool
from actdata.reading.dataset import RemoteActivationDataset


class Numbered(IterableDataset):
    """Batch i of worker w is filled with 1000 * w + i, in the worker's pool."""

    def __init__(self, n: int, shape=(64, 256)):
        self.n, self.shape = n, shape

    def __iter__(self):
        w = torch.utils.data.get_worker_info().id
        for i in range(self.n):
            x = worker_pool().empty(self.shape, torch.float32)
            x.fill_(1000 * w + i)
            yield x


def _values(xs):
    return sorted(int(x[0, 0]) for x in xs)


def test_batches_kept_by_the_training_loop_are_never_overwritten():
    # 40 batches per worker kept alive: far more than a pool's slots, so workers must fall back, not reuse
    dl = DataLoader(Numbered(40), batch_size=None, num_workers=2)
    kept = list(dl)
    assert all(type(x) is torch.Tensor for x in kept)  # plain tensors in the main process
    assert _values(kept) == sorted([i for i in range(40)] + [1000 + i for i in range(40)])
    for x in kept:  # each batch still holds only its own number
        assert torch.equal(x, torch.full_like(x, x[0, 0].item()))


def test_a_view_kept_pins_its_batch():
    dl = DataLoader(Numbered(30), batch_size=None, num_workers=1)
    views = [x[5:6, 10:20] for x in dl]  # the batches themselves are dropped at once, their views are not
    gc.collect()
    assert sorted(int(v[0, 0]) for v in views) == list(range(30))
    for v in views:
        assert torch.equal(v, torch.full_like(v, v[0, 0].item()))


def test_slots_are_reused_once_the_main_process_drops_batches():
    seen = set()
    n = 0
    for x in DataLoader(Numbered(50), batch_size=None, num_workers=1, prefetch_factor=2):
        assert torch.equal(x, torch.full_like(x, n))  # in order, intact
        seen.add(x.data_ptr())
        n += 1
        del x
    assert n == 50
    # 50 batches went through a handful of slots (each mapped once here), not 50 fresh segments
    assert len(seen) <= BatchPool().max_slots
    assert 1 <= len([k for k in batches._mapped]) <= BatchPool().max_slots


def test_in_process_pool_does_not_reuse_a_slot_the_worker_still_holds():
    pool = BatchPool(max_slots=2)
    a = pool.empty((8, 1024), torch.float32)
    b = pool.empty((8, 1024), torch.float32)
    assert isinstance(a, SlotBatch) and a.data_ptr() != b.data_ptr()
    view = a[2:4]
    c = pool.empty((8, 1024), torch.float32)  # both slots held: a fresh shared tensor instead
    assert not isinstance(c, SlotBatch) and c.is_shared()
    del a
    d = pool.empty((8, 1024), torch.float32)  # a's view still holds slot 0
    assert not isinstance(d, SlotBatch)
    del view, d
    e = pool.empty((4, 1024), torch.float32)  # slot 0 is free again (and a smaller batch fits it)
    assert isinstance(e, SlotBatch) and e.shape == (4, 1024)
    assert type(e * 2) is torch.Tensor  # results of operations are plain tensors
    big = pool.empty((16, 1024), torch.float32)  # fits no slot, and the pool is at max_slots
    assert not isinstance(big, SlotBatch)


@pytest.mark.parametrize("workers", [1, 2])
def test_served_rows_through_slots_stay_intact(synthetic_server, workers):
    """Over HTTP from workers, every batch kept by the loop holds the exact rows served (synthetic rows
    check themselves) and no row twice (serve-once): no slot was refilled under a kept batch."""
    ds = RemoteActivationDataset(synthetic_server.url, batch_size=256, max_batches=24, local=False)
    kept = list(DataLoader(ds, batch_size=None, num_workers=workers))
    assert len(kept) == 24 and all(type(x) is torch.Tensor and x.shape == (256, 768) for x in kept)
    ids, ok = verify_rows(torch.cat(kept))
    assert ok.all()
    assert len(torch.unique(ids)) == len(ids)
