"""DSA: each op equals a literal per-pixel formula (float64), gradients reach the input, seeded draws reproduce."""

from __future__ import annotations

import math

import pytest
import torch

from guard_fast.data import dsa as D


@pytest.fixture
def x():
    g = torch.Generator().manual_seed(0)
    return torch.rand((2, 3, 7, 6), generator=g, dtype=torch.float64)  # non-square, odd side


def t(v, dtype=torch.float64):
    return torch.tensor([v], dtype=dtype)


def test_color_ops_match_formulas(x):
    assert torch.allclose(D.brightness(x, t(0.8)), x + 0.3, atol=1e-15, rtol=0)
    out = D.saturation(x, t(0.25))
    for b in range(2):
        for i in range(7):
            for j in range(6):
                m = (x[b, 0, i, j] + x[b, 1, i, j] + x[b, 2, i, j]) / 3
                assert torch.allclose(out[b, :, i, j], (x[b, :, i, j] - m) * 0.5 + m, atol=1e-15)
    out = D.contrast(x, t(0.1))
    for b in range(2):
        m = x[b].sum() / x[b].numel()
        assert torch.allclose(out[b], (x[b] - m) * 0.6 + m, atol=1e-15)


def test_flip_per_image(x):
    out = D.flip(x, torch.tensor([0.3, 0.7], dtype=torch.float64))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])


def shifted(x, tx, ty):
    out = torch.zeros_like(x)
    _, _, h, w = x.shape
    for i in range(h):
        for j in range(w):
            if 0 <= i + tx < h and 0 <= j + ty < w:
                out[:, :, i, j] = x[:, :, i + tx, j + ty]
    return out


@pytest.mark.parametrize("tx,ty", [(1, -1), (-1, 0), (0, 1)])
def test_crop_is_a_zero_padded_translation(x, tx, ty):
    assert torch.equal(D.crop(x, torch.tensor([tx]), torch.tensor([ty])), shifted(x, tx, ty))


def test_crop_per_image_shifts(x):
    out = D.crop(x, torch.tensor([1, -1]), torch.tensor([0, 1]))
    assert torch.equal(out[:1], shifted(x[:1], 1, 0)) and torch.equal(out[1:], shifted(x[1:], -1, 1))


@pytest.mark.parametrize("ox,oy", [(0, 0), (3, 2), (7, 5)])
def test_cutout_zeroes_the_clamped_square(x, ox, oy):
    kh, kw = int(7 * 0.5 + 0.5), int(6 * 0.5 + 0.5)  # 4, 3
    rows = {min(max(ox - kh // 2 + a, 0), 6) for a in range(kh)}
    cols = {min(max(oy - kw // 2 + a, 0), 5) for a in range(kw)}
    want = x.clone()
    for i in rows:
        for j in cols:
            want[:, :, i, j] = 0
    assert torch.equal(D.cutout(x, torch.tensor([ox]), torch.tensor([oy])), want)


def bilinear_affine(x, theta):
    """Literal grid_sample(affine_grid(theta), align_corners=False, bilinear, zero padding)."""
    _, _, h, w = x.shape
    out = torch.zeros_like(x)
    for i in range(h):
        for j in range(w):
            xn, yn = (2 * j + 1) / w - 1, (2 * i + 1) / h - 1
            xs = theta[0][0] * xn + theta[0][1] * yn + theta[0][2]
            ys = theta[1][0] * xn + theta[1][1] * yn + theta[1][2]
            px, py = ((xs + 1) * w - 1) / 2, ((ys + 1) * h - 1) / 2
            x0, y0 = math.floor(px), math.floor(py)
            for yy, wy in ((y0, y0 + 1 - py), (y0 + 1, py - y0)):
                for xx, wx in ((x0, x0 + 1 - px), (x0 + 1, px - x0)):
                    if 0 <= yy < h and 0 <= xx < w:
                        out[:, :, i, j] += wy * wx * x[:, :, yy, xx]
    return out


def test_scale_and_rotate_match_bilinear_formula(x):
    assert torch.allclose(D.scale(x, t(1.1), t(0.9)), bilinear_affine(x, [[1.1, 0, 0], [0, 0.9, 0]]), atol=1e-12)
    a = (0.8 - 0.5) * 2 * 15 / 180 * math.pi
    want = bilinear_affine(x, [[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0]])
    assert torch.allclose(D.rotate(x, t(0.8)), want, atol=1e-12)


def test_seeded_draw_reproduces_and_reaches_every_group(x):
    seen = set()
    for seed in range(40):
        a = D.dsa(x, torch.Generator().manual_seed(seed))
        b = D.dsa(x, torch.Generator().manual_seed(seed))
        assert torch.equal(a, b)
        seen.add(D.sample_dsa(torch.Generator().manual_seed(seed), D.STRATEGY, 7, 6).group)
    assert seen == set(D.GROUPS)


def test_siamese_draw_is_shared_by_the_batch(x):
    draw = D.sample_dsa(torch.Generator().manual_seed(3), "scale", 7, 6)
    assert all(v.numel() == 1 for v in draw.params.values())
    both = D.apply_dsa(torch.cat([x, x]), draw)
    assert torch.equal(both[:2], both[2:])  # same transformation for every image
    per = D.sample_dsa(torch.Generator().manual_seed(3), "scale", 7, 6, n=4)
    assert all(v.numel() == 4 for v in per.params.values())


@pytest.mark.parametrize("group", list(D.GROUPS))
def test_gradient_flows_to_inputs(x, group):
    xi = x.clone().requires_grad_(True)
    out = D.dsa(xi, torch.Generator().manual_seed(1), strategy=group, per_image=True)
    (g,) = torch.autograd.grad(out.square().sum(), xi)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_bad_strategy_is_refused():
    with pytest.raises(ValueError, match="DSA strategy"):
        D.check_strategy("color_blur")
