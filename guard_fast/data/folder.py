"""The `torch` loader backend: a checked ImageFolder, seeded per-sample augmentation and disjoint rank shards."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from guard_fast.augment import center_crop_box, resized_crop, sample_rrc
from guard_fast.errors import GuardFastError

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


def read_rgb(path: str) -> Image.Image:
    """Decode fully (so truncated files fail here, not later) and convert grayscale/RGBA/palette to RGB."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise GuardFastError(f"unreadable image {path}: {e}") from None


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float (3, H, W) in [0, 1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div_(255.0)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Independent stream per (seed, epoch, image): the same view whatever the worker count or rank."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


class FolderDataset(Dataset):
    """Items are requested as (index, epoch); train: RandomResizedCrop + flip, val: resize + center crop."""

    def __init__(self, root: str | Path, size: int, train: bool, crop_scale_min: float = 0.08,
                 crop_ratio: float = 0.875, seed: int = 0, skip_corrupt: bool = False):
        self.classes, self.samples = scan_folder(root)
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
            img = to_tensor(read_rgb(path))
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
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, shuffle: bool = False, seed: int = 0,
                 even: bool = True):
        self.n, self.rank, self.world, self.shuffle, self.seed, self.even = n, rank, world, shuffle, seed, even
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
        else:
            order = torch.arange(self.n)
        if self.even:
            order = order[: self.n - self.n % self.world]
        return order[self.rank:: self.world].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(i, self.epoch) for i in self.indices()])

    def __len__(self) -> int:
        return (self.n // self.world) if self.even else len(range(self.rank, self.n, self.world))
