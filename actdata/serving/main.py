"""The entry point: `python -m actdata.serve +preset=test key=value ...` (Hydra), or `serve(cfg)` from Python.

Order of work: compose and validate the config, derive the row shape, print the memory estimate,
reclaim segments of killed runs, check the space and create the shared buffer, then run LitServe
(generator workers + HTTP processes) until Ctrl-C / SIGTERM, and finally stop every child process and
unlink the buffer. Nothing is allocated before the config has been checked.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time

from ..auth import resolve_api_key
from ..config import Config, ConfigError, estimate_bytes, human_bytes, synthetic_shape, to_config, validate
from ..shm import sidefiles
from .console import watch
from .stopping import EXIT_WITH_PARENT, exit_with_parent, install_handlers
from .supervisor import Supervisor

log = logging.getLogger(__name__)
CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def sample_shape(cfg: Config) -> tuple[int, ...]:
    """The row shape: from the config for the synthetic source, from the store's manifest for a replay,
    from the model's config otherwise. Any store named (store.path, buffer.warm_start) is checked against
    it here, before anything is allocated."""
    from ..storage.checks import check_store_config, check_store_matches

    if cfg.generator.source == "store":
        return check_store_config(cfg)
    if cfg.generator.source == "synthetic":
        shape = synthetic_shape(cfg)
    else:
        from ..generation.sites import sample_shape as model_shape

        shape = tuple(model_shape(cfg))
    if cfg.store.write or cfg.buffer.warm_start:
        check_store_matches(cfg, shape)
    return shape


def resolve(cfg: Config) -> Config:
    """The config with what `auto` stands for on this host: server.accelerator and server.devices (GPUs
    counted through NVML, generation.placement), and buffer.dtype (generation.placement.buffer_dtype; for
    a replay, the store's). Raises ConfigError (accelerator=cuda with no GPU) before anything is allocated."""
    import dataclasses

    from ..generation.placement import buffer_dtype, resolve_accelerator

    acc, n = resolve_accelerator(cfg.server.accelerator, cfg.server.devices)
    cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, accelerator=acc, devices=n))
    if cfg.buffer.dtype == "auto":
        if cfg.generator.source == "store":
            from ..storage.catalog import open_store

            dtype = open_store(cfg.store.path, "store.path", cfg.store.column).dtype
        else:
            dtype = buffer_dtype(cfg, acc)
        cfg = dataclasses.replace(cfg, buffer=dataclasses.replace(cfg.buffer, dtype=dtype))
    return cfg


def check_host_memory(cfg: Config, shape: tuple) -> None:
    """The pinned memory of every generator of this host together, before any starts (CUDA model source)."""
    if cfg.server.accelerator != "cuda" or cfg.generator.source != "model":
        return
    import math

    from ..generation.placement import check_pinned

    total = check_pinned(cfg, math.prod(shape), cfg.server.devices * cfg.server.generators_per_device)
    log.info("pinned host memory of the generators: %s", human_bytes(total))


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve(cfg: Config, release_on_exit: bool = False) -> None:
    """Run the server until interrupted. Raises ConfigError / BufferSpaceError before allocating, and
    SystemExit(1) after a fatal stop (see Supervisor), so a service manager restarts it. `release_on_exit`
    (the command line): the buffer file's pages are freed once this process has exited, not during the
    stop; a caller that goes on running keeps the default, which frees them before returning."""
    from ..shm import SharedActivationBuffer
    from ..shm.segment import SHM_DIR, reclaim_stale
    from .httpguard import Limits, guarded_protocol
    from .procs import kill_descendants, raise_open_file_limit, release_after_exit, setup_logging

    setup_logging(cfg.log_level, cfg.server.log_file)
    validate(cfg)
    cfg = resolve(cfg)
    from ..generation.state import check_state_dir
    from .app import build_server  # LitServe's version is checked here, before anything is allocated

    state = check_state_dir(cfg)  # a one-line config error before anything is allocated
    nofile, _ = raise_open_file_limit()
    shape = sample_shape(cfg)
    check_host_memory(cfg, shape)
    b = cfg.buffer
    backing = b.path or SHM_DIR
    log.info("buffer: %d rows x %s %s = %s (with index) in %s", b.size, list(shape), b.dtype,
             human_bytes(estimate_bytes(cfg, shape)), backing)
    api_key = resolve_api_key(cfg.server.api_key)
    if cfg.server.host in ("0.0.0.0", "::") and not api_key:
        log.warning("bound to all interfaces without an API key: anyone who can reach port %s can read and "
                    "refresh the buffer (set server.api_key or ACTDATA_API_KEY)", cfg.server.port)
    port = cfg.server.port or _free_port(cfg.server.host)
    if os.path.isdir(backing):
        for name in reclaim_stale(backing, b.prefix):
            log.warning("reclaimed %s left by a run that was killed", name)

    buffer = SharedActivationBuffer.create(b.size, shape, b.dtype, min_fill=b.min_fill, max_reads=b.max_reads,
                                           path=b.path, prefix=b.prefix, provenance=cfg.generator.provenance,
                                           reserve=b.reserve, max_groups=b.max_groups)
    if buffer.groups is not None:  # consumer groups: settings every process reads from the buffer's header
        buffer.groups.configure(b.group_lag, b.group_idle_s, b.groups_expected)
    if state:
        log.info("generator state (corpus positions, statistics) in %s", state)
    stop = threading.Event()
    sup = None
    try:
        if b.warm_start:  # rows of an earlier run first: serving starts at once, generators take over
            from ..storage.replay import warm_start

            t0 = time.perf_counter()
            n = warm_start(buffer, b.warm_start, cfg.store.seed, cfg.store.column)
            log.info("warm start: %d rows from %s in %.1f s", n, b.warm_start, time.perf_counter() - t0)
        from .metrics import ServingMetrics

        os.register_at_fork(after_in_child=lambda: _forked_child(buffer))  # LitServe's HTTP processes
        install_handlers()
        metrics = ServingMetrics(sidefiles.metrics(buffer.spec.path), create=True)
        server = build_server(cfg, buffer, metrics, api_key)
        sup = Supervisor(server, buffer)
        host = "127.0.0.1" if cfg.server.host == "0.0.0.0" else ("::1" if cfg.server.host == "::" else cfg.server.host)
        url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
        threading.Thread(target=watch, args=(url, cfg, buffer, sup, stop), name="actdata-supervisor",
                         daemon=True).start()
        if os.environ.get(EXIT_WITH_PARENT) == "1":
            threading.Thread(target=exit_with_parent, args=(os.getppid(), stop), name="actdata-parent-watch",
                             daemon=True).start()
        s = cfg.server
        # each connection costs an HTTP process one descriptor: stay below the limit so accept() never fails
        max_conn = s.max_connections or max(64, nofile - 128)
        limits = Limits(max_header_bytes=s.max_header_bytes, header_timeout_s=s.header_timeout_s,
                        max_connections=min(max_conn, max(64, nofile - 128)), max_inflight=s.max_inflight,
                        send_timeout_s=s.send_timeout_s, retry_after_s=s.retry_after_s)
        log.info("HTTP limits per process: %d connections, %d requests in flight, head <= %d bytes within "
                 "%g s, send timeout %g s, responses <= %s", limits.max_connections, limits.max_inflight,
                 limits.max_header_bytes, limits.header_timeout_s, limits.send_timeout_s,
                 human_bytes(s.response_memory_bytes))
        server.run(host=cfg.server.host, port=port, num_api_servers=cfg.server.workers,
                   generate_client_file=False, log_level=cfg.log_level.lower(), access_log=False,
                   http=guarded_protocol(limits), timeout_keep_alive=s.keep_alive_s, backlog=4096)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for name in ("litserve", "litserve.server"):  # its monitor thread trips over the closed manager
            logging.getLogger(name).setLevel(logging.CRITICAL)
        log.info("stopping: terminating child processes and removing %s", buffer.spec.path)
        kill_descendants()
        if release_on_exit:  # the command line exits right after: the kernel frees it there
            release_after_exit(buffer.spec.path)
        buffer.close()
        if cfg.server.ready_file:
            try:
                os.unlink(cfg.server.ready_file)
            except OSError:
                pass
    log.info("stopped")
    if sup is not None and sup.fatal:
        log.critical("stopped after a fatal error: %s", sup.fatal)
        raise SystemExit(1)


def _forked_child(buffer) -> None:
    """In each forked child (LitServe's HTTP processes): default SIGTERM, die with the server, one torch
    thread (row gathers are memory-bound and parallelism comes from the processes; an OpenMP pool on a
    busy core is slower than one thread), and the buffer's pages
    mapped in the background so that reads of a large buffer cost what reads of a small one do."""
    import torch

    from .procs import die_with_parent

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent()
    torch.set_num_threads(1)
    threading.Thread(target=_prefault_when_serving, args=(buffer,), name="actdata-prefault", daemon=True).start()


def _prefault_when_serving(buffer) -> None:
    """Map the buffer's pages once it serves (most rows written by then), not while it fills. Not for
    a sparse buffer (buffer.reserve=false): on a tmpfs, reading a hole allocates it, which would spend
    the space that its writers allocate slot by slot (and pause on when it runs out)."""
    if not buffer.reserved:
        return
    while not buffer.stats()["serving"]:
        time.sleep(0.5)
    buffer.prefault()


def _exit_now(code: int) -> None:
    """Leave without the interpreter's teardown: everything was stopped and removed already, and tearing
    down the loaded native libraries (torch, transformers) is slow."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    import hydra

    from ..config import check_overrides, register

    try:  # unknown keys and values of the wrong kind: one line, exit 2, before Hydra starts
        sys.argv[1:] = check_overrides(sys.argv[1:])
    except ConfigError as e:
        print(f"actdata: bad config: {e}", file=sys.stderr)
        sys.exit(2)
    register()

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
    def _main(node) -> None:
        try:
            serve(to_config(node), release_on_exit=True)
            _exit_now(0)
        except SystemExit as e:
            _exit_now(e.code if isinstance(e.code, int) else 1)
        except ConfigError as e:
            print(f"actdata: bad config: {e}", file=sys.stderr)
            sys.exit(2)
        except Exception as e:  # space and allocation errors: one clear line, no traceback
            from ..shm import BufferSpaceError

            if isinstance(e, BufferSpaceError):
                print(f"actdata: {e}", file=sys.stderr)
                sys.exit(2)
            raise

    _main()


if __name__ == "__main__":
    main()
