"""How a stop is asked for: SIGTERM / SIGINT, and the death of the process that started the server."""
from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

EXIT_WITH_PARENT = "ACTDATA_EXIT_WITH_PARENT"  # set by ServerProcess(die_with_parent=True)


def exit_with_parent(parent: int, stop: threading.Event) -> None:
    """Stop the server once the process that started it is gone. Backs up PR_SET_PDEATHSIG, which
    fires when the parent's *thread* ends, not its process (a Ray actor's thread, say)."""
    while not stop.wait(0.5):
        if os.getppid() != parent:
            log.warning("the process that started this server (pid %d) is gone: stopping", parent)
            os.kill(os.getpid(), signal.SIGTERM)
            return


STOPPING = threading.Event()  # set once a stop was asked for: the supervisor restarts nothing after it
_interrupted = False


def _interrupt(signum, frame):
    """The first SIGTERM / SIGINT stops the server (KeyboardInterrupt in the main thread); later ones
    return at once. A signal handler runs inside whatever the main thread was doing: a second signal
    arriving within the first one's STOPPING.set() would otherwise wait forever on the lock the first one
    holds."""
    global _interrupted
    if _interrupted:
        return
    _interrupted = True
    STOPPING.set()
    raise KeyboardInterrupt


def install_handlers() -> None:
    """SIGTERM and SIGINT stop the server (SIGINT even when started with it ignored, as a background job)."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
