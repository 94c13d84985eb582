"""A generator's progress: its totals, the saved state it resumes from, and its running statistics.

`Progress` is kept by the generation loop for generator g of G. Before each batch is committed to the
buffer it adds the batch's counters to the totals, saves the position right after the batch
(generation.state, when `generator.state_dir` is set) and folds the rows into a RunningStats (when
`statistics_enabled`), which it publishes beside the buffer (`sidefiles.generator_stats`, merged by GET
/statistics) every few seconds. `read_statistics` reads back every generator's published statistics.
"""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from ..config import Config
from ..shm import BufferSpec, sidefiles
from ..stats import RunningStats
from .source import BatchInfo
from .state import STATS_EVERY_S, GeneratorState, write_stats
from .statistics import StatsWorker

RESERVE_IDS = 1 << 16  # synthetic ids saved ahead of use (a restart skips at most this many)
PUBLISH_EVERY_S = min(2.0, STATS_EVERY_S)  # the statistics beside the buffer are at most this old


def statistics_enabled(cfg: Config) -> bool:
    """generator.statistics, where null means on (for every source: they are reduced beside the writer)."""
    s = cfg.generator.statistics
    return True if s is None else bool(s)


def read_statistics(spec: BufferSpec) -> list[tuple[str, RunningStats]]:
    """(generator name, RunningStats) of every generator of this buffer that published statistics."""
    out = []
    for name, path in sidefiles.generator_stats_files(spec.path):
        try:
            out.append((name, RunningStats.from_tensors(load_file(path))))
        except Exception:  # noqa: BLE001 - being replaced right now, or torn by a crash: skip it
            continue
    return out


class Progress:
    """Totals, saved state and running statistics of generator `index` (g) of `count` (G)."""

    def __init__(self, cfg: Config, spec: BufferSpec, name: str, index: int, count: int):
        self.g, self.G, self.spec, self.name = index, count, spec, name
        self.state = GeneratorState.for_config(cfg, index, count)
        self.saved = (self.state.load() if self.state else None) or {}
        self.totals = {k: int(self.saved.get(k, 0)) for k in ("contexts", "tokens", "rows")}
        self.stats, self.worker = None, None
        if statistics_enabled(cfg):
            self.stats = ((self.state.load_stats(spec.sample_shape) if self.state else None)
                          or RunningStats(spec.sample_shape))
            self.worker = StatsWorker(self.stats, self._write_stats, PUBLISH_EVERY_S)
        self.publish_stats(force=True)

    def start(self) -> dict:
        """The state a (re)started source continues from: the latest saved (kept in memory too)."""
        return self.saved

    def before_commit(self, rows: torch.Tensor, info: BatchInfo) -> None:
        """Called with each batch before it is written: save the position after it, hand it to the
        statistics thread (the rows stay in use until `settle()`)."""
        for k, n in (("contexts", info.get("contexts", 0)), ("tokens", info.get("tokens", 0)), ("rows", len(rows))):
            self.totals[k] += int(n)
        reserved = "next_id" in info and self.state and info["next_id"] <= self.saved.get("next_id", -1)
        if not reserved:  # synthetic ids up to the reserved one are covered by the saved state already
            self._save(info)
        if self.worker is not None:
            if "moments" in info:
                self.worker.add(info["moments"])
            else:
                self.worker.reduce(rows)

    def settle(self) -> None:
        """Wait until the statistics thread is done with the rows of the last batch."""
        if self.worker is not None:
            self.worker.settle()

    def close(self) -> None:
        """Fold what is queued, stop the statistics thread and publish (and save) the final totals."""
        if self.worker is not None:
            self.worker.close()
            self.publish_stats(force=True)

    def _save(self, info: BatchInfo) -> None:
        self.saved = {k: info[k] for k in ("position", "next_context", "next_id") if k in info}
        if "next_id" in info:  # reserve ids ahead: a restart skips them instead of saving every batch
            self.saved["next_id"] = int(info["next_id"]) + RESERVE_IDS
        self.saved.update(self.totals)
        if self.state:
            self.state.save(**self.saved)

    def publish_stats(self, force: bool = False) -> None:
        """Publish the statistics beside the buffer (and save them with the state), at most every
        PUBLISH_EVERY_S seconds unless forced."""
        if self.worker is None:
            return
        self.worker.publish(force)

    def _write_stats(self, stats: RunningStats, force: bool) -> None:
        """The statistics thread's (or a forced) write: the side file, and the saved state's copy."""
        write_stats(sidefiles.generator_stats(self.spec.path, self.name), stats)
        if self.state:
            self.state.save_stats(stats, force=force)

    def position(self) -> dict:
        """For /stats: where this generator is (pass, documents, offset or next_id; totals done)."""
        pos = dict(self.saved.get("position") or {})
        if "next_id" in self.saved:
            pos["next_id"] = self.saved["next_id"]
        return {"g": self.g, "G": self.G, **pos, "contexts_done": self.totals["contexts"],
                "tokens_done": self.totals["tokens"], "rows_done": self.totals["rows"],
                "state_file": self.state.path if self.state else None}
