"""The real train split as one in-memory uint8 tensor (trajectory matching samples it directly, like MTT's
`images_all`): every image of an ImageFolder, resized (whole image, bilinear with antialias) to the model input."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from guard_fast.data.augment import resized_crop
from guard_fast.data.folder import read_rgb, scan_folder, to_tensor
from guard_fast.data.presets import resolve_dataset
from guard_fast.runtime.config import DataConfig
from guard_fast.runtime.errors import GuardFastError


@dataclass
class RealSet:
    pixels: torch.Tensor  # (N, C, S, S) uint8, folder order; C = the preset's channels
    labels: torch.Tensor  # (N,) int64
    classes: list[str]

    def class_indices(self, c: int) -> torch.Tensor:
        return torch.nonzero(self.labels == c).flatten()


def load_real(cfg: DataConfig, split: str = "train", progress: bool = False) -> RealSet:
    """All images of data.path/<split> (torch-backend ImageFolder) at the preset's image size."""
    spec = resolve_dataset(cfg)
    root = Path(cfg.path) / split
    if not root.is_dir():
        hint = f" (run: guard-fast data prepare-{cfg.dataset} --out {cfg.path})" if cfg.dataset in (
            "digits", "fashion-mnist", "mnist") else ""
        raise GuardFastError(f"data.path: {root} not found; trajectory matching reads an ImageFolder{hint}")
    classes, samples = scan_folder(root)
    if len(classes) != spec.num_classes:
        raise GuardFastError(f"{root}: {len(classes)} class folders, but the config/preset says {spec.num_classes} "
                             "classes (data.num_classes)")
    size = spec.image_size
    pixels = torch.empty((len(samples), spec.channels, size, size), dtype=torch.uint8)
    for i, (path, _) in enumerate(tqdm(samples, desc=f"load {split}", disable=not progress)):
        pixels[i] = read_real(path, spec.channels, size)
    return RealSet(pixels, torch.tensor([c for _, c in samples], dtype=torch.int64), classes)


def read_real(path: str, channels: int, size: int) -> torch.Tensor:
    """One real image as the models see it: uint8 (channels, size, size), the whole image resized (bilinear with
    antialias) when its side differs from `size`."""
    x = to_tensor(read_rgb(path, channels))  # (C, H, W) in [0, 1]
    if x.shape[-2:] != (size, size):
        x = resized_crop(x, (0, 0, x.shape[-2], x.shape[-1]), size)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)
