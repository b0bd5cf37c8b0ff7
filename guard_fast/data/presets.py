"""Named dataset presets: class count, image size, normalization, validation crop and default model."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from guard_fast.runtime.config import DataConfig
from guard_fast.runtime.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    """class count (0 = read from the train folder)"""
    image_size: int
    """model input side in pixels"""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_ratio: float
    """validation: resize to image_size / crop_ratio, center-crop image_size"""
    arch: str
    """default model for this dataset"""
    channels: int = 3
    """image channels the data and the model use: 3 (RGB) or 1 (grayscale, read and trained as one channel)"""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the model's input: one channel per normalization mean."""
        return len(self.mean), self.image_size, self.image_size


DATASETS = {
    # scikit-learn's 1,797 8x8 handwritten digits, upscaled (guard-fast data prepare-digits). Mean/std measured on
    # the 32 px train split written by prepare-digits (tests/data/test_data.py re-measures them).
    "digits": DatasetSpec("digits", 10, 32, (0.3095,) * 3, (0.3489,) * 3, 1.0, "resnet18-cifar"),
    # Native single-channel 28 px data (guard-fast data prepare-fashion-mnist / prepare-mnist): the standard
    # normalization (DC's code has 0.2861 for Fashion-MNIST, VICO-UoE/DatasetCondensation utils.py:28), DC's ConvNet.
    "fashion-mnist": DatasetSpec("fashion-mnist", 10, 28, (0.2860,), (0.3530,), 1.0, "convnet", channels=1),
    "mnist": DatasetSpec("mnist", 10, 28, (0.1307,), (0.3081,), 1.0, "convnet", channels=1),
    "imagenette": DatasetSpec("imagenette", 10, 224, IMAGENET_MEAN, IMAGENET_STD, 0.875, "resnet18"),
    # SRe2L's Tiny-ImageNet statistics; its validation images are used at their native 64 px.
    "tiny-imagenet": DatasetSpec("tiny-imagenet", 200, 64, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262), 1.0,
                                 "resnet18-tiny"),
    "imagenet-1k": DatasetSpec("imagenet-1k", 1000, 224, IMAGENET_MEAN, IMAGENET_STD, 0.875, "resnet18"),
    "imagefolder": DatasetSpec("imagefolder", 0, 224, IMAGENET_MEAN, IMAGENET_STD, 0.875, "resnet18"),
}


def count_classes(root: str | Path) -> int:
    train = Path(root) / "train"
    return sum(1 for p in train.iterdir() if p.is_dir()) if train.is_dir() else 0


def resolve_dataset(cfg: DataConfig) -> DatasetSpec:
    """The preset with the config's non-zero/non-empty fields applied on top."""
    if cfg.dataset not in DATASETS:
        raise ConfigError(f"data.dataset = {cfg.dataset!r}: valid values are {', '.join(DATASETS)}")
    spec = DATASETS[cfg.dataset]
    num_classes = cfg.num_classes or spec.num_classes or count_classes(cfg.path)
    if num_classes <= 0:
        raise ConfigError(f"data.num_classes: cannot infer the class count from {cfg.path}/train; set it")
    for key in ("mean", "std"):
        if getattr(cfg, key) and len(getattr(cfg, key)) != spec.channels:
            raise ConfigError(f"data.{key} = {getattr(cfg, key)}: data.dataset = {cfg.dataset!r} has {spec.channels} "
                              f"channel(s); give {spec.channels} value(s) or none")
    return replace(spec, num_classes=num_classes, image_size=cfg.image_size or spec.image_size,
                   mean=tuple(cfg.mean) or spec.mean, std=tuple(cfg.std) or spec.std,
                   crop_ratio=cfg.crop_ratio or spec.crop_ratio)
