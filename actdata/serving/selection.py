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
    if cfg.generator.source == "store":
        from ..storage.catalog import stored_point_names

        return stored_point_names(cfg.store.path, sample_shape)
    return pts.configured(cfg, sample_shape)


def selected(query: Optional[str], names: list[str]) -> Optional[list[int]]:
    """The point indices a request's `points=` text selects (None: whole rows). Raises PointsError."""
    if query is None:
        return None
    entries, _ = pts.parse(query)
    return pts.resolve(entries, names)
