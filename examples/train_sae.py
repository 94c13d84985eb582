"""Train a TopK sparse autoencoder with Lightning on activations streamed from an actdata server.

    python -m actdata.serve +preset=test                       # in one shell (prints its URL)
    python examples/train_sae.py --url http://127.0.0.1:8000   # in another (no --url: $ACTDATA_URL or localhost:8000)
    python examples/train_sae.py --url URL --in-memory         # same rows, pulled once, from memory
    python examples/train_sae.py --url URL --compare           # in-memory, then served: ratio of steps/s (P4)

The row shape and the default batch size come from the server's /stats: rows [d] are used as they are,
rows such as [n_points, n_layers, d] are flattened to one vector; a batch is 1,024 rows or less where the
server's buffer or per-request maximum is smaller. Inputs are scaled by one constant (estimated on the
first batch) so that the mean squared norm of a row is d_in. Prints loss, fraction of variance explained
(FVE) and samples/s every --log-every steps, and a final `RESULT` line.
"""
from __future__ import annotations

import argparse
import math
import time

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from actdata import ActivationClient, ActivationServerError, RemoteActivationDataset, ServerLimits
from actdata.reading.dataset import make_loader


class TopKSAE(pl.LightningModule):
    """x -> z = TopK(ReLU(W_enc (x - b_dec) + b_enc)) -> x_hat = W_dec z + b_dec, loss = MSE."""

    def __init__(self, d_in: int, d_sae: int, k: int, lr: float, scale: float):
        super().__init__()
        self.k, self.lr, self.scale = k, lr, scale
        self.W_enc = nn.Parameter(torch.randn(d_in, d_sae) / math.sqrt(d_in))
        self.W_dec = nn.Parameter(self.W_enc.detach().t().clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.last: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        top = pre.topk(self.k, dim=-1)
        z = torch.zeros_like(pre).scatter_(-1, top.indices, top.values)
        return z @ self.W_dec + self.b_dec

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = batch.reshape(len(batch), -1).float() * self.scale
        x_hat = self(x)
        loss = (x_hat - x).pow(2).sum(-1).mean()
        with torch.no_grad():
            fve = 1 - (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        self.last = {"loss": loss.item(), "fve": fve.item(), "rows": len(x)}
        return loss

    def on_after_backward(self) -> None:  # keep decoder rows unit-norm: no gradient along the norm
        with torch.no_grad():
            n = self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
            self.W_dec.grad -= (self.W_dec.grad * self.W_dec / n).sum(1, keepdim=True) * self.W_dec / n

    def on_train_batch_end(self, *args) -> None:
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class Meter(pl.Callback):
    """Prints loss / FVE / samples/s; steps/s is measured after `warmup` steps (start-up excluded)."""

    def __init__(self, label: str, log_every: int, warmup: int):
        self.label, self.log_every, self.warmup = label, log_every, warmup
        self.t0 = self.rows = None
        self.steps_per_s = self.samples_per_s = float("nan")
        self.last: dict = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.last = module.last
        if step == self.warmup:
            self.t0, self.rows = time.perf_counter(), 0
        elif self.t0 is not None:
            self.rows += module.last["rows"]
            dt = time.perf_counter() - self.t0
            self.steps_per_s, self.samples_per_s = (step - self.warmup) / dt, self.rows / dt
        if step % self.log_every == 0 or step == trainer.max_steps:
            speed = (f"{self.samples_per_s:,.0f} samples/s  {self.steps_per_s:.2f} steps/s"
                     if step > self.warmup else f"(speed measured after {self.warmup} warm-up steps)")
            print(f"[{self.label}] step {step:5d}  loss {module.last['loss']:.4g}  FVE {module.last['fve']:.3f}  "
                  f"{speed}", flush=True)


class InMemory(IterableDataset):
    """Endless random batches (without replacement within a pass) from rows held in memory."""

    def __init__(self, rows: torch.Tensor, batch_size: int):
        self.rows, self.batch_size = rows, batch_size

    def __iter__(self):
        n = len(self.rows) // self.batch_size
        while True:
            for i in torch.randperm(n).tolist():
                yield self.rows[i * self.batch_size:(i + 1) * self.batch_size]


def fit(label: str, loader: DataLoader, d_in: int, args) -> Meter:
    torch.manual_seed(0)
    meter = Meter(label, args.log_every, args.warmup)
    model = TopKSAE(d_in, args.expansion * d_in, args.k, args.lr, args.scale)
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[meter])
    trainer.fit(model, train_dataloaders=loader)
    print(f"RESULT mode={label} steps={args.steps} batch={args.batch_size} d_in={d_in} d_sae={args.expansion * d_in} "
          f"k={args.k} loss={meter.last.get('loss', float('nan')):.4g} fve={meter.last.get('fve', float('nan')):.3f} "
          f"steps_per_s={meter.steps_per_s:.3f} samples_per_s={meter.samples_per_s:.0f}", flush=True)
    return meter


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="actdata server URL (default: $ACTDATA_URL, else http://localhost:8000)")
    p.add_argument("--api-key", default=None, help="default: $ACTDATA_API_KEY")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--in-memory", action="store_true", help="pull rows once, then train from memory")
    mode.add_argument("--compare", action="store_true", help="in-memory, then served; print the ratio")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=None, help="default: 1024, or what the server allows")
    p.add_argument("--expansion", type=int, default=4, help="d_sae = expansion * d_in")
    p.add_argument("--k", type=int, default=32, help="active latents per row")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers for the served mode")
    p.add_argument("--memory-batches", type=int, default=50, help="batches pulled for the in-memory mode")
    p.add_argument("--warmup", type=int, default=10, help="steps before steps/s is measured")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=None, help="torch threads for training")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    client = ActivationClient(args.url, api_key=args.api_key)
    if not client.health_check():
        raise SystemExit(f"{client.url}: no actdata server answers; start one (./scripts/serve.sh) or give --url")
    try:
        st = client.get_stats()
        args.batch_size = args.batch_size or ServerLimits.from_stats(st).batch(1024)
        if not client.wait_for_data(args.batch_size, timeout=300):
            raise SystemExit(f"{client.url}: no {args.batch_size} ready rows within 300 s")
    except ActivationServerError as e:
        raise SystemExit(f"{e}") from None
    shape = st["sample_shape"]
    d_in = math.prod(shape)
    first, _ = client.get_activations_tensor(args.batch_size)
    first = first.reshape(len(first), -1).float()
    args.scale = float(math.sqrt(d_in / first.pow(2).sum(-1).mean().clamp_min(1e-12)))
    print(f"server {client.url}: rows {shape} {st['dtype']} -> d_in {d_in}; SAE d_sae {args.expansion * d_in}, "
          f"k {args.k}; batch {args.batch_size}, {args.steps} steps; input scale {args.scale:.4g}")

    results = {}
    if args.in_memory or args.compare:  # first, so that no DataLoader workers or refill run beside it
        n = max(1, args.memory_batches)
        rows = torch.cat([client.get_activations_tensor(args.batch_size)[0] for _ in range(n)])
        print(f"in-memory: {len(rows):,} rows pulled once ({rows.numel() * rows.element_size() / 1e6:.0f} MB)")
        client.wait_for_data(int(0.99 * st["capacity"]), timeout=30)  # let the server refill before timing
        loader = DataLoader(InMemory(rows, args.batch_size), batch_size=None, num_workers=0)
        results["in-memory"] = fit("in-memory", loader, d_in, args)
        del rows, loader
    if not args.in_memory:
        ds = RemoteActivationDataset(client.url, batch_size=args.batch_size, api_key=args.api_key)
        results["served"] = fit("served", make_loader(ds, args.num_workers), d_in, args)
    if len(results) == 2:
        ratio = results["served"].steps_per_s / results["in-memory"].steps_per_s
        print(f"RESULT P4 served/in-memory steps/s = {results['served'].steps_per_s:.3f} / "
              f"{results['in-memory'].steps_per_s:.3f} = {ratio:.2f} (goal >= 0.9)")
    client.close()


if __name__ == "__main__":
    main()
