"""DSA: differentiable siamese augmentation (Zhao & Bilen, ICML 2021) on image batches (B, C, H, W).

What we follow: DC/DSA's public code (VICO-UoE/DatasetCondensation, utils.py: ParamDiffAug, DiffAugment with
aug_mode 'S'). One call picks ONE group of the strategy uniformly at random ('color' = brightness, saturation,
contrast applied in that order; 'crop', 'cutout', 'flip', 'scale', 'rotate' one op each) and applies its ops with
the reference's constants (flip p 0.5, scale ratio 1.2, rotate +-15 deg, crop pad 0.125, cutout 0.5, brightness
1.0, saturation 2.0, contrast 0.5). Every op is differentiable in x (gradients flow to synthetic images).

Parameters: `sample_dsa` draws them from a caller-owned, seeded `torch.Generator` (CPU), not the global RNG, so a run
is reproducible and resumable and the draws do not depend on the number of ranks. `n = 1` draws one value per
parameter for the whole batch: the reference's `param.Siamese = True` (seed given: DC/DSA's matching step, where the
real and the synthetic batch get the same transformation) and MTT's `batchmode`; pass the same draw to both batches.
`n = B` draws one value per image: the reference's seed = -1 path (training networks on the synthetic set).

Space: the ops act on whatever tensor they get. In the authors' DC, DSA, MTT and TESLA code that tensor is the
*normalized* image (x - mean) / std (VICO-UoE/DatasetCondensation utils.py:52 normalizes at load and main.py:187-188
augments; MTT utils.py:61 with distill.py:359 and buffer.py:84-85; TESLA utils.py:32 with distill.py:388), so
brightness adds U(-0.5, 0.5) standard deviations and every shifted-in, cut-out or out-of-frame pixel is 0 in
normalized space, i.e. the dataset's mean colour. `apply_dsa_in` applies a draw in either space to a batch given in
either space; space = "pixel" ([0,1] pixels: brightness in pixel units, black fill) is our earlier behaviour, kept
as a named option.

Differences from the reference: draws come from our generator (not torch.manual_seed(seed + k) per op), so values
differ bitwise from the reference's for a given seed; the affine ops build theta in the input's dtype (the reference
casts to float32), so float64 tests are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

STRATEGY = "color_crop_cutout_flip_scale_rotate"
GROUPS = {"color": ("brightness", "saturation", "contrast"), "crop": ("crop",), "cutout": ("cutout",),
          "flip": ("flip",), "scale": ("scale",), "rotate": ("rotate",)}

SPACES = ("normalized", "pixel")

PROB_FLIP = 0.5
RATIO_SCALE = 1.2
RATIO_ROTATE = 15.0  # degrees
RATIO_CROP_PAD = 0.125
RATIO_CUTOUT = 0.5
BRIGHTNESS = 1.0
SATURATION = 2.0
CONTRAST = 0.5


def check_strategy(strategy: str) -> list[str]:
    """'color_crop' -> ['color', 'crop']; ValueError naming the valid groups otherwise."""
    groups = [g for g in strategy.split("_") if g]
    bad = [g for g in groups if g not in GROUPS]
    if not groups or bad:
        raise ValueError(f"DSA strategy {strategy!r}: groups joined by '_' from {', '.join(GROUPS)}")
    return groups


@dataclass
class DSADraw:
    """One sampled transformation: the chosen group and its parameters, each a (n,) tensor (n = 1 or batch)."""

    group: str
    params: dict[str, torch.Tensor]


def _crop_shift(size: int) -> int:
    return int(size * RATIO_CROP_PAD + 0.5)


def _cutout_size(size: int) -> int:
    return int(size * RATIO_CUTOUT + 0.5)


def sample_dsa(gen: torch.Generator, strategy: str, height: int, width: int, n: int = 1) -> DSADraw:
    """Pick a group uniformly, then draw its parameters in op order; all draws from `gen` (CPU)."""
    groups = check_strategy(strategy)
    group = groups[int(torch.randint(len(groups), (1,), generator=gen))]
    p: dict[str, torch.Tensor] = {}
    for op in GROUPS[group]:
        if op in ("brightness", "saturation", "contrast", "flip", "rotate"):
            p[op] = torch.rand(n, generator=gen, dtype=torch.float64)
        elif op == "scale":
            lo = 1.0 / RATIO_SCALE
            p["sx"] = torch.rand(n, generator=gen, dtype=torch.float64) * (RATIO_SCALE - lo) + lo
            p["sy"] = torch.rand(n, generator=gen, dtype=torch.float64) * (RATIO_SCALE - lo) + lo
        elif op == "crop":
            sh, sw = _crop_shift(height), _crop_shift(width)
            p["tx"] = torch.randint(-sh, sh + 1, (n,), generator=gen)
            p["ty"] = torch.randint(-sw, sw + 1, (n,), generator=gen)
        elif op == "cutout":
            ch, cw = _cutout_size(height), _cutout_size(width)
            p["ox"] = torch.randint(0, height + (1 - ch % 2), (n,), generator=gen)
            p["oy"] = torch.randint(0, width + (1 - cw % 2), (n,), generator=gen)
    return DSADraw(group, p)


def _per_image(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(n,) parameter -> (B, 1, 1, 1) in x's dtype and device (n = 1 broadcasts to the batch)."""
    v = v.to(x.device, x.dtype if v.is_floating_point() else v.dtype)
    return v.expand(x.shape[0]).view(-1, 1, 1, 1) if v.numel() == 1 else v.view(-1, 1, 1, 1)


def brightness(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x + (b - 0.5) * 1.0"""
    return x + (_per_image(b, x) - 0.5) * BRIGHTNESS


def saturation(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(x - m) * (2 s) + m, m the per-pixel mean over channels"""
    m = x.mean(dim=1, keepdim=True)
    return (x - m) * (_per_image(s, x) * SATURATION) + m


def contrast(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(x - m) * (c + 0.5) + m, m the per-image mean over channels and pixels"""
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * (_per_image(c, x) + CONTRAST) + m


def flip(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """horizontal flip where f < 0.5"""
    return torch.where(_per_image(f, x) < PROB_FLIP, x.flip(3), x)


def crop(x: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """Translate: out[b, :, i, j] = x[b, :, i + tx_b, j + ty_b] inside the image, 0 outside (the reference pads one
    zero pixel and clamps indices into the padded image)."""
    b, _, h, w = x.shape
    tx, ty = (t.to(x.device).expand(b) if t.numel() == 1 else t.to(x.device) for t in (tx, ty))
    ix = (torch.arange(h, device=x.device) + tx[:, None] + 1).clamp(0, h + 1)  # (B, H) rows of the padded image
    iy = (torch.arange(w, device=x.device) + ty[:, None] + 1).clamp(0, w + 1)  # (B, W)
    xp = F.pad(x, [1, 1, 1, 1])
    out = xp[torch.arange(b, device=x.device)[:, None, None], :, ix[:, :, None], iy[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, ox: torch.Tensor, oy: torch.Tensor) -> torch.Tensor:
    """Zero a k x k square (k = round(0.5 size)) whose rows are clamp(ox - k//2 + t, 0, H-1), t < k (columns alike)."""
    b, _, h, w = x.shape
    kh, kw = _cutout_size(h), _cutout_size(w)

    def band(o: torch.Tensor, k: int, size: int) -> torch.Tensor:  # (B, size) True inside the clamped interval
        o = o.to(x.device).expand(b) if o.numel() == 1 else o.to(x.device)
        lo = (o - k // 2).clamp(0, size - 1)[:, None]
        hi = (o - k // 2 + k - 1).clamp(0, size - 1)[:, None]
        r = torch.arange(size, device=x.device)[None]
        return (r >= lo) & (r <= hi)

    hole = band(ox, kh, h)[:, :, None] & band(oy, kw, w)[:, None, :]  # (B, H, W)
    return x * (~hole).to(x.dtype).unsqueeze(1)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """grid_sample(x, affine_grid(theta)) with the reference's (PyTorch default) settings: bilinear, zero padding,
    align_corners=False."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def scale(x: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    """theta = [[sx, 0, 0], [0, sy, 0]] (sx, sy in [1/1.2, 1.2]; > 1 zooms out)"""
    sx, sy = (_per_image(s, x).view(-1) for s in (sx, sy))
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)  # (B, 2, 3)
    return _affine(x, theta)


def rotate(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """theta = [[cos a, -sin a, 0], [sin a, cos a, 0]], a = (r - 0.5) * 2 * 15 deg"""
    a = (_per_image(r, x).view(-1) - 0.5) * 2 * RATIO_ROTATE / 180 * math.pi
    zero = torch.zeros_like(a)
    theta = torch.stack([torch.stack([a.cos(), -a.sin(), zero], 1), torch.stack([a.sin(), a.cos(), zero], 1)], 1)
    return _affine(x, theta)


def apply_dsa(x: torch.Tensor, draw: DSADraw) -> torch.Tensor:
    """Apply a sampled transformation (the same draw on two batches = siamese augmentation)."""
    p = draw.params
    for op in GROUPS[draw.group]:
        if op == "brightness":
            x = brightness(x, p[op])
        elif op == "saturation":
            x = saturation(x, p[op])
        elif op == "contrast":
            x = contrast(x, p[op])
        elif op == "flip":
            x = flip(x, p[op])
        elif op == "crop":
            x = crop(x, p["tx"], p["ty"])
        elif op == "cutout":
            x = cutout(x, p["ox"], p["oy"])
        elif op == "scale":
            x = scale(x, p["sx"], p["sy"])
        elif op == "rotate":
            x = rotate(x, p[op])
    return x.contiguous()


def check_space(space: str) -> None:
    if space not in SPACES:
        raise ValueError(f"DSA space {space!r}: valid values are {', '.join(SPACES)}")


def apply_dsa_in(x: torch.Tensor, draw: DSADraw, space: str, given: str, mean: torch.Tensor,
                 std: torch.Tensor) -> torch.Tensor:
    """Apply `draw` in `space` to x given in space `given` ('normalized' or 'pixel'; mean and std (1, C, 1, 1)
    convert between them, u = (x - mean) / std); the result is in space `given`, differentiable in x."""
    check_space(space)
    check_space(given)
    if space == given:
        return apply_dsa(x, draw)
    mean, std = mean.to(x.device, x.dtype), std.to(x.device, x.dtype)
    if space == "normalized":  # x in pixels
        return apply_dsa((x - mean) / std, draw) * std + mean
    return (apply_dsa(x * std + mean, draw) - mean) / std


def dsa(x: torch.Tensor, gen: torch.Generator, strategy: str = STRATEGY, per_image: bool = False) -> torch.Tensor:
    """Sample (one draw for the batch, or one per image) and apply."""
    return apply_dsa(x, sample_dsa(gen, strategy, x.shape[2], x.shape[3], x.shape[0] if per_image else 1))
