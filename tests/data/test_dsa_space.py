"""DSA in the authors' space: every group equals an implementation of DC/DSA's DiffAugment written from reading
VICO-UoE/DatasetCondensation utils.py (53f63a6) applied to *normalized* tensors, as their DC, DSA, MTT and TESLA code
does (DC utils.py:52 normalizes at load, main.py:187-188 augments; MTT utils.py:61 + distill.py:359; TESLA
utils.py:32 + distill.py:388). Fill pixels are the dataset's mean colour; the old [0,1]-pixel space differs in every
group but flip."""

from __future__ import annotations

import math

import pytest
import torch

from guard_fast.data import dsa as D
from guard_fast.distill.matching import build_augment
from tests.data.test_dsa import bilinear_affine

MEAN = torch.tensor([0.49, 0.48, 0.45], dtype=torch.float64).view(1, 3, 1, 1)
STD = torch.tensor([0.20, 0.25, 0.30], dtype=torch.float64).view(1, 3, 1, 1)  # unequal: saturation sees them


@pytest.fixture
def x():
    g = torch.Generator().manual_seed(5)
    return torch.rand((3, 3, 9, 8), generator=g, dtype=torch.float64)  # pixels in [0, 1]; non-square


def reference(u: torch.Tensor, group: str, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """DiffAugment's ops (utils.py line numbers) on the tensor u the authors' code holds, one parameter per image."""
    b, _, h, w = u.shape
    out = u.clone()

    def per(v, i):  # parameter of image i (a siamese draw has one value)
        return float(v[i if v.numel() > 1 else 0])

    for i in range(b):
        if group == "color":
            v = out[i] + (per(p["brightness"], i) - 0.5) * 1.0  # rand_brightness :565-572
            m = v.mean(0, keepdim=True)  # rand_saturation :575-583, mean over channels
            v = (v - m) * (per(p["saturation"], i) * 2.0) + m
            m = v.mean()  # rand_contrast :586-594, mean over channels and pixels
            out[i] = (v - m) * (per(p["contrast"], i) + 0.5) + m
        elif group == "flip":  # rand_flip :556-562
            out[i] = u[i].flip(-1) if per(p["flip"], i) < 0.5 else u[i]
        elif group == "crop":  # rand_crop :597-617: padded by one zero pixel, indices clamped into the padding
            tx, ty = int(per(p["tx"], i)), int(per(p["ty"], i))
            for r in range(h):
                for c in range(w):
                    inside = 0 <= r + tx < h and 0 <= c + ty < w
                    out[i, :, r, c] = u[i, :, r + tx, c + ty] if inside else 0.0
        elif group == "cutout":  # rand_cutout :620-640
            kh, kw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
            ox, oy = int(per(p["ox"], i)), int(per(p["oy"], i))
            for a in range(kh):
                for c in range(kw):
                    out[i, :, min(max(ox - kh // 2 + a, 0), h - 1), min(max(oy - kw // 2 + c, 0), w - 1)] = 0.0
        elif group == "scale":  # rand_scale :524-539
            theta = [[per(p["sx"], i), 0, 0], [0, per(p["sy"], i), 0]]
            out[i] = bilinear_affine(u[i:i + 1], theta)[0]
        elif group == "rotate":  # rand_rotate :542-553
            a = (per(p["rotate"], i) - 0.5) * 2 * 15.0 / 180 * math.pi
            out[i] = bilinear_affine(u[i:i + 1], [[math.cos(a), math.sin(-a), 0], [math.sin(a), math.cos(a), 0]])[0]
    return out


def normalize(x):
    return (x - MEAN) / STD


@pytest.mark.parametrize("group", list(D.GROUPS))
@pytest.mark.parametrize("n", [1, 3])  # siamese (one draw for the batch) and per image
def test_each_group_in_normalized_space_is_the_authors(x, group, n):
    draw = D.sample_dsa(torch.Generator().manual_seed(11), group, 9, 8, n)
    want = reference(normalize(x), group, draw.params)
    # a student holds pixels: augment in normalized space, hand pixels to the (normalizing) model
    got = D.apply_dsa_in(x, draw, "normalized", "pixel", MEAN, STD)
    torch.testing.assert_close(normalize(got), want, rtol=0, atol=1e-12)
    # MTT/TESLA hold normalized tensors
    torch.testing.assert_close(D.apply_dsa_in(normalize(x), draw, "normalized", "normalized", MEAN, STD), want,
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_build_augment_is_the_authors_per_image_diffaugment(x, seed):
    """MTT/TESLA's inner steps: DiffAugment(u) with seed -1 (one draw per image) on normalized u."""
    u = normalize(x)
    draw = D.sample_dsa(torch.Generator().manual_seed(seed), D.STRATEGY, 9, 8, len(u))
    want = reference(u, draw.group, draw.params)
    torch.testing.assert_close(build_augment("dsa", MEAN, STD)(u, seed), want, rtol=0, atol=1e-12)


def test_fill_is_the_mean_colour_and_brightness_is_in_std_units(x):
    # crop by +2 rows: the last two rows come from outside the image
    draw = D.DSADraw("crop", {"tx": torch.tensor([2]), "ty": torch.tensor([0])})
    got = D.apply_dsa_in(x, draw, "normalized", "pixel", MEAN, STD)
    torch.testing.assert_close(got[:, :, -2:], MEAN.expand(3, 3, 2, 8), rtol=0, atol=1e-15)
    assert torch.equal(D.apply_dsa_in(x, draw, "pixel", "pixel", MEAN, STD)[:, :, -2:], torch.zeros(3, 3, 2, 8))
    # cutout: the hole is the mean colour
    draw = D.DSADraw("cutout", {"ox": torch.tensor([4]), "oy": torch.tensor([4])})
    got = D.apply_dsa_in(x, draw, "normalized", "pixel", MEAN, STD)
    torch.testing.assert_close(got[:, :, 4, 4], MEAN.view(1, 3).expand(3, 3), rtol=0, atol=1e-15)
    # zoom out (s = 2, beyond DSA's 1.2 so that the corner samples lie wholly outside): the mean colour
    draw = D.DSADraw("scale", {"sx": torch.tensor([2.0], dtype=torch.float64),
                               "sy": torch.tensor([2.0], dtype=torch.float64)})
    got = D.apply_dsa_in(x, draw, "normalized", "pixel", MEAN, STD)
    torch.testing.assert_close(got[:, :, 0, 0], MEAN.view(1, 3).expand(3, 3), rtol=0, atol=1e-15)
    # brightness 0.9: +0.4 standard deviations per channel (0.4 pixel units in pixel space)
    shift = D.brightness(normalize(x), torch.tensor([0.9], dtype=torch.float64)) * STD + MEAN - x
    torch.testing.assert_close(shift, (0.4 * STD).expand_as(x), rtol=0, atol=1e-14)


@pytest.mark.parametrize("group", list(D.GROUPS))
def test_pixel_space_is_a_different_augmentation_except_flip(x, group):
    draw = D.sample_dsa(torch.Generator().manual_seed(3), group, 9, 8, 3)
    if group == "crop":  # a draw that shifts, so there is something to fill
        draw.params.update(tx=torch.tensor([1, -2, 2]), ty=torch.tensor([0, 1, -1]))
    normalized = D.apply_dsa_in(x, draw, "normalized", "pixel", MEAN, STD)
    pixel = D.apply_dsa_in(x, draw, "pixel", "pixel", MEAN, STD)
    differs = (normalized - pixel).abs().max() > 1e-6
    assert differs == (group != "flip")


def test_bad_space_is_refused(x):
    with pytest.raises(ValueError, match="DSA space 'zca'"):
        D.apply_dsa_in(x, D.sample_dsa(torch.Generator(), "flip", 9, 8), "zca", "pixel", MEAN, STD)
