"""`build_loader(cfg, split)`: one interface over the torch and ffcv backends.

Both yield (images float (B, C, S, S) in [0, 1] on the target device, labels int64 (B,)), C = the preset's channels
(ffcv: 3 only); normalization belongs to the model. Train split: RandomResizedCrop(scale=(crop_scale_min, 1)) +
horizontal flip, shuffled per epoch, last incomplete batch dropped (drop_last=True, so every rank takes the same
number of steps). Val split: resize + center crop, fixed order, last partial batch kept. Ranks read disjoint
shards. `subset` restricts either split to a seeded choice of images (the same choice for every world size);
`shard_block` deals whole runs of positions to ranks (see ShardSampler).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from guard_fast.data.batches import Loader
from guard_fast.data.classes import beton_classes, check_same_classes, folder_classes
from guard_fast.data.folder import FolderDataset, ShardSampler, collate_skipping
from guard_fast.data.presets import resolve_dataset
from guard_fast.runtime.config import DataConfig
from guard_fast.runtime.errors import GuardFastError

SPLITS = ("train", "val")


def split_path(cfg: DataConfig, split: str) -> Path:
    root = Path(cfg.path)
    return root / (f"{split}.beton" if cfg.backend == "ffcv" else split)


def missing_hint(cfg: DataConfig, split: str) -> str:
    if cfg.backend == "ffcv":
        return (f" (write it from an ImageFolder: guard-fast data to-ffcv --src {Path(cfg.path) / split} "
                f"--out {split_path(cfg, split)})")
    if cfg.dataset in ("digits", "fashion-mnist", "mnist"):
        return f" (run: guard-fast data prepare-{cfg.dataset} --out {cfg.path})"
    return ""


def build_loader(cfg: DataConfig, split: str, *, rank: int = 0, world: int = 1, device: torch.device | str = "cpu",
                 seed: int = 0, train: bool | None = None, batch_size: int | None = None,
                 drop_last: bool | None = None, subset: int = 0, subset_seed: int = 0,
                 shard_block: int = 1) -> Loader:
    """Loader for `split` ('train' or 'val') of this rank. `train` (default: split == 'train') picks augmentation,
    shuffling and drop_last; `batch_size` defaults to data.batch_size (train) or data.eval_batch_size.

    subset > 0: only a seeded (subset_seed), sorted choice of `subset` images of the split (all of it if subset >= its
    size). shard_block: consecutive positions dealt to each rank in turn; pass the batch size to give every rank
    whole batches of the 1-rank order."""
    if split not in SPLITS:
        raise GuardFastError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    train = (split == "train") if train is None else train
    drop_last = train if drop_last is None else drop_last
    batch_size = batch_size or (cfg.batch_size if train else cfg.eval_batch_size)
    device = torch.device(device)
    spec = resolve_dataset(cfg)
    if cfg.backend == "ffcv" and spec.channels != 3:  # FFCV stores RGB only; replicating grayscale changes the data
        raise GuardFastError(f"data.backend = 'ffcv' stores RGB images; data.dataset = {cfg.dataset!r} has "
                             f"{spec.channels} channel(s): use data.backend = 'torch'")
    path = split_path(cfg, split)
    if not path.exists():
        raise GuardFastError(f"data.path: {path} not found{missing_hint(cfg, split)}")
    if cfg.backend == "ffcv":
        from guard_fast.data.ffcv_backend import build_ffcv_loader

        loader = build_ffcv_loader(cfg, spec, path, train=train, rank=rank, world=world, device=device, seed=seed,
                                   batch_size=batch_size, drop_last=drop_last, subset=subset,
                                   subset_seed=subset_seed, shard_block=shard_block)  # checks the file itself first
        loader.classes = beton_classes(path)
        if split == "val" and (train_path := split_path(cfg, "train")).exists():
            check_same_classes(beton_classes(train_path), loader.classes, train_path, path)
        return loader
    ds = FolderDataset(path, spec.image_size, train, cfg.crop_scale_min, spec.crop_ratio, seed, cfg.skip_corrupt,
                       spec.channels)
    if split == "val" and (train_path := split_path(cfg, "train")).is_dir():
        check_same_classes(folder_classes(train_path), ds.classes, train_path, path)
    if len(ds.classes) != spec.num_classes:
        raise GuardFastError(f"{path}: {len(ds.classes)} class folders, but the config/preset says "
                             f"{spec.num_classes} classes (data.num_classes)")
    sampler = ShardSampler(len(ds), rank, world, shuffle=train, seed=seed, even=drop_last, subset=subset,
                           subset_seed=subset_seed, block=shard_block)
    dl = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=cfg.workers, drop_last=drop_last,
                    collate_fn=collate_skipping, pin_memory=device.type == "cuda",
                    persistent_workers=cfg.workers > 0)
    return Loader(dl, sampler, spec, ds.classes, len(sampler.chosen()), device, split_samples=len(ds))
