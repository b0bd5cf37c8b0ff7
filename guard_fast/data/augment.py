"""Seeded augmentations with explicit generators, so a view can be recomputed (replayed) from its parameters.

torchvision's RandomResizedCrop draws from the global RNG; here every random choice comes from a torch.Generator
the caller owns, which makes loaders deterministic regardless of worker count and lets relabel store crop boxes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sample_rrc(gen: torch.Generator, height: int, width: int, scale: tuple[float, float] = (0.08, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (top, left, h, w): area fraction ~ U(scale), log aspect ~ U(log ratio); 10 tries, then
    a center crop clamped to the ratio range (torchvision's algorithm, driven by `gen`)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        r = torch.rand(3, generator=gen).tolist()
        target = area * (scale[0] + r[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + r[1] * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(x: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """Crop box (top, left, h, w) of x (..., C, H, W) and resize it to (size, size), bilinear with antialias."""
    top, left, h, w = box
    crop = x[..., top:top + h, left:left + w]
    squeeze = crop.dim() == 3
    out = F.interpolate(crop.unsqueeze(0) if squeeze else crop, size=(size, size), mode="bilinear",
                        align_corners=False, antialias=True)
    return out.squeeze(0) if squeeze else out


def center_crop_box(height: int, width: int, ratio: float) -> tuple[int, int, int, int]:
    """Center box covering `ratio` of the shorter side (the 'resize to S/ratio, crop S' of ImageNet validation)."""
    side = max(1, int(round(min(height, width) * ratio)))
    return (height - side) // 2, (width - side) // 2, side, side
