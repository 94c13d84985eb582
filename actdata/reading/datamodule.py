"""`ActivationDataModule`: a LightningDataModule over actdata server(s). The only module of the trainer's
side that imports Lightning (`actdata.ActivationDataModule` loads it on first use)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

from torch.utils.data import DataLoader

from .dataset import RemoteActivationDataset, make_loader

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    try:
        import pytorch_lightning as pl
    except ImportError:
        raise ImportError("ActivationDataModule needs Lightning: pip install 'actdata[lightning]' "
                          "(RemoteActivationDataset and ActivationClient do not)") from None


class ActivationDataModule(pl.LightningDataModule):
    """A LightningDataModule whose `train_dataloader()` streams from actdata server(s).

    The stream is endless (unless `max_batches` / `max_samples`): run the Trainer by `max_steps`. Each
    DDP rank reads its own share (the dataset finds its rank from torch.distributed); Lightning adds no
    sampler to an IterableDataset. Keeps: url(s) (None = $ACTDATA_URL or localhost:8000), batch_size (None
    = min(4096, the server's per-request maximum)), num_workers, pin_memory, prefetch_factor,
    persistent_workers, and every other keyword for RemoteActivationDataset (dtype, api_key, timeout,
    retry_for_s, max_batches, max_samples, rcvbuf, local).
    """

    def __init__(self, url: Union[None, str, Sequence[str]] = None, batch_size: Optional[int] = None,
                 num_workers: int = 2, pin_memory: bool = True, prefetch_factor: int = 2,
                 persistent_workers: bool = True, **dataset_kwargs):
        super().__init__()
        self.url, self.batch_size, self.num_workers = url, batch_size, num_workers
        self.pin_memory, self.prefetch_factor, self.persistent_workers = pin_memory, prefetch_factor, persistent_workers
        self.dataset_kwargs = dataset_kwargs

    def dataset(self) -> RemoteActivationDataset:
        return RemoteActivationDataset(self.url, batch_size=self.batch_size, **self.dataset_kwargs)

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.dataset(), self.num_workers, pin_memory=self.pin_memory,
                           prefetch_factor=self.prefetch_factor, persistent_workers=self.persistent_workers)
