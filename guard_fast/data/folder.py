"""The `torch` loader backend: a checked ImageFolder, seeded per-sample augmentation and disjoint rank shards."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from guard_fast.data.augment import center_crop_box, resized_crop, sample_rrc
from guard_fast.runtime.errors import GuardFastError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def scan_folder(root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names sorted, [(file, class id)]) of a class-per-folder tree; errors name the offending path."""
    root = Path(root)
    if not root.is_dir():
        raise GuardFastError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise GuardFastError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    samples: list[tuple[str, int]] = []
    for c, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise GuardFastError(f"{root / name}: empty class folder (no {'/'.join(IMAGE_EXTENSIONS)} files)")
        samples.extend((str(f), c) for f in files)
    return classes, samples


def read_rgb(path: str, channels: int = 3) -> Image.Image:
    """Decode fully (so truncated files fail here, not later) and convert to the data's channels: RGB (grayscale,
    RGBA and palette images converted) or, with channels = 1, grayscale ("L"; an RGB file is refused, not mixed
    down, so a 3-channel set never reaches a 1-channel model)."""
    try:
        with Image.open(path) as img:
            img.load()
            if channels == 1:
                if img.mode not in ("L", "1", "P", "I;16"):
                    raise GuardFastError(f"{path}: a {img.mode} image in a 1-channel (grayscale) dataset; prepare "
                                         "the data as grayscale PNGs or use a 3-channel data preset")
                return img.convert("L")
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise GuardFastError(f"unreadable image {path}: {e}") from None


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB or L -> float (3 or 1, H, W) in [0, 1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    arr = arr.unsqueeze(-1) if arr.dim() == 2 else arr  # (H, W) grayscale -> (H, W, 1)
    return arr.permute(2, 0, 1).float().div_(255.0)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Independent stream per (seed, epoch, image): the same view whatever the worker count or rank."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


class FolderDataset(Dataset):
    """Items are requested as (index, epoch); train: RandomResizedCrop + flip, val: resize + center crop."""

    def __init__(self, root: str | Path, size: int, train: bool, crop_scale_min: float = 0.08,
                 crop_ratio: float = 0.875, seed: int = 0, skip_corrupt: bool = False, channels: int = 3):
        self.classes, self.samples = scan_folder(root)
        self.channels = channels
        self.size, self.train, self.seed = size, train, seed
        self.scale = (crop_scale_min, 1.0)
        self.crop_ratio = crop_ratio
        self.skip_corrupt = skip_corrupt

    def __len__(self) -> int:
        return len(self.samples)

    def view(self, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        _, h, w = img.shape
        if self.train:
            out = resized_crop(img, sample_rrc(gen, h, w, self.scale), self.size)
            if bool(torch.rand(1, generator=gen) < 0.5):
                out = out.flip(-1)
            return out
        return resized_crop(img, center_crop_box(h, w, self.crop_ratio), self.size)

    def __getitem__(self, item: tuple[int, int]):
        index, epoch = item
        path, label = self.samples[index]
        try:
            img = to_tensor(read_rgb(path, self.channels))
        except GuardFastError:
            if self.skip_corrupt:
                return None
            raise
        gen = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        return self.view(img, gen).clamp_(0.0, 1.0), label


def collate_skipping(batch):
    """Stack (image, label) pairs, dropping skipped (None) items; the third value counts them."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return torch.empty(0, 3, 1, 1), torch.empty(0, dtype=torch.int64), len(batch)
    x = torch.stack([b[0] for b in kept])
    y = torch.tensor([b[1] for b in kept], dtype=torch.int64)
    return x, y, len(batch) - len(kept)


class ShardSampler(Sampler):
    """Disjoint per-rank shards of a (seeded, per-epoch) permutation.

    train (even=True): the order is cut to a multiple of world so every rank gets the same number of samples (and
    steps); eval (even=False): rank r takes positions r, r+world, ... so the shards cover the set exactly once.

    subset > 0 keeps a seeded choice of `subset` indices (sorted; the same on every rank and world size) before
    shuffling and sharding. block > 1 deals whole runs of `block` consecutive positions round-robin instead of single
    positions; with block = batch size every rank's batches are exactly batches of the 1-rank order (rank r gets
    batches r, r + world, ...), which is what per-batch seeded attacks need to agree across world sizes.
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, shuffle: bool = False, seed: int = 0,
                 even: bool = True, subset: int = 0, subset_seed: int = 0, block: int = 1):
        if subset < 0 or block < 1:
            raise ValueError(f"ShardSampler: subset = {subset} must be >= 0 and block = {block} >= 1")
        self.n, self.rank, self.world, self.shuffle, self.seed, self.even = n, rank, world, shuffle, seed, even
        self.subset, self.subset_seed, self.block = subset, subset_seed, block
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def chosen(self) -> torch.Tensor:
        """The indices this sampler draws from: all n, or the seeded sorted subset."""
        if not self.subset or self.subset >= self.n:
            return torch.arange(self.n)
        pick = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.subset_seed))[: self.subset]
        return pick.sort().values

    def indices(self) -> list[int]:
        base = self.chosen()
        m = len(base)
        if self.shuffle:
            order = base[torch.randperm(m, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))]
        else:
            order = base
        if self.block == 1:
            if self.even:
                order = order[: m - m % self.world]
            return order[self.rank:: self.world].tolist()
        if self.even:
            order = order[: m - m % (self.world * self.block)]
        position = torch.arange(len(order))
        return order[(position // self.block) % self.world == self.rank].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(i, self.epoch) for i in self.indices()])

    def __len__(self) -> int:
        if self.subset or self.block > 1:
            return len(self.indices())
        return (self.n // self.world) if self.even else len(range(self.rank, self.n, self.world))
