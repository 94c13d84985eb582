"""RemoteActivationDataset through real DataLoaders, and the Lightning DataModule, on loopback servers."""
import gc
import os
import signal
import socket
import threading
import time

import pytest
import torch
from conftest import SYNTHETIC
from torch.utils.data import DataLoader

from actdata import ActivationDataModule
from actdata.generation.synthetic import verify_rows
from actdata.reading.client import ActivationClient, ActivationServerError, ServerUnavailable
from actdata.reading.dataset import RemoteActivationDataset, make_loader
from actdata.reading.sharding import split_evenly
from actdata.serving.process import ServerProcess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*overrides) -> ServerProcess:
    srv = ServerProcess([*SYNTHETIC, *overrides])
    assert ActivationClient(srv.url).wait_for_data(1, timeout=60)
    return srv


@pytest.fixture(scope="module")
def servers():
    """Two servers of the same row shape (4,000 x 768 float32), so that a list of both is one stream."""
    a = start("buffer.size=4000", "buffer.min_fill=0.25")
    b = start("buffer.size=4000", "buffer.min_fill=0.25")
    yield a, b
    a.stop()
    b.stop()


def rows_read(url) -> int:
    return ActivationClient(url).get_stats()["rows_read"]


def test_split_evenly():
    assert [split_evenly(10, 4, i) for i in range(4)] == [3, 3, 2, 2]
    assert sum(split_evenly(1001, 7, i) for i in range(7)) == 1001
    assert split_evenly(None, 3, 0) is None and split_evenly(2, 4, 3) == 0


def test_dataset_pickles_without_connections(servers):
    import pickle

    ds = RemoteActivationDataset(servers[0].url, batch_size=16)
    next(iter(ds))  # a used dataset still pickles: readers live in the iterator, not the dataset
    assert pickle.loads(pickle.dumps(ds)).urls == [servers[0].url]


def test_four_workers_serve_once_whole_rows(servers):
    a, _ = servers
    ds = RemoteActivationDataset(a.url, batch_size=200, max_batches=60)
    loader = DataLoader(ds, batch_size=None, num_workers=4, pin_memory=True, persistent_workers=True)
    batches = list(loader)
    assert len(batches) == 60 and all(x.shape == (200, 768) and x.dtype == torch.float32 for x in batches)
    x = torch.cat(batches)
    ids, ok = verify_rows(x)
    assert ok.all()  # only whole rows
    assert len(set(ids.tolist())) == len(ids) == 12_000  # no row id twice
    again = list(loader)  # persistent workers: a second epoch of the same size
    assert len(again) == 60 and verify_rows(torch.cat(again))[1].all()


def test_max_samples_is_a_total_over_workers(servers):
    ds = RemoteActivationDataset(servers[0].url, batch_size=256, max_samples=1000)
    batches = list(make_loader(ds, num_workers=3, persistent_workers=False))
    assert sum(len(x) for x in batches) == 1000 and max(len(x) for x in batches) <= 256
    assert sum(len(x) for x in RemoteActivationDataset(servers[0].url, batch_size=300, max_samples=700)) == 700


def test_dtype_conversion_on_the_client(servers):
    ds = RemoteActivationDataset(servers[0].url, batch_size=64, max_batches=4, dtype=torch.float16)
    for workers in (0, 2):
        xs = list(make_loader(ds, num_workers=workers, persistent_workers=False))
        assert len(xs) == 4 and all(x.dtype == torch.float16 and x.shape == (64, 768) for x in xs)
        assert verify_rows(torch.cat(xs))[1].all()  # float16 rows are the float32 rows rounded


def test_a_list_of_two_servers_is_read_from_both(servers):
    a, b = servers
    before = rows_read(a.url), rows_read(b.url)
    for workers in (0, 2):  # one process alternates; two workers take one URL each
        ds = RemoteActivationDataset([a.url, b.url], batch_size=100, max_batches=10)
        xs = list(make_loader(ds, num_workers=workers, persistent_workers=False))
        assert len(xs) == 10 and verify_rows(torch.cat(xs))[1].all()
        after = rows_read(a.url), rows_read(b.url)
        assert after[0] - before[0] >= 500 and after[1] - before[1] >= 500, (before, after)
        before = after


def test_ranks_take_their_share(servers, monkeypatch):
    a, b = servers
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = RemoteActivationDataset([a.url, b.url], batch_size=10, max_batches=5)
    assert ds.shard() == (1, 2, [b.url])
    assert len(list(ds)) == 2  # 5 batches over 2 ranks: rank 1 takes 2
    assert RemoteActivationDataset(a.url, rank=0, world_size=2, max_samples=11, batch_size=4).shard()[:2] == (0, 2)


def test_4xx_is_raised_at_once_through_the_loader(servers):
    ds = RemoteActivationDataset(servers[0].url + "/no-such-prefix", batch_size=100, retry_for_s=60)
    t0 = time.monotonic()
    with pytest.raises(ActivationServerError) as e:
        next(iter(make_loader(ds, num_workers=1, persistent_workers=False)))
    assert time.monotonic() - t0 < 30  # not retried for 60 s
    assert "404" in str(e.value) and servers[0].url in str(e.value)


def test_dead_server_is_a_clear_error_within_retry_for_s():
    url = f"http://127.0.0.1:{free_port()}"
    ds = RemoteActivationDataset(url, batch_size=10, retry_for_s=1.5)
    for workers in (0, 1):
        t0 = time.monotonic()
        with pytest.raises(ServerUnavailable) as e:  # the type survives the worker boundary
            next(iter(make_loader(ds, num_workers=workers, persistent_workers=False)))
        assert time.monotonic() - t0 < 30
        assert url in str(e.value) and "retry_for_s=1.5" in str(e.value)


def test_stream_survives_a_server_restart_on_the_same_port():
    srv = start("buffer.size=2000", "buffer.min_fill=0.25")
    port = srv.port
    srv2 = None
    try:
        ds = RemoteActivationDataset(srv.url, batch_size=100, retry_for_s=90)
        it = iter(make_loader(ds, num_workers=2, persistent_workers=False))
        before = [next(it) for _ in range(6)]
        os.killpg(srv.proc.pid, signal.SIGKILL)  # the whole server, no goodbye
        srv.stop()
        after = []
        time.sleep(1.0)  # the workers meet the dead port and start retrying
        srv2 = ServerProcess([*SYNTHETIC, "buffer.size=2000", "buffer.min_fill=0.25", f"server.port={port}"])
        assert srv2.url == srv.url
        # Up to 2 workers x prefetch 2 batches were in flight when it died; past those, rows come from srv2.
        while len(after) < 10:
            after.append(next(it))
        assert rows_read(srv2.url) >= 600
        assert verify_rows(torch.cat(before + after))[1].all()
        del it
    finally:
        if srv2 is not None:
            srv2.stop()


def test_loader_shutdown_does_not_hang(servers):
    done = threading.Event()

    def run():
        loader = make_loader(RemoteActivationDataset(servers[0].url, batch_size=100), num_workers=2)
        it = iter(loader)  # an endless stream, abandoned mid-way
        for _ in range(3):
            next(it)
        del it, loader
        gc.collect()
        done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=60)
    assert done.is_set(), "DataLoader shutdown hung"


def test_trainer_fit_through_the_datamodule(servers):
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(768, 768)
            self.seen = []

        def training_step(self, x, i):
            assert x.shape == (128, 768)
            self.seen.append(x.detach().clone())
            return torch.nn.functional.mse_loss(self.lin(x / 100), x / 100)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    model = Tiny()
    dm = ActivationDataModule(servers[0].url, batch_size=128, num_workers=2)
    trainer = pl.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 5 and len(model.seen) == 5
    ids, ok = verify_rows(torch.cat(model.seen))
    assert ok.all() and len(set(ids.tolist())) == 5 * 128
