"""Training-time L-inf attacks in [0,1] pixel space (the model normalizes internally).

Every attack runs the model in eval mode (BatchNorm running statistics, no updates) and restores its mode; the
result lies in the eps ball around x and in [0,1]. Evaluation uses torchattacks (guard_fast.attacks.suite); these are
the light-weight versions adversarial training and quick robust validation need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def _uniform_like(x: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    r = torch.rand(x.shape, generator=generator, device=x.device if generator is None else generator.device,
                   dtype=x.dtype)
    return (2 * r - 1).mul_(eps).to(x.device)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
        random_start: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """PGD-K: `steps` sign-gradient ascent steps of size alpha on CE, projected to the eps ball and [0,1]."""
    was_training = model.training
    model.eval()
    x = x.detach()
    x_adv = _project(x + _uniform_like(x, eps, generator), x, eps) if random_start else x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = _project(x_adv.detach() + alpha * g.sign(), x, eps)
    model.train(was_training)
    return x_adv.detach()


def fgsm_rs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """FGSM with a uniform random start and step 1.25 eps (Wong et al. 2020)."""
    return pgd(model, x, y, eps, 1.25 * eps, steps=1, random_start=True, generator=generator)


def trades_attack(model: nn.Module, x: torch.Tensor, eps: float, alpha: float, steps: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """TRADES inner maximization: sign ascent on KL(f(x_adv) || f(x)) from x + 0.001 N(0, 1)."""
    was_training = model.training
    model.eval()
    x = x.detach()
    with torch.no_grad():
        p_clean = F.softmax(model(x), 1)
    noise = torch.randn(x.shape, generator=generator, device=x.device if generator is None else generator.device,
                        dtype=x.dtype).to(x.device)
    x_adv = _project(x + 0.001 * noise, x, eps)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(x_adv), 1), p_clean, reduction="sum")
        (g,) = torch.autograd.grad(kl, x_adv)
        x_adv = _project(x_adv.detach() + alpha * g.sign(), x, eps)
    model.train(was_training)
    return x_adv.detach()
