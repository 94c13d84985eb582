"""The console side of the main process: ready announcement, fill progress, status line."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.request

from ..config import Config
from .supervisor import Supervisor

log = logging.getLogger(__name__)


def watch(url: str, cfg: Config, buffer, sup: Supervisor, stop: threading.Event) -> None:
    """Console side of the main process: announce the URL (and write the ready file) once the HTTP
    processes answer, show a progress bar while the buffer fills to min_fill, then log a one-line
    status every `server.status_interval_s`; and run the supervisor's checks. A fatal finding stops the
    server (exit status 1). Nothing here stops the server because requests are slow: overload is
    answered by the HTTP layer (actdata.serving.httpguard)."""
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
            guarded(sup.check)
        stop.wait(0.1)
    if stop.is_set():
        return
    log.info("actdata serving on %s (GET /stats, /activations/tensor?num_samples=N)", url)
    if cfg.server.ready_file:
        tmp = cfg.server.ready_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"url": url, "port": int(url.rsplit(":", 1)[1]), "pid": os.getpid()}, f)
        os.replace(tmp, cfg.server.ready_file)
    from ..generation.status import read_statuses
    from .history import RateHistory

    history = RateHistory(buffer)
    tty, last_line, last_reclaim = sys.stderr.isatty(), 0.0, time.time()
    while not stop.wait(sup.interval):
        guarded(sup.check)
        if sup.fatal:
            log.critical("stopping: %s", sup.fatal)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        guarded(buffer.sample_rates)  # published for every process's /stats
        guarded(history.sample)  # and the last minutes of them, for GET /stats/history
        if time.time() - last_reclaim > 5.0:
            last_reclaim = time.time()
            n = guarded(buffer.reclaim_orphans)
            if n:
                log.warning("freed %d rows claimed by a process that died mid-write or mid-read", n)
        try:
            st = buffer.stats()
            gens = " ".join(f"{g['name']}:{g['state']}"
                            + (f"({g['tokens_per_s']:,.0f} tok/s)" if g["tokens_per_s"] else "")
                            for g in read_statuses(buffer.spec))
        except Exception as e:  # noqa: BLE001
            log.error("status read failed: %s", e)
            continue
        if not st["serving"]:
            target = max(1, int(st["min_fill"] * st["capacity"]))
            frac = min(1.0, st["ready"] / target)
            bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
            line = (f"filling [{bar}] {st['ready']:,}/{target:,} rows to min_fill | "
                    f"{st['writes_per_s']:,.0f} rows/s | {gens}")
            if tty:
                print("\r" + line[:160], end="", file=sys.stderr, flush=True)
            elif time.time() - last_line >= 5:
                log.info(line)
                last_line = time.time()
        elif cfg.server.status_interval_s and time.time() - last_line >= cfg.server.status_interval_s:
            if tty and last_line == 0.0:
                print(file=sys.stderr)
            log.info("fill %5.1f%% | in %s rows/s | out %s rows/s (%.1f MB/s) | %s%s", 100 * st["fill"],
                     f"{st['writes_per_s']:,.0f}", f"{st['reads_per_s']:,.0f}",
                     st["reads_per_s"] * st["row_bytes"] / 1e6, gens, slowest_group(st["groups"]))
            last_line = time.time()


def slowest_group(groups: list[dict]) -> str:
    """' | N groups, slowest NAME (lag L rows, R rows/s)' for the status line; '' without groups."""
    if not groups:
        return ""
    g = max(groups, key=lambda g: g["lag"])
    return f" | {len(groups)} groups, slowest {g['name']} (lag {g['lag']:,} rows, {g['rows_per_s']:,.0f} rows/s)"


def guarded(fn):
    """Run one periodic job; an error is logged, never allowed to end the watch."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        log.error("%s failed: %s: %s", getattr(fn, "__name__", fn), type(e).__name__, e)
        return None

