"""A sweep from one forward pass: four trainers, each its own consumer group, each receiving every row.

    python examples/sweep.py [--rows 4096] [--steps-log 8]

Starts one server on the embedded model (SmolLM2-135M on the embedded corpus) capturing the residual stream
after blocks 3 and 6 (rows [1, 2, 576]: two points), with room for four consumer groups and serving held until
all four have registered. Then four trainers in four processes, two layers x two sparsity levels (TopK k = 16
and 64): each reads as its own group (`group="L<layer>-k<k>"`), asks only for its layer's point by name
(`points="resid_post@<layer>"`, [B, 576] batches), and trains a small TopK sparse autoencoder on `--rows`
rows. At the end it prints, for each trainer, the rows it trained on beside the rows the server generated:
every trainer saw the same stream, which was generated once.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp

import torch

from actdata import ActivationClient, RemoteActivationDataset
from actdata.serve import ServerProcess

LAYERS = (3, 6)  # generator.layers: point i of a row is the residual stream after block LAYERS[i]
SPARSITY = (16, 64)


def train(url: str, point: int, k: int, rows: int, steps_log: int, results) -> None:
    """One trainer: its own group, its own layer, a TopK SAE on `rows` rows."""
    torch.manual_seed(point * 100 + k)
    group = f"L{LAYERS[point]}-k{k}"
    ds = RemoteActivationDataset(url, batch_size=256, max_samples=rows, group=group,
                                 points=f"resid_post@{LAYERS[point]}")
    d_in, seen, step, sae, opt = None, 0, 0, None, None
    for x in ds:
        x = x.float()
        if sae is None:  # the width comes with the first batch: [256, 576]
            d_in = x.shape[1]
            scale = math.sqrt(d_in / x.pow(2).sum(1).mean().item())
            sae = {"enc": torch.randn(d_in, 4 * d_in) / math.sqrt(d_in), "b": torch.zeros(d_in)}
            sae["dec"] = sae["enc"].t().clone()
            for p in sae.values():
                p.requires_grad_(True)
            opt = torch.optim.Adam(sae.values(), lr=1e-3)
        x = x * scale
        pre = torch.relu((x - sae["b"]) @ sae["enc"])
        top = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter_(-1, top.indices, top.values)
        loss = (z @ sae["dec"] + sae["b"] - x).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen, step = seen + len(x), step + 1
        if step % steps_log == 0:
            print(f"[{group}] step {step}  rows {seen:,}  loss {loss.item():.4g}", flush=True)
    results.put((group, seen, loss.item()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4096, help="rows each trainer trains on")
    p.add_argument("--steps-log", type=int, default=8, help="print every N steps")
    a = p.parse_args()
    groups = len(LAYERS) * len(SPARSITY)
    overrides = ["+preset=test", f"generator.layers=[{','.join(map(str, LAYERS))}]", "buffer.size=4096",
                 "buffer.min_fill=0", f"buffer.max_groups={groups}", f"buffer.groups_expected={groups}"]
    with ServerProcess(overrides) as srv:
        print(f"server {srv.url}: {groups} trainers, one group each", flush=True)
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        procs = [ctx.Process(target=train, args=(srv.url, i, k, a.rows, a.steps_log, results))
                 for i in range(len(LAYERS)) for k in SPARSITY]
        for proc in procs:
            proc.start()
        done = [results.get() for _ in procs]
        for proc in procs:
            proc.join()
        with ActivationClient(srv.url) as c:
            st = c.get_stats()
        print(f"\nrows generated (one forward pass each): {st['rows_written']:,}")
        print(f"{'trainer (group)':<16} {'rows trained on':>16} {'final loss':>12}")
        for group, seen, loss in sorted(done):
            print(f"{group:<16} {seen:>16,} {loss:>12.4g}")
        print("every trainer drew its rows from the one stream, each row at most once; without groups the four "
              "would have split the stream between them")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
