"""The generator worker: LitServe's device worker (a LitAPI), used for what needs a device. LitServe
starts one per device; its `setup(device)` starts the generation loop in a background thread, so there is
one generator per GPU (or one on the CPU). LitServe's request path to it is not exposed."""
from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading

import litserve as ls
import torch

from ..config import Config
from ..generation.loop import run_supervised
from ..generation.threads import limit_threads
from ..shm import BufferSpec, sidefiles

log = logging.getLogger(__name__)
STOP_GRACE_S = 0.5  # a generator worker told to stop leaves after at most this long (see GeneratorWorker.setup)
STORE_FLUSH_S = 10.0  # ... or this long while it writes a store: its queued rows and open shard reach the disk


def _thread_lock_for_progress_bars() -> None:
    """Give tqdm (model and dataset loading) a thread lock before its first bar: its default lock adds a
    multiprocessing RLock, a named semaphore that this process's os._exit would leave to the resource
    tracker to warn about ("leaked semaphore"), and no other process shares it."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())


class GeneratorWorker(ls.LitAPI):
    """LitServe's device worker, used for what needs a device: it runs one generator."""

    def __init__(self, cfg: Config, spec: BufferSpec, local_generators: int = 1):
        super().__init__(api_path="/generator")
        self.cfg, self.buffer_spec, self.local_generators = cfg, spec, local_generators

    def setup(self, device: str) -> None:
        from .procs import die_with_parent, setup_logging

        die_with_parent()
        setup_logging(self.cfg.log_level, self.cfg.server.log_file)
        _thread_lock_for_progress_bars()
        self._stop = threading.Event()
        limit_threads(self.local_generators)  # this generator's share of the host's cores, before anything starts
        local = int(os.environ.get("LITSERVE_WORKER_ID", "0"))
        s = self.cfg.server  # the global numbering: generator g of G across every node
        index, count = s.node_rank * self.local_generators + local, s.num_nodes * self.local_generators
        device = str(device)
        if self.cfg.model.device not in ("auto", "", None):
            device = self.cfg.model.device  # config validation allows this only with server.devices=1
        if device.startswith("cuda"):  # this worker's GPU is the current device before anything touches CUDA
            torch.cuda.set_device(device)
        name = f"{device.replace(':', '')}-w{index}"
        try:  # a fatal signal (SIGBUS, SIGSEGV) leaves its traceback where the supervisor reads it
            self._crash_file = open(sidefiles.generator_crash(self.buffer_spec.path, name), "w")
            faulthandler.enable(file=self._crash_file)
        except OSError:
            pass

        def generate():  # the current device is per thread: bind the generator's thread too
            if device.startswith("cuda"):
                torch.cuda.set_device(device)
            try:
                run_supervised(self.cfg, self.buffer_spec, device, index, self._stop, count=count)
            except BaseException:  # logged and published by run_supervised: let the supervisor restart us
                os._exit(3)

        self._thread = threading.Thread(target=generate, name="actdata-generator", daemon=True)
        self._thread.start()

        # SIGTERM: stop the loop (it flushes the store's open shard and saves the statistics), then leave
        # within the grace even if it has not finished. Leaving early loses nothing of the buffer (claimed
        # slots are reclaimed, the corpus position was saved before each batch), but a store's queued rows
        # would be lost, so a store writer gets longer. Ctrl-C reaches the whole process group: the server
        # stops its workers itself.
        grace = STORE_FLUSH_S if self.cfg.store.write else STOP_GRACE_S

        def _exit(signum, frame):
            self._stop.set()
            self._thread.join(timeout=grace)
            os._exit(0)

        signal.signal(signal.SIGTERM, _exit)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        log.info("generator worker %d (generator %d of %d) started on %s (pid %d)", local, index, count, device,
                 os.getpid())

    def predict(self, x):  # LitAPI's request path is unused: the data plane reads the buffer directly
        raise NotImplementedError

