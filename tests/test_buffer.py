"""SharedActivationBuffer: the slot state machine, serve-once, read budgets, min_fill, concurrency
with checksummed rows across processes, sparse allocation, space checks and reclaiming."""
import multiprocessing as mp
import os
import resource
import time

import numpy as np
import pytest
import torch

from actdata.generation.synthetic import make_rows, verify_rows
from actdata.shm import BufferSpaceError, NotReady, SharedActivationBuffer
from actdata.shm.layout import FREE, READING, READY, WRITING
from actdata.shm.segment import hold_owner_lock, reclaim_stale


def test_state_machine_and_serve_once():
    with SharedActivationBuffer.create(100, (16,), "float32") as buf:
        assert (buf.states() == FREE).all()
        ids = buf.claim_free(30)
        assert len(set(ids.tolist())) == 30 and (buf.states()[ids] == WRITING).all()
        buf.data[torch.from_numpy(ids)] = make_rows(torch.arange(30), (16,), torch.float32)
        buf.commit(ids)
        assert (buf.states()[ids] == READY).all() and buf.stats()["ready"] == 30
        got, epoch = buf.claim_ready(10)
        assert set(got.tolist()) <= set(ids.tolist()) and (buf.states()[got] == READING).all()
        buf.release(got, epoch)
        assert (buf.states()[got] == FREE).all()  # max_reads=1: served once, then refilled
        st = buf.stats()
        assert (st["free"], st["ready"], st["reading"], st["writing"]) == (80, 20, 0, 0)
        assert st["rows_written"] == 30 and st["rows_read"] == 10


def test_no_row_served_twice_and_all_rows_served():
    with SharedActivationBuffer.create(500, (16,), "float16") as buf:
        buf.write(make_rows(torch.arange(500), (16,), torch.float16))
        seen = []
        while buf.stats()["ready"]:
            _, rows = buf.read(min(37, buf.stats()["ready"]))
            ids, ok = verify_rows(rows)
            assert ok.all()
            seen += ids.tolist()
        assert sorted(seen) == list(range(500))
        with pytest.raises(NotReady):
            buf.read(1)


def test_read_budget():
    with SharedActivationBuffer.create(50, (16,), "bfloat16", max_reads=3) as buf:
        buf.write(make_rows(torch.arange(50), (16,), torch.bfloat16))
        counts = np.zeros(50, dtype=int)
        while buf.stats()["ready"]:
            _, rows = buf.read(min(7, buf.stats()["ready"]))
            ids, ok = verify_rows(rows)
            assert ok.all()
            np.add.at(counts, ids.numpy(), 1)
            assert counts.max() <= 3
        assert (counts == 3).all()  # each row exactly its budget, then freed
        assert buf.stats()["free"] == 50


def test_min_fill_gates_serving():
    with SharedActivationBuffer.create(100, (16,), "float32", min_fill=0.5) as buf:
        buf.write(make_rows(torch.arange(49), (16,), torch.float32))
        with pytest.raises(NotReady, match="min_fill"):
            buf.read(1)
        assert not buf.stats()["serving"]
        buf.write(make_rows(torch.arange(49, 50), (16,), torch.float32))
        assert buf.stats()["serving"]
        assert len(buf.read(10)[0]) == 10
        with pytest.raises(NotReady):  # now 40 ready < 50
            buf.read(1)


def test_more_than_ready_is_not_ready():
    with SharedActivationBuffer.create(100, (16,), "float32") as buf:
        buf.write(make_rows(torch.arange(5), (16,), torch.float32))
        with pytest.raises(NotReady, match="only 5 rows ready"):
            buf.read(6)
        assert buf.stats()["ready"] == 5  # a refused read takes nothing


def test_refresh_drops_ready_rows_and_rows_in_flight():
    with SharedActivationBuffer.create(100, (16,), "float32", max_reads=5) as buf:
        buf.write(make_rows(torch.arange(60), (16,), torch.float32))
        got, epoch = buf.claim_ready(10)
        assert buf.refresh() == 50
        buf.release(got, epoch)  # read before the refresh: freed, not returned
        st = buf.stats()
        assert st["ready"] == 0 and st["free"] == 100 and st["refresh_epoch"] == 1


def _writer(spec, n_rows, batch, start, stop):
    buf = SharedActivationBuffer.attach(spec)
    start.wait()  # every reader is attached: none misses the whole run while its interpreter starts
    next_id = 0
    while next_id < n_rows and not stop.is_set():
        k = min(batch, n_rows - next_id)
        buf.write(make_rows(torch.arange(next_id, next_id + k), spec.sample_shape, torch.float16),
                  origin=np.arange(next_id, next_id + k), stop=stop)
        next_id += k
    buf.close()


def _reader(spec, total, out_q, start):
    buf = SharedActivationBuffer.attach(spec)
    start.wait()
    ids, torn = [], 0
    while True:
        st = buf.stats()
        if st["rows_read"] >= total:
            break
        try:
            _, rows = buf.read(64)
        except NotReady:
            time.sleep(0.0005)  # let the writer have the core
            continue
        got, ok = verify_rows(rows)
        torn += int((~ok).sum())
        ids += got.tolist()
    buf.close()
    out_q.put((ids, torn))


def test_concurrent_writer_and_readers_see_only_whole_rows_once():
    """One writer process flat out, three reader processes: every row whole, none served twice."""
    total = 30_000
    ctx = mp.get_context("spawn")
    with SharedActivationBuffer.create(2_000, (4, 96), "float16", min_fill=0.1) as buf:
        q, start, stop = ctx.Queue(), ctx.Barrier(4), ctx.Event()
        procs = [ctx.Process(target=_writer, args=(buf.spec, total + 4_000, 100, start, stop))]
        procs += [ctx.Process(target=_reader, args=(buf.spec, total, q, start)) for _ in range(3)]
        for p in procs:
            p.start()
        results = [q.get(timeout=120) for _ in range(3)]
        stop.set()  # the writer waits for free slots in a full buffer: it stops now
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        ids = [i for r, _ in results for i in r]
        assert sum(t for _, t in results) == 0
        assert len(ids) >= total and len(ids) == len(set(ids))
        assert all(len(r) > 0 for r, _ in results)  # every reader got rows


def test_allocation_touches_no_data_pages(tmp_path):
    """A 4 GB buffer: the file is sparse and the process does not grow by the capacity."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with SharedActivationBuffer.create(1_000_000, (1024,), "float32", path=str(tmp_path)) as buf:
        allocated = os.stat(buf.spec.path).st_blocks * 512
        assert buf.spec.nbytes > 4e9
        assert allocated < 64e6, allocated  # only the index arrays
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
        assert grown < 100e6, grown
    assert not os.listdir(tmp_path)  # the owner unlinks on close


def test_space_checked_before_allocating(tmp_path):
    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    rows = int(free // 4096) + 1_000
    prefix = f"actdata-space-{os.getpid()}"  # its own name: other tests may create buffers meanwhile
    with pytest.raises(BufferSpaceError, match="buffer.size"):
        SharedActivationBuffer.create(rows, (1024,), "float32", prefix=prefix)
    assert [n for n in os.listdir("/dev/shm") if n.startswith(prefix)] == []  # nothing allocated


def test_file_backed_buffer_and_attach(tmp_path):
    path = str(tmp_path / "acts.buf")
    with SharedActivationBuffer.create(64, (16,), "float32", path=path) as buf:
        assert buf.spec.path == path
        buf.write(make_rows(torch.arange(64), (16,), torch.float32))
        other = SharedActivationBuffer.attach(buf.spec)
        assert other.stats()["ready"] == 64
        ids, ok = verify_rows(other.read(8)[1])
        assert ok.all() and buf.stats()["rows_read"] == 8
        other.close()
        assert os.path.exists(path)  # only the owner removes the file
    assert not os.path.exists(path)


def test_reclaim_segments_of_dead_runs(tmp_path):
    """A segment is judged by its owner lock: a held lock keeps it, a missing one (an owner that died
    before taking it, or an older version's file) lets it go once it is not brand new."""
    dead = tmp_path / "actdata-999999999-0badc0de.buf"
    alive = tmp_path / f"actdata-{os.getpid()}-00c0ffee.buf"
    new = tmp_path / "actdata-999999998-00000001.buf"
    other = tmp_path / "somebody-else.buf"
    for p in (dead, alive, new, other):
        p.write_bytes(b"x")
    old = time.time() - 60
    for p in (dead, alive, other):
        os.utime(p, (old, old))
    fd = hold_owner_lock(str(alive))
    try:
        assert reclaim_stale(str(tmp_path), "actdata") == [dead.name]
        assert sorted(os.listdir(tmp_path)) == sorted([alive.name, alive.name + ".owner", new.name, other.name])
    finally:
        os.close(fd)


def test_rows_of_a_batch_go_to_random_slots():
    with SharedActivationBuffer.create(10_000, (16,), "float32") as buf:
        ids = buf.claim_free(100)
        assert np.abs(np.diff(np.sort(ids))).max() > 1  # not one contiguous run
        assert len(set((ids // 1000).tolist())) > 5  # spread over the buffer


def test_close_removes_side_files():
    buf = SharedActivationBuffer.create(10, (16,), "float32")
    side = buf.spec.path + ".gen-cpu-w0.json"
    open(side, "w").close()
    buf.close()
    assert not os.path.exists(side) and not os.path.exists(buf.spec.path)


def _claim_and_die(spec, writing: bool):
    buf = SharedActivationBuffer.attach(spec)
    if writing:
        buf.claim_free(30)
    else:
        buf.claim_ready(20)
    os._exit(0)  # dies holding its claims


def test_claims_of_dead_processes_are_reclaimed():
    ctx = mp.get_context("spawn")
    with SharedActivationBuffer.create(100, (16,), "float32") as buf:
        buf.write(make_rows(torch.arange(50), (16,), torch.float32))
        assert buf.reclaim_orphans() == 0  # nobody died
        for writing in (True, False):
            p = ctx.Process(target=_claim_and_die, args=(buf.spec, writing))
            p.start()
            p.join(60)
        st = buf.stats()
        assert (st["writing"], st["reading"], st["free"], st["ready"]) == (30, 20, 20, 30)
        mine = buf.claim_free(5)  # a live claim is left alone
        assert buf.reclaim_orphans() == 50
        st = buf.stats()
        assert (st["writing"], st["reading"], st["free"], st["ready"]) == (5, 0, 65, 30)
        assert (buf.states()[mine] == WRITING).all()


def test_large_batches_are_copied_by_several_threads_small_ones_by_the_caller():
    """A batch of large rows is scattered by a few threads (each a contiguous share), every row still in the
    slot its origin was committed with; a small batch never starts a copy thread."""
    import threading

    from actdata.shm import scatter

    def copy_threads():
        return [t for t in threading.enumerate() if t.name.startswith("actdata-scatter")]

    threads0 = scatter.threads
    scatter.threads = 3  # three shares whatever this machine's core count
    try:
        with SharedActivationBuffer.create(10_000, (16,), "float32") as small:
            small.write(make_rows(torch.arange(64), (16,), torch.float32), np.arange(64))
            assert not copy_threads()
        with SharedActivationBuffer.create(12_000, (2048,), "float32") as buf:
            n = 4096  # 32 MiB: three shares
            buf.write(make_rows(torch.arange(n), (2048,), torch.float32), np.arange(n))
            assert copy_threads()
            ids, epoch = buf.claim_ready(n)
            got, ok = verify_rows(buf.data[torch.from_numpy(ids)])
            assert ok.all() and got.tolist() == buf._origin[ids].tolist()
            buf.release(ids, epoch)
    finally:
        scatter.threads = threads0
