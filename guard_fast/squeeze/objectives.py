"""Squeeze objectives: plain CE, the GUARD regularizers and the adversarial-training baselines (SPEC section 2).

Interface: `loss, stats = objective(model, x, y)`. `model` is the unwrapped Classifier (x in [0,1] pixels,
`model.normalize(x)` = u, `model.body(u)` = logits); the caller back-propagates `loss` exactly once (engine.backward)
and steps. `stats` holds detached 0-dim tensors, read only at the log interval (no host sync here).

Order inside a step: the regularizer's forwards run in eval mode first (BatchNorm uses its running statistics and
does not update them, so they see the statistics from before this step), then the train-mode forward of the main
loss; the model is left in train mode. GUARD perturbations live in normalized-input space u; adversarial-training
attacks live in [0,1] pixel space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from guard_fast.attacks.pgd import fgsm_rs, pgd, trades_attack
from guard_fast.models import Classifier
from guard_fast.runtime.errors import ConfigError

Stats = dict[str, torch.Tensor]
STRATEGIES = ("reference", "batched", "reuse")


@dataclass
class ObjectiveConfig:
    name: str = "guard"
    """squeeze objective: none, guard, guard-curvature, grad-norm, pgd-at, fgsm-rs, trades"""
    strategy: str = "reuse"
    """order of computation for guard: reference (the authors' order), batched (one 2B eval forward), reuse
    (3 forward-backward passes, one graph alive at a time); all give the same value and gradients"""
    h: float = 3.0
    """finite-difference step: L2 length of z in normalized-input space (reference 3.0, ~0.68 in [0,1] units at 224 px)"""
    beta: float = 1e-4
    """guard: coefficient of |ce(u+z) - ce(u)| (what the reference ImageNet-scale code applies)"""
    lam: float = 100 / 128
    """guard-curvature: coefficient of mean_i ||grad ce_i(u+z) - grad ce_i(u)||_2 with per-sample gradients; the
    reference's lambda=100 at batch 128 differentiates the batch mean (a 1/B in each gradient): lam = 100/128"""
    grad_norm_beta: float = 0.01
    """grad-norm: coefficient of mean_i ||grad_u ce_i(u)||_2^2 (per-sample gradients; no reference value, the
    reference detaches this term so it has no effect)"""
    eps: float = 0.031
    """adversarial training: L-inf radius in [0,1] pixel units (pgd-at, fgsm-rs, trades)"""
    alpha: float = 0.007
    """pgd-at / trades: step size in [0,1] pixel units (fgsm-rs uses 1.25 * eps)"""
    steps: int = 10
    """pgd-at / trades: attack steps K"""
    random_start: bool = False
    """pgd-at: start from a uniform point in the eps ball (the reference does not)"""
    trades_beta: float = 6.0
    """trades: coefficient of KL(f(x_adv) || f(x))"""

    def validate(self) -> None:
        if self.name not in OBJECTIVES:
            raise ConfigError(f"objective.name = {self.name!r}: valid values are {', '.join(OBJECTIVES)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"objective.strategy = {self.strategy!r}: valid values are {', '.join(STRATEGIES)}")
        if self.h <= 0 or self.eps < 0 or self.alpha <= 0 or self.steps < 1:
            raise ConfigError("objective.h, objective.alpha must be > 0, objective.eps >= 0, objective.steps >= 1")


def direction(g: torch.Tensor, h: float) -> torch.Tensor:
    """z_i = h (g_i + 1e-7) / (||g_i||_2 + 1e-7): per-sample step of L2 length ~h along the input gradient."""
    norm = g.flatten(1).norm(dim=1).view(-1, *([1] * (g.dim() - 1)))
    return h * (g + 1e-7) / (norm + 1e-7)


def input_grad(model: Classifier, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_u ce(u) (batch-mean eval CE), detached; no parameter gradients are computed."""
    u = u.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model.body(u), y), u)
    return g.detach()


def eval_body(model: Classifier):
    """model.body in eval mode on a snapshot of the BatchNorm running statistics, for graphs that stay alive
    across the train-mode forward.

    The train forward updates running_mean/var in place, and autograd does not version-check them: a joint
    backward through an earlier eval graph silently uses the *updated* statistics (the reference code's gradient
    is off by that much). The snapshot (a few KB) keeps forward and backward consistent.
    """
    model.eval()
    params = dict(model.body.named_parameters())
    buffers = {n: b.clone() for n, b in model.body.named_buffers()}
    return lambda u: torch.func.functional_call(model.body, (params, buffers), (u,))


def train_ce(model: Classifier, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.train()
    return F.cross_entropy(model(x), y)


# ---------------------------------------------------------------------------------------------------------- GUARD

def guard_reference(model: Classifier, x, y, cfg: ObjectiveConfig) -> tuple[torch.Tensor, Stats]:
    """The reference order: eval fwd + input backward for z, eval fwds at u+z and at u, train fwd, one backward."""
    body = eval_body(model)
    u = model.normalize(x)
    z = direction(input_grad(model, u, y), cfg.h)
    ce_pert = F.cross_entropy(body(u + z), y)
    ce_clean = F.cross_entropy(body(u), y)
    reg = cfg.beta * (ce_pert - ce_clean).abs()
    ce = train_ce(model, x, y)
    return ce + reg, {"ce": ce.detach(), "reg": reg.detach()}


def guard_batched(model: Classifier, x, y, cfg: ObjectiveConfig) -> tuple[torch.Tensor, Stats]:
    """After z is known, one eval forward of the packed (2B, ...) batch [u+z ; u] (exact: eval BN is per-sample)."""
    from kernels.pack_perturbed import pack_perturbed

    body = eval_body(model)
    u = model.normalize(x)
    packed = pack_perturbed(u.detach(), input_grad(model, u, y), cfg.h)  # (2B, C, H, W)
    ce_pert, ce_clean = F.cross_entropy(body(packed), torch.cat([y, y]), reduction="none").view(2, -1).mean(1)
    reg = cfg.beta * (ce_pert - ce_clean).abs()
    ce = train_ce(model, x, y)
    return ce + reg, {"ce": ce.detach(), "reg": reg.detach()}


def guard_reuse(model: Classifier, x, y, cfg: ObjectiveConfig) -> tuple[torch.Tensor, Stats]:
    """Three forward-backward passes, each graph freed after its backward.

    dR/dtheta = beta * sign(d) * (grad ce(u+z) - grad ce(u)), d = ce(u+z) - ce(u). Pass 1 (eval, at u) yields g and
    grad_theta ce(u) from one backward; pass 2 (eval, at u+z) yields grad_theta ce(u+z); pass 3 is the train step.
    The regularizer's parameter gradient enters the returned loss as sum_p <p, G_p> with G_p detached, whose
    gradient is exactly G_p; its value is not R, so stats report the true R.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    u = model.normalize(x).detach().requires_grad_(True)
    ce_clean = F.cross_entropy(model.body(u), y)
    g, *grad_clean = torch.autograd.grad(ce_clean, [u, *params])
    z = direction(g, cfg.h)
    ce_pert = F.cross_entropy(model.body(u.detach() + z), y)
    grad_pert = torch.autograd.grad(ce_pert, params)
    d = (ce_pert - ce_clean).detach()
    reg = cfg.beta * d.abs()
    coeff = cfg.beta * torch.sign(d)
    ce = train_ce(model, x, y)
    surrogate = sum((p * (coeff * (gp - gc))).sum() for p, gp, gc in zip(params, grad_pert, grad_clean))
    return ce + surrogate, {"ce": ce.detach(), "reg": reg}


GUARD_STRATEGIES = {"reference": guard_reference, "batched": guard_batched, "reuse": guard_reuse}


def guard(model: Classifier, x, y, cfg: ObjectiveConfig) -> tuple[torch.Tensor, Stats]:
    """beta * |ce(u+z) - ce(u)| + ce_train (SPEC 'guard', the reference ImageNet-scale code)."""
    return GUARD_STRATEGIES[cfg.strategy](model, x, y, cfg)


def guard_curvature(model: Classifier, x, y, cfg: ObjectiveConfig) -> tuple[torch.Tensor, Stats]:
    """lam * mean_i ||grad_u ce_i(u+z) - grad_u ce_i(u)||_2 (paper Eq. 11), per-sample gradients, double backward.

    Both input gradients come from one eval forward of the packed 2B batch with create_graph (eval BN is
    per-sample, so the two halves do not interact).
    """
    body = eval_body(model)
    u = model.normalize(x)
    z = direction(input_grad(model, u, y), cfg.h)
    both = torch.cat([u + z, u]).detach().requires_grad_(True)  # (2B, C, H, W)
    ce_sum = F.cross_entropy(body(both), torch.cat([y, y]), reduction="sum")
    (grads,) = torch.autograd.grad(ce_sum, both, create_graph=True)  # rows: per-sample gradients
    pert, clean = grads.chunk(2)
    reg = cfg.lam * (pert - clean).flatten(1).norm(dim=1).mean()
    ce = train_ce(model, x, y)
    return ce + reg, {"ce": ce.detach(), "reg": reg.detach()}


def grad_norm(model: Classifier, x, y, cfg: ObjectiveConfig) -> tuple[torch.Tensor, Stats]:
    """grad_norm_beta * mean_i ||grad_u ce_i(u)||_2^2 with the graph kept (it changes parameter gradients)."""
    body = eval_body(model)
    u = model.normalize(x).detach().requires_grad_(True)
    ce_sum = F.cross_entropy(body(u), y, reduction="sum")
    (g,) = torch.autograd.grad(ce_sum, u, create_graph=True)
    reg = cfg.grad_norm_beta * g.flatten(1).pow(2).sum(1).mean()
    ce = train_ce(model, x, y)
    return ce + reg, {"ce": ce.detach(), "reg": reg.detach()}


# --------------------------------------------------------------------------------------- baselines and plain CE

def cross_entropy_only(model: Classifier, x, y, cfg: ObjectiveConfig) -> tuple[torch.Tensor, Stats]:
    ce = train_ce(model, x, y)
    return ce, {"ce": ce.detach(), "reg": torch.zeros_like(ce.detach())}


def pgd_at(model: Classifier, x, y, cfg: ObjectiveConfig) -> tuple[torch.Tensor, Stats]:
    """Madry et al.: train on PGD-K examples (generated in eval mode, pixel space)."""
    x_adv = pgd(model, x, y, cfg.eps, cfg.alpha, cfg.steps, cfg.random_start)
    ce = train_ce(model, x_adv, y)
    return ce, {"ce": ce.detach(), "reg": torch.zeros_like(ce.detach())}


def fgsm_rs_at(model: Classifier, x, y, cfg: ObjectiveConfig) -> tuple[torch.Tensor, Stats]:
    """Wong et al. 2020: one FGSM step of 1.25 eps from a uniform random start."""
    x_adv = fgsm_rs(model, x, y, cfg.eps)
    ce = train_ce(model, x_adv, y)
    return ce, {"ce": ce.detach(), "reg": torch.zeros_like(ce.detach())}


def trades(model: Classifier, x, y, cfg: ObjectiveConfig) -> tuple[torch.Tensor, Stats]:
    """Zhang et al. 2019: CE(f(x), y) + trades_beta * KL(f(x_adv) || f(x)), batch mean, both in train mode."""
    x_adv = trades_attack(model, x, cfg.eps, cfg.alpha, cfg.steps)
    model.train()
    logits = model(x)
    ce = F.cross_entropy(logits, y)
    kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(logits, 1), reduction="batchmean")
    reg = cfg.trades_beta * kl
    return ce + reg, {"ce": ce.detach(), "reg": reg.detach()}


OBJECTIVES: dict[str, Callable] = {
    "none": cross_entropy_only,
    "guard": guard,
    "guard-curvature": guard_curvature,
    "grad-norm": grad_norm,
    "pgd-at": pgd_at,
    "fgsm-rs": fgsm_rs_at,
    "trades": trades,
}

# Objectives whose backward differentiates through an input gradient: torch.compile cannot run them.
DOUBLE_BACKWARD = ("guard-curvature", "grad-norm")


class Objective:
    """`loss, stats = objective(model, x, y)` for the configured registry entry."""

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg
        self.fn = OBJECTIVES[cfg.name]

    def __call__(self, model: Classifier, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        return self.fn(model, x, y, self.cfg)


def build_objective(cfg: ObjectiveConfig) -> Objective:
    cfg.validate()
    return Objective(cfg)
