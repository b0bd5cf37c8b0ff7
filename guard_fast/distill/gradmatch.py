"""The losses of gradient matching: DC's layer-wise matching distance and GUARD(DC)'s real-batch loss (CE plus the
curvature term R of paper Eq. 11 along main_CURE.py's sign direction); guard_fast.distill.dc documents both against
the authors' code."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from guard_fast.models import Classifier


def match_distance(gw_syn: list[torch.Tensor], gw_real: list[torch.Tensor]) -> torch.Tensor:
    """DC's 'ours': sum over layers of sum over output nodes o of 1 - <a_o, b_o> / (||a_o|| ||b_o|| + 1e-6), rows o
    of each gradient reshaped to (out, -1); 1-D tensors (biases, norm scales) contribute 0, as in the reference."""
    total = gw_syn[0].new_zeros(())
    for a, b in zip(gw_syn, gw_real, strict=True):
        if a.dim() < 2:
            continue
        a, b = a.flatten(1), b.flatten(1)
        total = total + (1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-6)).sum()
    return total


def sign_direction(g: torch.Tensor, h: float) -> torch.Tensor:
    """z_i = h (sign(g_i) + 1e-7) / (||sign(g_i)||_2 + 1e-7) per image (main_CURE.py)."""
    s = torch.sign(g)
    norm = s.flatten(1).norm(dim=1).view(-1, *([1] * (g.dim() - 1)))
    return h * (s + 1e-7) / (norm + 1e-7)


def guard_real_loss(model: Classifier, x: torch.Tensor, y: torch.Tensor, lam: float, h: float,
                    guard: bool = True, batch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE(x) + lam * R, R) with R = mean_i ||grad_x ce(x+z)_i - grad_x ce(x)_i||_2 in eval mode (ce batch mean,
    x in [0,1] pixels); (CE, 0) without guard. The model is left in train mode.

    x may be a chunk of a batch of `batch` images (0: x is the whole batch): every batch mean is then the chunk's sum
    divided by `batch` (each gradient in R carries 1/batch), so the batch's loss is the sum of its chunks' losses
    (exact for networks that treat images independently, which DC requires: BatchNorm is refused)."""
    n = batch or len(x)

    def ce_of(inputs: torch.Tensor) -> torch.Tensor:  # batch-mean CE's share of this chunk
        return F.cross_entropy(model(inputs), y, reduction="sum") / n

    model.train()
    ce = ce_of(x)
    if not guard:
        return ce, ce.new_zeros(())
    model.eval()
    xg = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(ce_of(xg), xg)  # no parameter gradients
    z = sign_direction(g, h)
    xr = x.detach().requires_grad_(True)
    (gd,) = torch.autograd.grad(ce_of(xr + z) - ce_of(xr), xr, create_graph=True)  # grad ce(x+z) - grad ce(x)
    reg = gd.flatten(1).norm(dim=1).sum() / n
    model.train()
    return ce + lam * reg, reg
