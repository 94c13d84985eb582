"""Side files read while their writer rewrites them in place (a full disk): a reader never loses one.

`publish_json` rewrites a file in place when there is no space for a new one; a writer process that is
descheduled halfway through leaves half a text in the file for a moment. These tests hold a file in
exactly that state, as such a writer does (its exclusive lock held, half the new text written), and
read it as /stats does.
"""
import fcntl
import json
import os
import threading

from actdata.generation.status import read_statuses
from actdata.shm import BufferSpec, sidefiles
from actdata.shm.sidefiles import publish_json, read_json


def _half_written(path: str, obj: dict, finish_after_s: float):
    """Leave `path` as an in-place writer mid-write leaves it; the writer finishes after `finish_after_s`."""
    text = json.dumps(obj).encode()
    size = os.path.getsize(path)
    fd = os.open(path, os.O_WRONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, text[: len(text) // 2], 0)

    def finish():
        os.pwrite(fd, text + b" " * max(0, size - len(text)), 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    t = threading.Timer(finish_after_s, finish)
    t.start()
    return t


def test_a_reader_waits_for_an_in_place_rewrite_to_finish(tmp_path):
    path = str(tmp_path / "b.gen-cpu-w0.json")
    publish_json(path, {"name": "cpu-w0", "state": "running", "pad": "x" * 300})
    writer = _half_written(path, {"name": "cpu-w0", "state": "paused", "last_error": "no space left"}, 0.05)
    try:
        assert read_json(path)["state"] == "paused"  # the whole new text, not None
    finally:
        writer.join()


def test_a_writer_stalled_mid_write_leaves_readers_the_last_whole_reading(tmp_path):
    buffer_path = str(tmp_path / "b")
    spec = BufferSpec(path=buffer_path, capacity=10, sample_shape=(4,), dtype="float32")
    path = sidefiles.generator_status(buffer_path, "cpu-w0")
    publish_json(path, {"name": "cpu-w0", "pid": os.getpid(), "state": "paused", "last_error": "no space left"})
    assert [g["state"] for g in read_statuses(spec)] == ["paused"]
    new = {"last_error": "still no space", "name": "cpu-w0", "pid": os.getpid(), "state": "paused"}
    writer = _half_written(path, new, 2.0)
    try:  # longer than a reader waits: the generator is still listed, as last read
        gens = read_statuses(spec)
        assert [(g["name"], g["state"], g["last_error"]) for g in gens] == [("cpu-w0", "paused", "no space left")]
    finally:
        writer.join()
    assert read_statuses(spec)[0]["last_error"] == "still no space"
