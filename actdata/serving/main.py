"""The entry point: `python -m actdata.serve +preset=test key=value ...` (Hydra), or `serve(cfg)` from Python.

Order of work: compose and validate the config, derive the row shape, print the memory estimate,
reclaim segments of killed runs, check the space and create the shared buffer, then run LitServe
(generator workers + HTTP processes) until Ctrl-C / SIGTERM, and finally stop every child process and
unlink the buffer. Nothing is allocated before the config has been checked.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
from typing import Optional

from ..auth import resolve_api_key
from ..host import group_pids
from ..config import Config, ConfigError, estimate_bytes, human_bytes, synthetic_shape, to_config, validate
from ..shm import sidefiles
from ..shm.sidefiles import publish_json, read_json

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


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Supervisor:
    """The main process's watch over its children, every `interval` s:

    - HTTP processes (LitServe forks them and does not watch them): one that died is logged with its
      exit status and replaced by a fresh fork on the same listening socket; their pids and restarts are
      published in `<buffer>.http.json` for /stats. More than `max_restarts` within `window_s` is a
      fatal stop (a crash loop), which makes the server exit non-zero.
    - generator worker processes (LitServe's own monitor is off): one that died is logged with its exit
      status and any fatal-signal traceback it left, that cause is written into its status (/stats, GET /
      report it), and it is started again.
    - the buffer: slots held by dead processes are freed, and the published rates updated.
    """

    def __init__(self, server, buffer, interval: float = 0.5, max_restarts: int = 20, window_s: float = 60.0):
        self.server, self.buffer, self.interval = server, buffer, interval
        self.max_restarts, self.window_s = max_restarts, window_s
        self.http_restarts, self.gen_restarts, self.last_death = 0, 0, None
        self.fatal: Optional[str] = None
        self._recent: list[float] = []

    def check(self) -> None:
        self._http()
        self._generators()

    def _died(self, what: str, proc) -> str:
        code = proc.exitcode
        how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 and -code in
               signal.Signals._value2member_map_ else f"exit status {code}")
        self.last_death = f"{what} (pid {proc.pid}) {how} at {time.strftime('%H:%M:%S')}"
        now = time.time()
        self._recent = [t for t in self._recent if now - t < self.window_s] + [now]
        if len(self._recent) > self.max_restarts:
            self.fatal = f"{len(self._recent)} process deaths within {self.window_s:g} s; last: {self.last_death}"
        return self.last_death

    def _http(self) -> None:
        workers = getattr(self.server, "http_workers", None) or {}
        changed = False
        for i, w in list(workers.items()):
            if w.is_alive() or self.fatal or STOPPING.is_set():
                continue
            w.join(0)
            log.error("%s; starting a new one", self._died(f"HTTP process {i}", w))
            self.server.restart_http_worker(i)
            self.http_restarts += 1
            changed = True
        if workers and (changed or not hasattr(self, "_published")):
            self._published = True
            publish_json(sidefiles.http_processes(self.buffer.spec.path),
                         {"pids": [w.pid for w in workers.values()], "restarts": self.http_restarts,
                          "last_death": self.last_death})

    def _generators(self) -> None:

        procs = getattr(self.server, "inference_workers", None) or []
        if self.fatal or STOPPING.is_set() or getattr(self.server, "_shutdown_event", None) is None:
            return
        for idx, proc in enumerate(procs):
            if proc.is_alive():
                continue
            proc.join(0)
            cause = self._died(f"generator worker {idx}", proc)
            for name, path in sidefiles.generator_statuses(self.buffer.spec.path):
                st = read_json(path) or {}
                if st.get("pid") != proc.pid:
                    continue
                try:
                    with open(sidefiles.generator_crash(self.buffer.spec.path, name)) as f:
                        lines = [x.strip() for x in f.read(4000).splitlines() if x.strip()]
                except OSError:
                    lines = []
                crash = lines[0] if lines else ""
                if crash:
                    cause += f": {crash}"
                    if "Bus error" in crash:
                        cause += " (the buffer's file lost its backing: filesystem or memory full?)"
                st.update(state="dead", death=cause, last_error=cause)
                publish_json(path, st)
            log.error("%s; starting it again", cause)
            api = self.server.litapi_connector.lit_apis[0]
            procs[idx] = self.server.launch_single_inference_worker(api, idx)
            self.gen_restarts += 1


def _watch(url: str, cfg: Config, buffer, sup: Supervisor, stop: threading.Event) -> None:
    """Console side of the main process: announce the URL (and write the ready file) once the HTTP
    processes answer, show a progress bar while the buffer fills to min_fill, then log a one-line
    status every `server.status_interval_s`; and run the supervisor's checks. A fatal finding stops the
    server (exit status 1). Nothing here stops the server because requests are slow: overload is
    answered by the HTTP layer (actdata.httpguard)."""
    last_check = 0.0
    while not stop.is_set():
        try:
            with urllib.request.urlopen(url + "/", timeout=1.0) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.time() - last_check > sup.interval:
            last_check = time.time()
            _guarded(sup.check)
        stop.wait(0.1)
    if stop.is_set():
        return
    log.info("actdata serving on %s (GET /stats, /activations/tensor?num_samples=N)", url)
    if cfg.server.ready_file:
        tmp = cfg.server.ready_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"url": url, "port": int(url.rsplit(":", 1)[1]), "pid": os.getpid()}, f)
        os.replace(tmp, cfg.server.ready_file)
    from ..generation.loop import read_statuses

    tty, last_line, last_reclaim = sys.stderr.isatty(), 0.0, time.time()
    while not stop.wait(sup.interval):
        _guarded(sup.check)
        if sup.fatal:
            log.critical("stopping: %s", sup.fatal)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        _guarded(buffer.sample_rates)  # published for every process's /stats
        if time.time() - last_reclaim > 5.0:
            last_reclaim = time.time()
            n = _guarded(buffer.reclaim_orphans)
            if n:
                log.warning("freed %d rows claimed by a process that died mid-write or mid-read", n)
        try:
            st = buffer.stats()
            gens = " ".join(f"{g['name']}:{g['state']}" + (f"({g['tokens_per_s']:,.0f} tok/s)" if g["tokens_per_s"] else "")
                            for g in read_statuses(buffer.spec))
        except Exception as e:  # noqa: BLE001
            log.error("status read failed: %s", e)
            continue
        if not st["serving"]:
            target = max(1, int(st["min_fill"] * st["capacity"]))
            frac = min(1.0, st["ready"] / target)
            bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
            line = f"filling [{bar}] {st['ready']:,}/{target:,} rows to min_fill | {st['writes_per_s']:,.0f} rows/s | {gens}"
            if tty:
                print("\r" + line[:160], end="", file=sys.stderr, flush=True)
            elif time.time() - last_line >= 5:
                log.info(line)
                last_line = time.time()
        elif cfg.server.status_interval_s and time.time() - last_line >= cfg.server.status_interval_s:
            if tty and last_line == 0.0:
                print(file=sys.stderr)
            log.info("fill %5.1f%% | in %s rows/s | out %s rows/s (%.1f MB/s) | %s", 100 * st["fill"],
                     f"{st['writes_per_s']:,.0f}", f"{st['reads_per_s']:,.0f}",
                     st["reads_per_s"] * st["row_bytes"] / 1e6, gens)
            last_line = time.time()


EXIT_WITH_PARENT = "ACTDATA_EXIT_WITH_PARENT"  # set by ServerProcess(die_with_parent=True)


def _exit_with_parent(parent: int, stop: threading.Event) -> None:
    """Stop the server once the process that started it is gone. Backs up PR_SET_PDEATHSIG, which
    fires when the parent's *thread* ends, not its process, and which a cluster test's server once
    outlived (its Ray actor gone, the server serving on, orphaned)."""
    while not stop.wait(0.5):
        if os.getppid() != parent:
            log.warning("the process that started this server (pid %d) is gone: stopping", parent)
            os.kill(os.getpid(), signal.SIGTERM)
            return


def _guarded(fn):
    """Run one periodic job; an error is logged, never allowed to end the watch."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        log.error("%s failed: %s: %s", getattr(fn, "__name__", fn), type(e).__name__, e)
        return None


def serve(cfg: Config) -> None:
    """Run the server until interrupted. Raises ConfigError / BufferSpaceError before allocating, and
    SystemExit(1) after a fatal stop (see Supervisor), so a service manager restarts it."""
    from ..shm import SharedActivationBuffer
    from ..shm.segment import SHM_DIR, reclaim_stale
    from .httpguard import Limits, guarded_protocol
    from .procs import kill_descendants, raise_open_file_limit, setup_logging

    setup_logging(cfg.log_level, cfg.server.log_file)
    validate(cfg)
    from ..generation.state import check_state_dir

    state = check_state_dir(cfg)  # a one-line config error before anything is allocated
    nofile, _ = raise_open_file_limit()
    shape = sample_shape(cfg)
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
                                           reserve=b.reserve)
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
        from .app import build_server

        os.register_at_fork(after_in_child=lambda: _forked_child(buffer))  # LitServe's HTTP processes
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)  # even when started with SIGINT ignored (a background job)
        metrics = ServingMetrics(sidefiles.metrics(buffer.spec.path), create=True)
        server = build_server(cfg, buffer, metrics, api_key)
        sup = Supervisor(server, buffer)
        host = "127.0.0.1" if cfg.server.host == "0.0.0.0" else ("::1" if cfg.server.host == "::" else cfg.server.host)
        url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
        threading.Thread(target=_watch, args=(url, cfg, buffer, sup, stop), name="actdata-supervisor",
                         daemon=True).start()
        if os.environ.get(EXIT_WITH_PARENT) == "1":
            threading.Thread(target=_exit_with_parent, args=(os.getppid(), stop), name="actdata-parent-watch",
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


class ServerProcess:
    """The server in a child process (its own session), for Python callers, tests and benchmarks:

        with ServerProcess(["+preset=test", "generator.source=synthetic"]) as srv:
            ActivationClient(srv.url)...

    The port defaults to 0 (any free port); `url` is read from the server's ready file. `stop()` sends
    SIGTERM and waits; whatever is left of its process group after `timeout` is killed. With
    `die_with_parent`, the server is sent SIGTERM when the calling process dies (a Ray actor's server).
    `wrapper`: a command prefix such as ["prlimit", "--nofile=1024:1024", "--"] or ["unshare", "--pid", "--fork", ...].
    """

    def __init__(self, overrides: list[str] = (), timeout: float = 180.0, env: Optional[dict] = None,
                 log_path: Optional[str] = None, die_with_parent: bool = False, wrapper: list[str] = ()):
        import subprocess
        import tempfile

        self._dir = tempfile.mkdtemp(prefix="actdata-server-")
        self.ready_file = os.path.join(self._dir, "ready.json")
        self.log_path = log_path or os.path.join(self._dir, "server.log")
        args = list(overrides)
        if not any(a.startswith("server.port=") for a in args):
            args.append("server.port=0")
        if not any(a.startswith("server.log_file=") for a in args):
            args.append("server.log_file=null")
        args.append(f"server.ready_file={self.ready_file}")
        self._log = open(self.log_path, "ab")
        from .procs import die_with_parent as _pdeathsig  # imported before the fork: preexec_fn runs in the child

        self.proc = subprocess.Popen([*wrapper, sys.executable, "-m", "actdata.serve", *args], stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {}), **({EXIT_WITH_PARENT: "1"} if die_with_parent else {})},
                                     start_new_session=True,
                                     preexec_fn=_pdeathsig if die_with_parent else None)
        self.url, self.port = None, None
        deadline = time.time() + timeout
        while time.time() < deadline:
            if os.path.exists(self.ready_file):
                with open(self.ready_file) as f:
                    info = json.load(f)
                self.url, self.port = info["url"], info["port"]
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        code, tail = self.proc.poll(), self.log_tail()
        self.stop()
        raise RuntimeError(f"server did not start (exit code {code}); log:\n{tail}")

    def log_tail(self, n: int = 4000) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM the server, wait for it; returns its exit code."""
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        deadline = time.time() + 2.0  # the resource tracker leaves by itself once the server is gone
        while code is not None and time.time() < deadline and group_pids(self.proc.pid):
            time.sleep(0.02)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything of its group still alive
        except (ProcessLookupError, PermissionError):
            pass
        if code is None:
            code = self.proc.wait(5)
        self._log.close()
        return code

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


STOPPING = threading.Event()  # set once a stop was asked for: the supervisor restarts nothing after it
_interrupted = False


def _interrupt(signum, frame):
    """The first SIGTERM / SIGINT stops the server (KeyboardInterrupt in the main thread); later ones
    return at once. A signal handler runs inside whatever the main thread was doing: a second signal
    arriving within the first one's STOPPING.set() would wait forever on the lock the first one holds
    (a server SIGTERMed several times in a row hung that way, half stopped)."""
    global _interrupted
    if _interrupted:
        return
    _interrupted = True
    STOPPING.set()
    raise KeyboardInterrupt


def _forked_child(buffer) -> None:
    """In each forked child (LitServe's HTTP processes): default SIGTERM, die with the server, one torch
    thread (row gathers are memory-bound, parallelism comes from the processes, and an OpenMP pool on a
    busy core is slower than one thread: 8 ms vs 1.2 ms for 4096 x 768 rows), and the buffer's pages
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
    """Leave without the interpreter's teardown: everything was stopped and removed already, and the
    teardown of the loaded native libraries took ~2 s of a model server's stop."""
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
            serve(to_config(node))
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
