"""The `ffcv` loader backend: ImageFolder -> .beton writer and a Loader over .beton files.

Decoding (JPEG or raw pixels, crop, resize, flip) runs in FFCV's compiled CPU worker threads; batches then move to
the configured device. Sample order uses the same rule as the torch backend (guard_fast.data.folder.ShardSampler), so
ranks read disjoint shards without needing a process group, and a val pass visits the same images in the same order
as the torch backend. Train: drop_last=True (every rank takes the same number of steps); val: last partial batch
kept. Train crops/flips come from numba's thread-local RNG inside FFCV, so augmented pixels are not bit-reproducible
across runs (the order is); validation outputs are deterministic.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from guard_fast.data.batches import Loader
from guard_fast.data.classes import write_beton_classes
from guard_fast.data.folder import ShardSampler, read_rgb, scan_folder
from guard_fast.data.presets import DatasetSpec
from guard_fast.runtime.config import DataConfig
from guard_fast.runtime.errors import GuardFastError


class _FolderForWriter:
    """Indexable (HWC uint8 image, label) view of an ImageFolder for FFCV's DatasetWriter."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return np.asarray(read_rgb(path), dtype=np.uint8), label


def write_beton(src: str | Path, out: str | Path, mode: str = "raw", max_resolution: int = 0,
                jpeg_quality: int = 90, workers: int = 2) -> int:
    """Write every image of the ImageFolder `src` (sorted class folders -> labels 0..C-1) into `out`.

    mode: raw (lossless pixels), jpg, smart or proportion (FFCV's mixes). Atomic: written beside `out` and renamed.
    Returns the number of images. Unreadable images stop the conversion with an error naming the file (they are
    decoded once up front, so a corrupt file never leaves a half-written .beton).
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from tqdm import tqdm

    out = Path(out)
    if out.is_dir():  # checked before the conversion, not after it
        raise GuardFastError(f"--out {out} is a folder; give the .beton file's path, e.g. {out / 'train.beton'}")
    if mode not in ("raw", "jpg", "smart", "proportion"):
        raise GuardFastError(f"--mode {mode!r}: valid values are raw, jpg, smart, proportion")
    if not 1 <= jpeg_quality <= 100:
        raise GuardFastError(f"--jpeg-quality {jpeg_quality}: must be in 1..100")
    classes, samples = scan_folder(src)
    out.parent.mkdir(parents=True, exist_ok=True)  # an unwritable place fails here, before the images are read
    for path, _ in tqdm(samples, desc="check images", unit="img", leave=False):
        read_rgb(path)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    fields = {"image": RGBImageField(write_mode=mode, max_resolution=max_resolution or None,
                                     jpeg_quality=jpeg_quality),
              "label": IntField()}
    try:
        DatasetWriter(str(tmp), fields, num_workers=max(1, workers)).from_indexed_dataset(
            _FolderForWriter(samples), chunksize=64)
        write_beton_classes(out, classes)  # the class names travel with the file (train/val are compared)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return len(samples)


def _shard_order(sampler: ShardSampler):
    """An FFCV TraversalOrder whose epoch-e order is `sampler`'s rank shard for epoch e.

    FFCV accepts a custom order as an *instance* of a TraversalOrder subclass that it then calls with the loader,
    so the object is created without __init__ and initialized in __call__.
    """
    from ffcv.traversal_order.base import TraversalOrder

    class ShardOrder(TraversalOrder):
        def __call__(self, loader):
            TraversalOrder.__init__(self, loader)
            return self

        def sample_order(self, epoch: int):
            sampler.set_epoch(epoch)
            return np.asarray(sampler.indices(), dtype=np.uint64)

    return ShardOrder.__new__(ShardOrder)


class _Batches:
    """Wraps an FFCV loader: uint8 (B,3,H,W) -> float [0,1] contiguous, labels -> int64 (B,); set_epoch."""

    def __init__(self, loader):
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        self.loader.next_epoch = epoch  # FFCV reads the order of `next_epoch` at the start of iteration

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield x.float().div_(255.0).contiguous(), y.view(-1).long()


def _num_labels(reader) -> int:
    labels = reader.metadata["f1"] if "f1" in reader.metadata.dtype.names else None
    return int(labels.max()) + 1 if labels is not None and len(labels) else 0


def build_ffcv_loader(cfg: DataConfig, spec: DatasetSpec, path: Path, *, train: bool, rank: int, world: int,
                      device: torch.device, seed: int, batch_size: int, drop_last: bool, subset: int = 0,
                      subset_seed: int = 0, shard_block: int = 1) -> Loader:
    """FFCV loader over `path` for this rank. Train: RandomResizedCrop(scale=(crop_scale_min, 1)) + flip; val:
    center crop of `crop_ratio` of the shorter side resized to image_size. subset/subset_seed/shard_block: as in
    build_loader (the same ShardSampler rule as the torch backend)."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader as FFCVLoader
    from ffcv.reader import Reader
    from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

    try:
        reader = Reader(str(path))
        n = int(reader.num_samples)
    except Exception as e:  # FFCV raises assorted errors on a corrupt header
        raise GuardFastError(f"unreadable .beton file {path}: {type(e).__name__}: {e}") from None
    end, table = int(reader.header["alloc_table_ptr"]), reader.alloc_table
    if (path.stat().st_size < end or len(np.unique(table["sample_id"])) < n
            or (len(table) and int((table["ptr"] + table["size"]).max()) > end)):
        raise GuardFastError(f"{path}: truncated .beton ({path.stat().st_size} bytes, its sample table is cut off); "
                             "write it again with guard-fast data to-ffcv")
    if list(reader.handlers) != ["image", "label"]:
        raise GuardFastError(f"{path}: expected fields image, label (written by guard-fast data to-ffcv), "
                             f"found {', '.join(reader.handlers)}")
    found = _num_labels(reader)
    if found > spec.num_classes:
        raise GuardFastError(f"{path}: labels go up to {found - 1}, but the config/preset says {spec.num_classes} "
                             "classes (data.num_classes)")
    size = spec.image_size
    if train:
        image = [RandomResizedCropRGBImageDecoder((size, size), scale=(cfg.crop_scale_min, 1.0)),
                 RandomHorizontalFlip()]
    else:
        image = [CenterCropRGBImageDecoder((size, size), ratio=spec.crop_ratio)]
    image += [ToTensor(), ToTorchImage(channels_last=False)]
    sampler = ShardSampler(n, rank, world, shuffle=train, seed=seed, even=drop_last, subset=subset,
                           subset_seed=subset_seed, block=shard_block)
    loader = FFCVLoader(str(path), batch_size=batch_size, num_workers=max(1, cfg.workers),
                        order=_shard_order(sampler), seed=seed, drop_last=drop_last,
                        pipelines={"image": image, "label": [IntDecoder(), ToTensor(), Squeeze()]})
    batches = _Batches(loader)
    return Loader(batches, batches, spec, [str(c) for c in range(spec.num_classes)], len(sampler.chosen()), device,
                  split_samples=n)
