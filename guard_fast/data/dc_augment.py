"""DC's evaluation-time augmentation (VICO-UoE/DatasetCondensation utils.py:365-424, `augment`), seeded.

Per image of a batch, one operation drawn uniformly from the strategy ('crop_scale_rotate' for MNIST students in
DC's evaluation, get_daparam utils.py:439-440; no other data set gets one with ConvNet), with DC's parameters
(utils.py:433-436): crop 4 px, scale 0.2, rotate 45 degrees, noise 0.001. It acts on normalized tensors, as DC's
code does (its data are normalized at load), so the fills below are in normalized units:

- crop: pad 4 px with the batch's per-channel mean, take the S x S window at offset (r, c), r, c uniform in 0..7;
- scale: nearest-neighbour resize to (int(a S), int(b S)), a, b ~ U(0.8, 1.2) (both from the height, as theirs),
  centered on a zero canvas, center S x S crop;
- rotate: scipy.ndimage.rotate by an integer angle uniform in -45..44 (cubic spline, the canvas grows), fill = the
  mean of the per-channel means, center S x S crop;
- noise: + 0.001 * N(0, 1).

The batch means are taken once, before any image changes (utils.py:376-378). The random draws come from a numpy
Generator the caller seeds, so a run is reproducible (DC's uses the global numpy state).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

CROP, SCALE, ROTATE, NOISE = 4, 0.2, 45, 0.001
OPS = ("crop", "scale", "rotate", "noise")
MNIST_STRATEGY = "crop_scale_rotate"


def check_dc_strategy(strategy: str) -> None:
    bad = [op for op in strategy.split("_") if op not in OPS]
    if bad or not strategy:
        raise ValueError(f"{strategy!r}: operations joined by '_' from {', '.join(OPS)} (unknown: {bad})")


def _crop(img: torch.Tensor, mean: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    c, h, w = img.shape
    canvas = mean.view(c, 1, 1).expand(c, h + 2 * CROP, w + 2 * CROP).clone()
    canvas[:, CROP:CROP + h, CROP:CROP + w] = img
    r, k = int(rng.integers(2 * CROP)), int(rng.integers(2 * CROP))
    return canvas[:, r:r + h, k:k + w]


def _scale(img: torch.Tensor, mean: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    c, h, w = img.shape
    sh, sw = int(rng.uniform(1 - SCALE, 1 + SCALE) * h), int(rng.uniform(1 - SCALE, 1 + SCALE) * h)
    tmp = F.interpolate(img[None], [sh, sw])[0]  # nearest, F.interpolate's default (theirs)
    m = max(sh, sw, h, w)
    canvas = img.new_zeros(c, m, m)
    r, k = (m - sh) // 2, (m - sw) // 2
    canvas[:, r:r + sh, k:k + sw] = tmp
    r, k = (m - h) // 2, (m - w) // 2
    return canvas[:, r:r + h, k:k + w]


def _rotate(img: torch.Tensor, mean: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    from scipy.ndimage import rotate

    _, h, w = img.shape
    angle = int(rng.integers(-ROTATE, ROTATE))
    out = rotate(img.detach().cpu().double().numpy(), angle=angle, axes=(-2, -1), cval=float(mean.mean()))
    r, k = (out.shape[-2] - h) // 2, (out.shape[-1] - w) // 2
    return torch.from_numpy(out[:, r:r + h, k:k + w].copy()).to(img)


def _noise(img: torch.Tensor, mean: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    return img + NOISE * torch.from_numpy(rng.standard_normal(img.shape)).to(img)


FUNCTIONS = {"crop": _crop, "scale": _scale, "rotate": _rotate, "noise": _noise}


@torch.no_grad()
def dc_augment(u: torch.Tensor, strategy: str, rng: np.random.Generator) -> torch.Tensor:
    """u: (B, C, S, S) normalized images -> a new tensor, one drawn operation per image (module docstring)."""
    ops = strategy.split("_")
    mean = u.mean(dim=(0, 2, 3))  # (C,) the batch's per-channel means, before any change
    out = u.clone()
    for i in range(len(u)):
        op = ops[int(rng.integers(len(ops)))]
        out[i] = FUNCTIONS[op](out[i], mean, rng)
    return out


def dc_augment_pixels(x: torch.Tensor, strategy: str, rng: np.random.Generator, mean: torch.Tensor,
                      std: torch.Tensor) -> torch.Tensor:
    """The same on pixel-unit images x (B, C, S, S): normalized with mean/std (1, C, 1, 1), augmented, mapped back."""
    mean, std = mean.to(x), std.to(x)
    return dc_augment((x - mean) / std, strategy, rng) * std + mean
