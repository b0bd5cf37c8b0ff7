"""FKD-style augmented views of the synthetic set, defined by parameters so they can be stored and replayed.

One epoch's plan (`plan_epoch`) fixes, from (seed, epoch) alone: the image order, a RandomResizedCrop box and flip per
view, and per batch a CutMix box and a partner permutation. `render` turns planned positions into pixels. Relabel
stores the plan with the teacher's logits; the student either replays a stored plan or (online mode) recomputes the
same plan and asks the teacher itself. Plans do not depend on the number of ranks: a rank takes a contiguous slice of
each global batch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch

from guard_fast.data.augment import resized_crop, sample_rrc
from guard_fast.runtime.bounds import NonNegative
from guard_fast.runtime.errors import ConfigError


@dataclass
class ViewConfig:
    batch_size: int = 100
    """images per optimizer step summed over all ranks (each rank takes batch_size / world)"""
    crop_scale_min: float = 0.08
    """lower bound of RandomResizedCrop's area fraction"""
    cutmix_alpha: NonNegative = 1.0
    """CutMix: mixed area fraction ~ Beta(alpha, alpha), one box per batch; 0 = no CutMix"""
    seed: int = 0
    """seed of the view plans (order, crops, flips, CutMix)"""

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"views.batch_size = {self.batch_size}: must be >= 1")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ConfigError(f"views.crop_scale_min = {self.crop_scale_min}: must be in (0, 1]")
        if self.cutmix_alpha < 0:
            raise ConfigError(f"views.cutmix_alpha = {self.cutmix_alpha}: must be >= 0")

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class EpochPlan:
    order: torch.Tensor  # (V,) int64 image index of each view position, V = batches * batch_size
    boxes: torch.Tensor  # (V, 4) int32 crop (top, left, h, w) in source pixels
    flips: torch.Tensor  # (V,) bool horizontal flip
    partners: torch.Tensor  # (V,) int64 position whose view fills this view's CutMix box (same batch)
    cuts: torch.Tensor  # (batches, 4) int32 CutMix box (top, left, h, w) in output pixels; h = 0: no mix
    batch_size: int

    @property
    def num_batches(self) -> int:
        return len(self.cuts)

    def to_dict(self) -> dict[str, torch.Tensor | int]:
        return {"order": self.order.to(torch.int32), "boxes": self.boxes.to(torch.int16),
                "flips": self.flips, "partners": self.partners.to(torch.int32), "cuts": self.cuts.to(torch.int16),
                "batch_size": self.batch_size}

    @classmethod
    def from_dict(cls, d: dict) -> EpochPlan:
        return cls(d["order"].long(), d["boxes"].int(), d["flips"].bool(), d["partners"].long(), d["cuts"].int(),
                   int(d["batch_size"]))


def num_batches(num_images: int, batch_size: int) -> int:
    """Full batches per epoch (the last incomplete batch is dropped so every step has batch_size views)."""
    return num_images // batch_size


def cutmix_box(rng: np.random.Generator, size: int, alpha: float) -> tuple[int, int, int, int]:
    """CutMix box for a size x size image: side fraction sqrt(1 - lam), lam ~ Beta(alpha, alpha), uniform center,
    clipped to the image."""
    if alpha <= 0:
        return 0, 0, 0, 0
    lam = rng.beta(alpha, alpha)
    side = int(size * np.sqrt(1.0 - lam))
    cy, cx = rng.integers(0, size, 2)
    top, bottom = np.clip([cy - side // 2, cy + side // 2], 0, size)
    left, right = np.clip([cx - side // 2, cx + side // 2], 0, size)
    return int(top), int(left), int(bottom - top), int(right - left)


def plan_epoch(num_images: int, image_size: int, cfg: ViewConfig, epoch: int) -> EpochPlan:
    """The views of `epoch`: a function of (num_images, image_size, cfg, epoch) only."""
    nb = num_batches(num_images, cfg.batch_size)
    views = nb * cfg.batch_size
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    rng = np.random.default_rng((cfg.seed, epoch))
    order = torch.randperm(num_images, generator=gen)[:views]
    boxes = torch.tensor([sample_rrc(gen, image_size, image_size, (cfg.crop_scale_min, 1.0)) for _ in range(views)],
                         dtype=torch.int32).reshape(views, 4)
    flips = torch.rand(views, generator=gen) < 0.5
    starts = torch.arange(nb).repeat_interleave(cfg.batch_size) * cfg.batch_size
    within = torch.cat([torch.randperm(cfg.batch_size, generator=gen) for _ in range(nb)]) if nb else starts
    cuts = torch.tensor([cutmix_box(rng, image_size, cfg.cutmix_alpha) for _ in range(nb)],
                        dtype=torch.int32).reshape(nb, 4)
    return EpochPlan(order, boxes, flips, starts + within, cuts, cfg.batch_size)


def rank_positions(plan: EpochPlan, batch: int, rank: int, world: int) -> range:
    """View positions of `batch` that `rank` trains on: a contiguous 1/world slice of the global batch."""
    per = plan.batch_size // world
    start = batch * plan.batch_size + rank * per
    return range(start, start + per)


def _base_view(pixels: torch.Tensor, plan: EpochPlan, p: int, size: int) -> torch.Tensor:
    img = pixels[int(plan.order[p])].float() / 255  # (3, S, S) in [0, 1]
    out = resized_crop(img, tuple(plan.boxes[p].tolist()), size)
    return out.flip(-1) if plan.flips[p] else out


def render(pixels: torch.Tensor, plan: EpochPlan, positions: range | list[int], size: int) -> torch.Tensor:
    """Views at `positions` as float (len, 3, size, size) in [0, 1]: crop + flip, then the batch's CutMix box filled
    from the partner view."""
    out = []
    for p in positions:
        view = _base_view(pixels, plan, p, size)
        top, left, h, w = plan.cuts[p // plan.batch_size].tolist()
        if h > 0 and w > 0:
            partner = _base_view(pixels, plan, int(plan.partners[p]), size)
            view[:, top:top + h, left:left + w] = partner[:, top:top + h, left:left + w]
        out.append(view)
    return torch.stack(out).clamp_(0, 1)
