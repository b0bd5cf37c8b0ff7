"""`Loader`: what every loader backend returns (device batches, epochs, dataset facts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from guard_fast.data.presets import DatasetSpec


@dataclass
class Loader:
    """Iterable of device batches with `set_epoch`, `len` (batches per epoch on this rank) and dataset facts."""

    batches: Any  # the backend's iterable (torch DataLoader or ffcv Loader)
    sampler: Any  # object with set_epoch(epoch), or None when the backend handles epochs itself
    spec: DatasetSpec
    classes: list[str]
    num_samples: int  # images this loader visits over all ranks: the whole split, or the subset
    device: torch.device
    skipped: int = 0  # unreadable images skipped so far (data.skip_corrupt)
    split_samples: int = 0  # images in the whole split, before any subset (0 = unknown)

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        non_blocking = self.device.type == "cuda"
        for batch in self.batches:
            x, y = batch[0], batch[1]
            if len(batch) > 2:
                self.skipped += int(batch[2])
                if x.shape[0] == 0:
                    continue
            yield x.to(self.device, non_blocking=non_blocking), y.to(self.device, non_blocking=non_blocking)
