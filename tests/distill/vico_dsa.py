"""VICO-UoE/DatasetCondensation (53f63a6) DiffAugment, written from reading utils.py:495-640, for the tests that
compare the DSA and DM methods with the authors' code (tests/distill/test_dsa_method.py, tests/distill/test_dm.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The ops of DiffAugment (aug_mode 'S'). The parameter values are
# the ones our draw made (the reference seeds torch's global RNG, utils.py:487-492); each value is image 0's value,
# which Siamese mode copies to every image (`param.Siamese = True` when a seed is given, :499-502), or image i's in
# the per-image (seed = -1) path. The authors build theta in float32 (:534, 548); here in x's dtype (float64 test).


def _vals(v: torch.Tensor, n: int, dtype) -> torch.Tensor:
    return (v.expand(n) if v.numel() == 1 else v).to(dtype)


def ref_brightness(x, b):  # utils.py:565-572
    return x + (_vals(b, len(x), x.dtype).view(-1, 1, 1, 1) - 0.5) * 1.0


def ref_saturation(x, s):  # utils.py:575-583
    x_mean = x.mean(dim=1, keepdim=True)
    return (x - x_mean) * (_vals(s, len(x), x.dtype).view(-1, 1, 1, 1) * 2.0) + x_mean


def ref_contrast(x, c):  # utils.py:586-594
    x_mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - x_mean) * (_vals(c, len(x), x.dtype).view(-1, 1, 1, 1) + 0.5) + x_mean


def ref_crop(x, tx, ty):  # utils.py:597-617
    n = len(x)
    translation_x, translation_y = _vals(tx, n, torch.long).view(-1, 1, 1), _vals(ty, n, torch.long).view(-1, 1, 1)
    grid_batch, grid_x, grid_y = torch.meshgrid(torch.arange(n), torch.arange(x.size(2)), torch.arange(x.size(3)),
                                                indexing="ij")
    grid_x = torch.clamp(grid_x + translation_x + 1, 0, x.size(2) + 1)
    grid_y = torch.clamp(grid_y + translation_y + 1, 0, x.size(3) + 1)
    x_pad = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return x_pad.permute(0, 2, 3, 1).contiguous()[grid_batch, grid_x, grid_y].permute(0, 3, 1, 2)


def ref_cutout(x, ox, oy):  # utils.py:620-640
    n = len(x)
    cutout_size = int(x.size(2) * 0.5 + 0.5), int(x.size(3) * 0.5 + 0.5)
    offset_x, offset_y = _vals(ox, n, torch.long).view(-1, 1, 1), _vals(oy, n, torch.long).view(-1, 1, 1)
    grid_batch, grid_x, grid_y = torch.meshgrid(torch.arange(n), torch.arange(cutout_size[0]),
                                                torch.arange(cutout_size[1]), indexing="ij")
    grid_x = torch.clamp(grid_x + offset_x - cutout_size[0] // 2, min=0, max=x.size(2) - 1)
    grid_y = torch.clamp(grid_y + offset_y - cutout_size[1] // 2, min=0, max=x.size(3) - 1)
    mask = torch.ones(n, x.size(2), x.size(3), dtype=x.dtype)
    mask[grid_batch, grid_x, grid_y] = 0
    return x * mask.unsqueeze(1)


def ref_flip(x, f):  # utils.py:556-562
    return torch.where(_vals(f, len(x), x.dtype).view(-1, 1, 1, 1) < 0.5, x.flip(3), x)


def _sample(x, theta):  # F.affine_grid / F.grid_sample with PyTorch's defaults, as utils.py:537-538, 551-552
    return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)


def ref_scale(x, sx, sy):  # utils.py:524-539
    sx, sy = _vals(sx, len(x), x.dtype), _vals(sy, len(x), x.dtype)
    theta = torch.stack([torch.tensor([[sx[i], 0, 0], [0, sy[i], 0]], dtype=x.dtype) for i in range(len(x))])
    return _sample(x, theta)


def ref_rotate(x, r):  # utils.py:542-553
    t = (_vals(r, len(x), x.dtype) - 0.5) * 2 * 15.0 / 180 * float(math.pi)
    theta = torch.stack([torch.tensor([[torch.cos(t[i]), torch.sin(-t[i]), 0], [torch.sin(t[i]), torch.cos(t[i]), 0]],
                                      dtype=x.dtype) for i in range(len(x))])
    return _sample(x, theta)


def diff_augment(x, draw):
    """DiffAugment (utils.py:495-520): the chosen group's functions in AUGMENT_FNS order (:643-650)."""
    p = draw.params
    if draw.group == "color":
        return ref_contrast(ref_saturation(ref_brightness(x, p["brightness"]), p["saturation"]), p["contrast"])
    if draw.group == "crop":
        return ref_crop(x, p["tx"], p["ty"])
    if draw.group == "cutout":
        return ref_cutout(x, p["ox"], p["oy"])
    if draw.group == "flip":
        return ref_flip(x, p["flip"])
    if draw.group == "scale":
        return ref_scale(x, p["sx"], p["sy"])
    return ref_rotate(x, p["rotate"])
