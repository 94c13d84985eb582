"""The points a server serves (actdata.points): their names, from the config or from the replayed
store's manifest, and a request's `points=` resolved against them (PointsError for a bad one: 422)."""
from __future__ import annotations

from typing import Optional

from .. import points as pts
from ..config import Config


def served_point_names(cfg: Config, sample_shape: tuple) -> list[str]:
    """Names of the points of the rows this config serves: a replay names them as its store's manifest
    does, a model and the synthetic source as generator.sites x generator.layers (indices where those do
    not describe the row)."""
    g = cfg.generator
    if g.source == "store":
        from ..storage.catalog import captured_at

        sites, layers = captured_at(cfg.store.path)
        return pts.point_names(sample_shape, sites, layers)
    return pts.point_names(sample_shape, list(g.sites), g.layers if isinstance(g.layers, str) else list(g.layers))


def selected(query: Optional[str], names: list[str]) -> Optional[list[int]]:
    """The point indices a request's `points=` text selects (None: whole rows). Raises PointsError."""
    if query is None:
        return None
    entries, _ = pts.parse(query)
    return pts.resolve(entries, names)
