"""DC and GUARD(DC) against the authors' code, one outer iteration at a time on tiny float64 tensors: the updated
synthetic images (not just gradients) equal an implementation of what yumozi/dataset_condensation main_CURE.py
(5bcef82; space = pixel) and VICO-UoE/DatasetCondensation main.py (53f63a6; space = normalized) compute, written
here from reading them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from guard_fast.distill.dc import DCConfig, outer_iteration
from guard_fast.models import build_model
from tests.conftest import ONE

MEAN, STD = (0.45, 0.40, 0.35), (0.20, 0.25, 0.30)
CLASSES, IPC, PER_CLASS = 3, 2, 5


def dc_distance(gw_syn, gw_real):
    """DC's 'ours' distance (utils.py:218-246 of either repository): per layer with >= 2 dims, rows = output units,
    sum of 1 - cosine (norms + 1e-6); 1-D tensors contribute nothing."""
    total = 0.0
    for a, b in zip(gw_syn, gw_real, strict=True):
        if a.dim() == 1:
            continue
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        total = total + (1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-6)).sum()
    return total


def curvature(net, forward, x, y, h, lam):
    """main_CURE.py:228-249: eval mode; z = h (sign g + 1e-7) / (||sign g||_per image + 1e-7) from the gradient of
    the batch-mean CE; R_i = ||d/dx [CE(x + z) - CE(x)]||_2 per image (graph kept); returns mean(lam R)."""
    xr = x.clone().requires_grad_(True)
    net.eval()
    (g,) = torch.autograd.grad(F.cross_entropy(forward(net, xr), y), xr)
    z = torch.sign(g)
    z = h * (z + 1e-7) / (z.reshape(len(z), -1).norm(dim=1)[:, None, None, None] + 1e-7)
    diff = F.cross_entropy(forward(net, xr + z), y) - F.cross_entropy(forward(net, xr), y)
    (gd,) = torch.autograd.grad(diff, xr, create_graph=True)
    return (lam * gd.reshape(len(gd), -1).norm(dim=1)).mean()


def authors_outer_iteration(forward, net, images, real, cfg: DCConfig, guard: bool):
    """One `for ol in range(outer_loop)` pass of main_CURE.py:201-277 / VICO main.py:156-215 on a given network:
    per class the real loss (CE, + curvature with GUARD) and its detached parameter gradient, the synthetic CE's
    parameter gradient with graph, distances summed; SGD(lr_img, momentum 0.5) on the images; between image steps
    inner_loop epochs of SGD(lr_net) on the synthetic set (one batch here: batch_train >= its size). `forward(net, t)`
    maps a real or synthetic tensor to logits as the script does; real[c] holds the class's whole batch."""
    image_syn = images.clone().requires_grad_(True)
    opt_img = torch.optim.SGD([image_syn], lr=cfg.lr_img, momentum=0.5)
    opt_net = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)
    params = list(net.parameters())
    for ol in range(cfg.outer_loop):
        loss = 0.0
        for c in range(CLASSES):
            y = torch.full((len(real[c]),), c)
            net.train()
            loss_real = F.cross_entropy(forward(net, real[c]), y)
            if guard:
                loss_real = loss_real + curvature(net, forward, real[c], y, cfg.h, cfg.lam)
            gw_real = [g.detach() for g in torch.autograd.grad(loss_real, params)]
            syn = image_syn[c * IPC:(c + 1) * IPC]
            gw_syn = torch.autograd.grad(F.cross_entropy(forward(net, syn), torch.full((IPC,), c)), params,
                                         create_graph=True)
            loss = loss + dc_distance(gw_syn, gw_real)
        opt_img.zero_grad()
        loss.backward()
        opt_img.step()
        if ol == cfg.outer_loop - 1:
            break
        labels = torch.arange(CLASSES).repeat_interleave(IPC)
        for _ in range(cfg.inner_loop):
            net.train()
            out = F.cross_entropy(forward(net, image_syn.detach()), labels)
            opt_net.zero_grad()
            out.backward()
            opt_net.step()
    return image_syn.detach()


def setup(space: str, guard: bool, outer: int, seed: int = 0):
    torch.manual_seed(seed)
    net = build_model("convnet", CLASSES, MEAN, STD, width=4, image_size=8).double()
    gen = torch.Generator().manual_seed(seed + 1)
    real = [torch.rand((PER_CLASS, 3, 8, 8), generator=gen, dtype=torch.float64) for _ in range(CLASSES)]
    cfg = DCConfig(ipc=IPC, space=space, guard=guard, outer_loop=outer, inner_loop=2, batch_real=PER_CLASS,
                   batch_train=64, lam=100.0, h=0.6, float64=True)
    cfg.validate()
    return net, real, cfg


def ours(net, images, real, cfg):
    u = images.clone().requires_grad_(True)
    u.grad = torch.zeros_like(u)
    opt = torch.optim.SGD([u], lr=cfg.lr_img, momentum=cfg.momentum_img)
    outer_iteration(cfg, ONE, net, u, opt, real, it=0)
    return u.detach()


@pytest.mark.parametrize("chunk", [0, 2])
@pytest.mark.parametrize("guard", [True, False])
@pytest.mark.parametrize("outer", [1, 2])
def test_pixel_space_is_main_cure(guard, outer, chunk):
    """main_CURE.py: data loaded in [0,1] pixels (utils.py:55), the network Normalize-then-ConvNet (:149, 173), the
    images raw pixel tensors initialized by randn (:98): our space = pixel, init = noise, no clamp. chunk = 2: the
    real gradient (5 images: passes of 2, 2, 1) and the inner-loop steps (6 images) accumulated over passes take
    the authors' one-pass step."""
    net, real, cfg = setup("pixel", guard, outer)
    cfg.chunk = chunk
    images = torch.randn((CLASSES * IPC, 3, 8, 8), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    want = authors_outer_iteration(lambda n, t: n(t), copy.deepcopy(net), images, real, cfg, guard)
    got = ours(net, images, real, cfg)
    assert (want - images).abs().max() > 1e-3  # the step is not negligible
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert got.min() < 0 and got.max() > 1  # not clamped: noise in pixel units stays out of [0,1]


@pytest.mark.parametrize("chunk", [0, 2])
@pytest.mark.parametrize("outer", [1, 2])
def test_normalized_space_is_vicos_dc(outer, chunk):
    """VICO's DC: data normalized at load (utils.py:52), the network a plain ConvNet on it, the images normalized
    tensors (main.py:88, 100): our space = normalized (chunk = 2: passes of 2 images, the same step)."""
    net, real, cfg = setup("normalized", False, outer)
    cfg.chunk = chunk
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1).double(), torch.tensor(STD).view(1, 3, 1, 1).double()
    real_u = [(x - m) / s for x in real]
    images = torch.randn((CLASSES * IPC, 3, 8, 8), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    want = authors_outer_iteration(lambda n, t: n.body(t), copy.deepcopy(net), images, real_u, cfg, False)
    got = ours(net, images, real, cfg)  # ours holds [0,1] real pixels; the model normalizes them
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_pixel_steps_are_one_over_std_squared_times_normalized_steps():
    """The same starting images (in pixels), the same matching loss: one image step moves pixels std^2 times as far
    in normalized space, which is why main_CURE's lr_img = 0.1 means a larger step than VICO's."""
    net, real, cfg = setup("pixel", True, 1)
    x0 = torch.rand((CLASSES * IPC, 3, 8, 8), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    step_pixel = ours(copy.deepcopy(net), x0, real, cfg) - x0
    cfg_n = copy.deepcopy(cfg)
    cfg_n.space = "normalized"
    s = torch.tensor(STD).view(1, 3, 1, 1).double()
    m = torch.tensor(MEAN).view(1, 3, 1, 1).double()
    step_norm = ours(copy.deepcopy(net), (x0 - m) / s, real, cfg_n) * s + m - x0
    torch.testing.assert_close(step_norm, step_pixel * s ** 2, rtol=1e-8, atol=1e-14)


def test_clamp_option_keeps_pixels_in_range():
    net, real, cfg = setup("pixel", False, 1)
    cfg.clamp = True
    images = torch.randn((CLASSES * IPC, 3, 8, 8), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = ours(net, images, real, cfg)
    assert got.min() >= 0 and got.max() <= 1 and 0 < got.mean() < 1
