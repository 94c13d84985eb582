import contextlib
import os
import subprocess
import tempfile

import pytest

from actdata.serving.process import ServerProcess

# No test resumes from a state saved by another run (or by the developer) unless it asks to.
NO_RESUME = "generator.state_dir=null"
SYNTHETIC = ["+preset=test", "generator.source=synthetic", NO_RESUME]


def shm_files(pid: int, directory: str = "/dev/shm", prefix: str = "actdata") -> list[str]:
    """Buffer files (and side files) of the server with this pid."""
    return [n for n in os.listdir(directory) if n.startswith(f"{prefix}-{pid}-")]


@pytest.fixture
def start_server():
    """start_server(*overrides) -> a running ServerProcess (synthetic source unless overridden)."""
    started = []

    def start(*overrides, base=SYNTHETIC, **kw):
        args = [*base, *overrides]
        if not any(a.startswith("generator.state_dir=") for a in args):
            args.append(NO_RESUME)
        srv = ServerProcess(args, **kw)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def synthetic_server():
    """One shared synthetic server: 4,000 rows x 768 float32, min_fill 0.25."""
    srv = ServerProcess([*SYNTHETIC, "buffer.size=4000", "buffer.min_fill=0.25"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama built from a config (random weights, no download), for a module's model tests."""
    from test_capture import build

    return build("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 40-document JSONL corpus of the capture tests' sentences."""
    import json

    from test_capture import TEXT

    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"{TEXT[i % len(TEXT)]} Number {i}."}) + "\n")
    return str(path)


@contextlib.contextmanager
def private_tmpfs(size: str):
    """A tmpfs of `size` (mount's syntax, "4m") on a fresh directory, for a full disk; skips where mounting
    is not allowed. Unmounted lazily: a view of a map may outlive the test."""
    d = tempfile.mkdtemp(prefix="actdata-test-tmpfs-")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", d], capture_output=True)
    if r.returncode != 0:
        os.rmdir(d)
        pytest.skip(f"cannot mount a private tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", d], capture_output=True)
