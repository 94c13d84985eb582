"""Who reads what: a DataLoader worker of a DDP rank is one shard of the stream, and each shard has its
share of the server URLs and of a row or batch limit. Defined once for URL lists and cluster directories."""
from __future__ import annotations

import os
from typing import Optional

import torch


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world_size): from torch.distributed when initialised, else $RANK / $WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def split_evenly(total: Optional[int], parts: int, index: int) -> Optional[int]:
    """Part `index` of `total` split into `parts` whole numbers that differ by at most one (None: no limit)."""
    if total is None:
        return None
    return total // parts + (1 if index < total % parts else 0)


def share(urls: list[str], index: int, shards: int) -> list[str]:
    """The URLs shard `index` of `shards` reads: with at least as many shards as URLs, shard i reads URL
    i % n (every URL is read); with fewer, shard i reads URLs i, i + shards, ... in turn."""
    if not urls:
        return []
    if shards >= len(urls):
        return [urls[index % len(urls)]]
    return urls[index::shards]
