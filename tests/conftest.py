import os

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
