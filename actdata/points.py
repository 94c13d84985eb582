"""Point selection, defined once: what a row's points are, their names, how a selection is written and
resolved, and how many rows of a selection one request may carry.

A row `[*lead, width]` holds prod(lead) points of `width` values (a row `[width]` holds one); point i is
`row.reshape(-1, width)[i]`. A model's rows are `[sites, layers, width]`, so the points are site-major:
point `s * n_layers + l` is site s at layer l. Their names are written as the config writes them:
`site@block` (`resid_post@6`, `model.layers.{layer}.mlp.act_fn:output@3`) for a site captured per layer,
the site itself for a raw site captured once. Rows whose shape the config's sites x layers do not
describe (the synthetic source's `buffer.sample_shape`, a datasets directory) name each point by its
index: "0", "1", ...

A selection is a list of indices and names (`?points=0,mlp_out@6` on the wire), in the order wanted, each
point at most once. An answer holds `[k, len(selection), width]`: the points axis stays for a single point
too, so the shape of an answer never depends on how many points were asked for. The client squeezes it
(trainers take `[B, d]` batches) when `points=` is one index or name rather than a list.
"""
from __future__ import annotations

import math
import re
import urllib.parse
from typing import Mapping, NamedTuple, Optional, Sequence, Union

from .config import SITES, Config

QUERY = "points"  # GET /activations/tensor?num_samples=N&points=0,resid_post@6
MAX_LISTED = 64  # names an error lists before it says how many more there are
Selection = Union[int, str, Sequence[Union[int, str]]]


class PointsError(ValueError):
    """A selection that is malformed, names no point of the row or one point twice; the message says
    which entry and lists the row's points."""


def count(sample_shape: Sequence[int]) -> int:
    """Points per row."""
    return math.prod(sample_shape[:-1]) if len(sample_shape) > 1 else 1


def point_names(sample_shape: Sequence[int], sites: Optional[Sequence[str]] = None, layers=None) -> list[str]:
    """Names of the points of rows of `sample_shape` captured at `sites` x `layers` (generator.sites and
    generator.layers as the config or a store's manifest writes them; "all" = every block, in order)."""
    shape, n = tuple(int(x) for x in sample_shape), count(sample_shape)
    if sites:
        sites = [str(s) for s in sites]
        layered = lambda s: s in SITES or "{layer}" in s  # noqa: E731
        if not any(map(layered, sites)):
            blocks = [None]  # raw sites only, each captured once
        elif layers == "all":
            blocks = list(range(shape[1])) if len(shape) == 3 else None
        else:
            blocks = [int(b) for b in layers] if isinstance(layers, (list, tuple)) else None
        fits = blocks is not None and (shape[:-1] == (len(sites), len(blocks)) or (len(shape) == 1 and
                                                                                  len(sites) * len(blocks) == 1))
        if fits:
            return [f"{s}@{b}" if b is not None and layered(s) else s for s in sites for b in blocks]
    return [str(i) for i in range(n)]


def configured(cfg: Config, sample_shape: Sequence[int]) -> list[str]:
    """Names of the points of the rows this config's generator makes (a model, or the synthetic source)."""
    g = cfg.generator
    return point_names(sample_shape, list(g.sites), g.layers if isinstance(g.layers, str) else list(g.layers))


def parse(selection: Selection) -> tuple[list[Union[int, str]], bool]:
    """(entries, single) of a selection given as query text ("0,resid_post@6"), an index, a name, or a
    list of them; `single`: one index or name, not a list (the client then drops the points axis).
    Entries that are decimal integers are indices, the others names."""
    if isinstance(selection, bool):
        raise PointsError(f"points: expected indices or names, got {selection!r}")
    if isinstance(selection, str):
        parts = selection.split(",")
        single = len(parts) == 1
    elif isinstance(selection, int) or hasattr(selection, "__index__"):  # numpy integers too
        parts, single = [selection], True
    elif hasattr(selection, "__iter__"):
        parts, single = list(selection), False
    else:
        raise PointsError(f"points: expected indices or names, got {type(selection).__name__}")
    out: list[Union[int, str]] = []
    for p in parts:
        if isinstance(p, bool) or not isinstance(p, (int, str)) and not hasattr(p, "__index__"):
            raise PointsError(f"points: {p!r} is neither an index nor a name")
        if not isinstance(p, str):
            out.append(int(p))
            continue
        if not p:
            raise PointsError("points: an empty entry (write indices or names separated by commas)")
        number = p.isdecimal() or (p[0] == "-" and p[1:].isdecimal())
        if number and str(int(p)) != p:
            raise PointsError(f"points: {p!r} is not an index as written here (e.g. 3, not 03)")
        out.append(int(p) if number else p)
    if not out:
        raise PointsError("points: an empty selection (name at least one point)")
    return out, single


def listing(names: Sequence[str]) -> str:
    """The row's points as an error lists them: `0=resid_post@0, 1=resid_post@1, ...`."""
    shown = ", ".join(f"{i}={name}" if name != str(i) else name for i, name in enumerate(names[:MAX_LISTED]))
    more = f", ... ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
    return f"{len(names)} point{'s' if len(names) != 1 else ''}: {shown}{more}"


def resolve(entries: Sequence[Union[int, str]], names: Sequence[str]) -> list[int]:
    """Indices of the points `entries` select, in their order. Raises PointsError naming the entry."""
    lookup = {name: i for i, name in enumerate(names)}
    out: list[int] = []
    for e in entries:
        if isinstance(e, int):
            if not 0 <= e < len(names):
                raise PointsError(f"points: index {e} is out of range; the row has {listing(names)}")
            i = e
        elif e in lookup:
            i = lookup[e]
        else:
            raise PointsError(f"points: no point is named {e!r}; the row has {listing(names)}")
        if i in out:
            raise PointsError(f"points: {e!r} selects point {i} ({names[i]}) a second time; name each point once")
        out.append(i)
    return out


def pattern(names: Sequence[str]) -> str:
    """A regular expression (ECMA and Python) that matches exactly the selections `parse` + `resolve`
    accept: indices and names separated by commas, each point once (by index or by name)."""
    alias = [str(i) if n == str(i) else f"{i}|{re.escape(n)}" for i, n in enumerate(names)]
    token = "|".join(alias)
    once = "".join(f"(?!(?:.*,)?(?:{a})(?:,.*)?,(?:{a})(?:,|$))" for a in alias)
    return f"^{once}(?:{token})(?:,(?:{token}))*$"


def text(entries: Sequence[Union[int, str]]) -> str:
    """A selection as the query writes it (the caller URL-encodes it)."""
    return ",".join(str(e) for e in entries)


def shape(sample_shape: Sequence[int], selected: Sequence[int]) -> tuple[int, int]:
    """The shape of one answered row of the selection: (points selected, width)."""
    return len(selected), int(sample_shape[-1])


def rows_per_request(request: Mapping[str, int], row_bytes: int) -> int:
    """Rows of `row_bytes` one tensor request may carry, from a server's request limits (`GET /stats`,
    server.request_limits): at most `rows`, `bytes` of rows, and `memory` bytes of response memory with
    `extra` bytes per row of provenance (half the process's budget: an answer costs its rows twice while
    sent)."""
    row_bytes = max(1, int(row_bytes))
    return max(1, min(int(request["rows"]), int(request["bytes"]) // row_bytes,
                      int(request["memory"]) // (row_bytes + int(request.get("extra", 0)))))


class Picked(NamedTuple):
    """A reader's selection resolved against a server's points: what to ask for and what comes back."""

    indices: list[int]
    wire_shape: tuple[int, int]  # one row of the answer: (points selected, width)
    shape: tuple[int, ...]  # one row as the reader hands it on: (width,) for a single point, else wire_shape

    @property
    def query(self) -> str:
        return text(self.indices)


def pick(selection: Selection, names: Sequence[str], sample_shape: Sequence[int]) -> Picked:
    """`selection` (as a reader gives it: index, name, list, or query text) resolved against the server's
    point names. Raises PointsError."""
    entries, single = parse(selection)
    indices = resolve(entries, names)
    wire_shape = shape(sample_shape, indices)
    return Picked(indices, wire_shape, wire_shape[1:] if single else wire_shape)


def quoted(query: str) -> str:
    """A selection's text as it goes into a URL's query."""
    return urllib.parse.quote(query, safe=",@:.")
