"""A generator's saved state: where it is in its share of the corpus, and its running statistics.

What it keeps, per generator g of G, in `generator.state_dir` (`auto` = `<cache>/actdata/state/<hash of the
config's identity>`, the cache being $ACTDATA_CACHE, $XDG_CACHE_HOME/actdata or ~/.cache/actdata; `null` =
nothing is kept and every start reads its share from the beginning):

    gen-<g>-of-<G>.json                 {"version", "identity", "g", "G", "position", "next_context",
                                         "next_id", "contexts", "tokens", "rows", "saved_at"}
    gen-<g>-of-<G>.stats.safetensors    RunningStats.tensors() of every row the generator wrote

`position` is the source's position right after the last batch handed to the buffer: the model source's
place in its text stream (generation.text: pass, documents, offset), the replay source's place in its store
(storage.replay: pass, shard index in the pass's order, row); `next_context` is the context counter (the
low 40 bits of the context ids); `next_id` is the synthetic source's next row id. The JSON file is written
(temp file + rename, so a reader sees the old or the new file, never half of one) BEFORE the batch is
committed to the buffer, so a generator killed at any moment restarts after every row that reached the
buffer: it may lose the batch in flight, never repeat one. The statistics are saved at most every
`STATS_EVERY_S` seconds and when the generator stops, so after a kill they may miss the last few seconds
of rows.

`identity` names what the position belongs to: model (name, revision, dtype), dataset (name, config,
split, column, seed, streaming, shuffle buffer), sites, layers, squeeze, context length, drop rules, source,
node_rank/num_nodes, buffer.dtype (the statistics are of the rows as stored), the synthetic row shape, and
for a replay the store (path, column, seed). A state file whose identity differs from the config (or that
cannot be parsed) is ignored with a log line naming it, and the generator starts fresh.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Optional

from ..config import Config, ConfigError
from ..host import cache_root

log = logging.getLogger(__name__)
VERSION = 1
STATS_EVERY_S = 5.0


def identity(cfg: Config) -> dict:
    """What a saved position belongs to: everything that changes which text becomes which row."""
    m, d, g, s = cfg.model, cfg.dataset, cfg.generator, cfg.server
    ident = {"source": g.source, "node_rank": s.node_rank, "num_nodes": s.num_nodes, "rows": cfg.buffer.dtype}
    if g.source == "synthetic":
        from ..config import synthetic_shape

        ident["shape"] = list(synthetic_shape(cfg))
    elif g.source == "store":
        path = cfg.store.path or ""
        ident["store"] = [path if "://" in path else os.path.abspath(path), cfg.store.column, cfg.store.seed]
    else:
        ident.update({"model": [m.name, m.revision, m.dtype],
                      "dataset": [d.name, d.config, d.split, d.text_column, d.seed, d.streaming, d.shuffle_buffer],
                      "sites": list(g.sites), "layers": g.layers if g.layers == "all" else list(g.layers),
                      "squeeze": g.squeeze, "context_length": g.context_length,
                      "drop": [g.drop_bos, g.drop_special, g.outlier_factor]})
    return ident


def identity_hash(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def state_dir(cfg: Config) -> Optional[str]:
    """The directory of this config's saved states, or None when resuming is off."""
    d = cfg.generator.state_dir
    if d is None or str(d).lower() in ("", "null", "none"):
        return None
    if d == "auto":
        return os.path.join(cache_root(), "state", identity_hash(identity(cfg)))
    return os.path.abspath(os.path.expanduser(str(d)))


def check_state_dir(cfg: Config) -> Optional[str]:
    """Create the state directory and prove it writable; ConfigError naming generator.state_dir if not."""
    d = state_dir(cfg)
    if d is None:
        return None
    probe = os.path.join(d, f".probe-{os.getpid()}")
    try:
        os.makedirs(d, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"generator.state_dir: cannot write saved positions to {d!r} ({e.strerror or e}); "
                          "point it at a writable directory or set it to null (no resume)") from None
    return d


class GeneratorState:
    """The saved state of generator g of G in `directory` (see the module docstring)."""

    def __init__(self, directory: str, g: int, G: int, ident: dict):
        self.g, self.G, self.identity = g, G, ident
        base = os.path.join(directory, f"gen-{g}-of-{G}")
        self.path, self.stats_path = base + ".json", base + ".stats.safetensors"
        self._stats_saved = 0.0

    @classmethod
    def for_config(cls, cfg: Config, g: int, G: int) -> Optional["GeneratorState"]:
        d = state_dir(cfg)
        if d is None:
            return None
        os.makedirs(d, exist_ok=True)
        return cls(d, g, G, identity(cfg))

    def load(self) -> Optional[dict]:
        """The saved state, or None (nothing saved, another config's state, or an unreadable file: logged)."""
        try:
            with open(self.path) as f:
                st = json.load(f)
        except FileNotFoundError:
            log.info("generator %d/%d: no saved position in %s; starting from the beginning of its share",
                     self.g, self.G, self.path)
            return None
        except (OSError, ValueError) as e:
            log.warning("generator %d/%d: ignoring the unreadable state file %s (%s); starting fresh",
                        self.g, self.G, self.path, e)
            return None
        if not isinstance(st, dict) or st.get("version") != VERSION or (st.get("g"), st.get("G")) != (self.g, self.G):
            log.warning("generator %d/%d: ignoring the foreign state file %s; starting fresh",
                        self.g, self.G, self.path)
            return None
        if st.get("identity") != json.loads(json.dumps(self.identity)):
            log.warning("generator %d/%d: the state in %s belongs to another config (%s); starting fresh",
                        self.g, self.G, self.path, _diff(st.get("identity"), self.identity))
            return None
        log.info("generator %d/%d: resuming from %s: position %s, %s contexts, %s tokens done", self.g, self.G,
                 self.path, st.get("position") or st.get("next_id"), st.get("contexts"), st.get("tokens"))
        return st

    def save(self, **fields) -> None:
        """Write the state atomically (temp file + rename; no fsync: a power cut may lose recent saves)."""
        st = {"version": VERSION, "identity": self.identity, "g": self.g, "G": self.G, "saved_at": time.time(),
              **fields}
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(st, f)
        os.replace(tmp, self.path)

    def load_stats(self, sample_shape: tuple):
        """The saved RunningStats of this generator's rows (None if absent, unreadable or of other rows)."""
        from ..stats import RunningStats

        if not os.path.exists(self.stats_path):
            return None
        try:
            from safetensors.torch import load_file

            stats = RunningStats.from_tensors(load_file(self.stats_path))
        except Exception as e:  # noqa: BLE001 - a bad file must not stop the generator
            log.warning("ignoring the unreadable statistics file %s (%s)", self.stats_path, e)
            return None
        if stats.sample_shape != tuple(sample_shape):
            log.warning("ignoring the statistics file %s: rows %s, not %s", self.stats_path,
                        list(stats.sample_shape), list(sample_shape))
            return None
        return stats

    def save_stats(self, stats, force: bool = False) -> bool:
        """Save the statistics if STATS_EVERY_S passed since the last save (or `force`); True if saved."""
        now = time.monotonic()
        if not force and now - self._stats_saved < STATS_EVERY_S:
            return False
        self._stats_saved = now
        write_stats(self.stats_path, stats)
        return True


def write_stats(path: str, stats) -> None:
    """RunningStats -> a safetensors file, atomically."""
    from safetensors.torch import save_file

    tmp = f"{path}.{os.getpid()}.tmp"
    save_file(stats.tensors(), tmp)
    os.replace(tmp, path)


def _diff(saved, now: dict) -> str:
    if not isinstance(saved, dict):
        return "no identity"
    keys = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    return ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys[:4])
