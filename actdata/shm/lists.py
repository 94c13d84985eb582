"""The buffer's index lists (FREE slots, READY slots, a consumer group's unread slots): an O(k) uniform
random take with swap-remove from the tail, and NotReady, the answer when a list holds too few."""
from __future__ import annotations

import numpy as np


class NotReady(RuntimeError):
    """The buffer cannot serve this request yet (below min_fill, or fewer READY rows than asked)."""


def take(lst: np.ndarray, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Remove k uniformly random entries from lst[:n] in O(k) and return them (int64); lst[:n - k] keeps the rest."""
    if k <= 0:
        return np.empty(0, np.int64)
    return remove_at(lst, n, rng.choice(n, size=k, replace=False, shuffle=False))


def remove_at(lst: np.ndarray, n: int, pos: np.ndarray) -> np.ndarray:
    """Remove the entries at the distinct positions `pos` of lst[:n] and return them (int64)."""
    k = len(pos)
    taken = lst[pos].astype(np.int64)
    tail = n - k
    keep = np.ones(k, dtype=bool)
    keep[pos[pos >= tail] - tail] = False  # tail entries that were themselves taken
    lst[pos[pos < tail]] = lst[tail:n][keep]  # fill the holes with the surviving tail
    return taken
