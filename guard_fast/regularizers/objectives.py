"""Training objectives: plain CE, the GUARD regularizers and the adversarial-training baselines (docs/spec.md
section 2), shared by the squeeze teacher (guard_fast/squeeze/stage.py) and the MTT/TESLA experts
(guard_fast/distill/experts.py).

Interface: `loss, stats = objective(model, x, y)`. `model` is the unwrapped Classifier (x in [0,1] pixels,
`model.normalize(x)` = u, `model.body(u)` = logits); the caller back-propagates `loss` exactly once (engine.backward,
so DeepSpeed reduces every gradient once) and steps. The value of `loss` is always ce_train + R (true values, so the
loop's non-finite check sees them), and `stats` holds detached 0-dim tensors 'ce' (train-mode CE) and 'reg' (the
true R), read only at the log interval (no host sync here).

BatchNorm statistics of the regularizers (`objective.bn_stats`). The train-mode forward of the main loss updates the
running statistics in place; the regularizer's forwards run in eval mode and read them.
- `updated` (default, the authors' semantics: yumozi/GUARD `pretrain/pretrain.py`, `pretrain_cifar.py`): the train
  forward comes first, then the eval forwards (input gradient for z, then u+z and u), which see the statistics as
  updated by this step, then one joint backward. Nothing changes the statistics after the eval forwards, so that
  backward is consistent.
- `snapshot`: the eval forwards see the statistics from before this step (they run first, on a copy of the buffers
  that the train forward cannot touch). A different function, kept for comparison.
The fast strategies reach the `updated` semantics without keeping the train graph alive: the train forward-backward
runs first (`torch.autograd.grad`, parameter gradients only, graph freed), and its gradient re-enters the returned
loss through `param_grad_term` (value 0, gradient exactly G), so the caller's single backward still delivers
every gradient, once. The model is left in train mode. GUARD perturbations live in normalized-input space u;
adversarial-training attacks live in [0,1] pixel space.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from guard_fast.attacks.pgd import fgsm_rs, pgd, trades_attack
from guard_fast.models import Classifier
from guard_fast.runtime.bounds import NonNegative, Positive, Radius
from guard_fast.runtime.errors import ConfigError

Stats = dict[str, torch.Tensor]
STRATEGIES = ("reference", "batched", "reuse")
H_SCALINGS = ("none", "resolution")
REFERENCE_INPUT = (3, 224, 224)  # the paper's h = 3 is an L2 length on normalized ImageNet inputs of this shape
BN_STATS = ("updated", "snapshot")
LAM_CONVENTIONS = ("reference", "per-sample")


@dataclass
class ObjectiveConfig:
    name: str = "guard"
    """training objective: none (plain CE), guard, guard-curvature, grad-norm, pgd-at, fgsm-rs, trades"""
    strategy: str = "reuse"
    """order of computation for guard: reference (literal: under bn_stats=updated exactly the authors' order),
    batched (one 2B eval forward), reuse (3 forward-backward passes, one graph alive at a time); same value and
    gradients for a given bn_stats"""
    bn_stats: str = "updated"
    """BatchNorm running statistics the regularizer's eval forwards see (guard, guard-curvature, grad-norm):
    updated (as left by this step's train forward; the authors' semantics) or snapshot (from before the step)"""
    h: Positive = 3.0
    """finite-difference step: L2 length of z in normalized-input space (reference 3.0, ~0.68 in [0,1] pixel units
    at 224 px); with h_scaling = resolution, the length at 3x224x224, rescaled to the dataset's input shape"""
    h_scaling: str = "none"
    """none: h is used as given; resolution: the step is h * sqrt(C*H*W / 150528), the same per-element RMS step as
    h on 3x224x224 inputs (h = 3 -> 0.217 at 1x28x28, 0.391 at 3x32x32); see scaled_h"""
    beta: NonNegative = 1e-4
    """guard: coefficient of |ce(u+z) - ce(u)| (what the reference ImageNet-scale code applies)"""
    lam: NonNegative = 100.0
    """guard-curvature: coefficient lambda (dimensionless), in the convention of objective.lam_convention (the
    authors' CIFAR script: 100 in the reference convention)"""
    lam_convention: str = "reference"
    """guard-curvature: reference = lam * mean_i ||grad_u ce(u+z) - grad_u ce(u)||_2 rows with ce the batch MEAN
    (each row carries 1/B, B the global batch = micro-batch x data-parallel ranks; the authors' convention),
    per-sample = the same with per-sample gradients (lam_per_sample = lam_reference / B)"""
    grad_norm_beta: NonNegative = 0.01
    """grad-norm: coefficient of mean_i ||grad_u ce_i(u)||_2^2 (per-sample gradients; no reference value, the
    reference detaches this term so it has no effect)"""
    eps: Radius = 0.031
    """adversarial training: L-inf radius in [0,1] pixel units (pgd-at, fgsm-rs, trades)"""
    alpha: Radius = 0.007
    """pgd-at / trades: step size in [0,1] pixel units (fgsm-rs uses 1.25 * eps)"""
    steps: int = 10
    """pgd-at / trades: attack steps K"""
    random_start: bool = False
    """pgd-at: start from a uniform point in the eps ball (the reference does not)"""
    trades_beta: NonNegative = 6.0
    """trades: coefficient of KL(f(x_adv) || f(x))"""

    def validate(self) -> None:
        if self.name not in OBJECTIVES:
            raise ConfigError(f"objective.name = {self.name!r}: valid values are {', '.join(OBJECTIVES)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"objective.strategy = {self.strategy!r}: valid values are {', '.join(STRATEGIES)}")
        if self.bn_stats not in BN_STATS:
            raise ConfigError(f"objective.bn_stats = {self.bn_stats!r}: valid values are {', '.join(BN_STATS)}")
        if self.h_scaling not in H_SCALINGS:
            raise ConfigError(f"objective.h_scaling = {self.h_scaling!r}: valid values are {', '.join(H_SCALINGS)}")
        if self.lam_convention not in LAM_CONVENTIONS:
            raise ConfigError(f"objective.lam_convention = {self.lam_convention!r}: valid values are "
                              f"{', '.join(LAM_CONVENTIONS)}")
        if self.h <= 0 or self.eps < 0 or self.alpha <= 0 or self.steps < 1:
            raise ConfigError("objective.h, objective.alpha must be > 0, objective.eps >= 0, objective.steps >= 1")


def scaled_h(h: float, shape: Sequence[int], reference: Sequence[int] = REFERENCE_INPUT) -> float:
    """h * sqrt(C*H*W / (C0*H0*W0)): an L2 step of length h on `reference`-shaped inputs has per-element RMS
    h / sqrt(C0*H0*W0); this returns the L2 length with the same per-element RMS on `shape` (C, H, W)."""
    return h * math.sqrt(math.prod(shape) / math.prod(reference))


def effective_h(cfg: ObjectiveConfig, shape: Sequence[int] | None) -> float:
    """The step the objective uses: cfg.h, or scaled_h(cfg.h, shape) under h_scaling = resolution."""
    if cfg.h_scaling == "none":
        return cfg.h
    if shape is None:
        raise ConfigError("objective.h_scaling = resolution needs the input shape (C, H, W)")
    return scaled_h(cfg.h, shape)


def direction(g: torch.Tensor, h: float) -> torch.Tensor:
    """z_i = h (g_i + 1e-7) / (||g_i||_2 + 1e-7): per-sample step of L2 length ~h along the input gradient."""
    norm = g.flatten(1).norm(dim=1).view(-1, *([1] * (g.dim() - 1)))
    return h * (g + 1e-7) / (norm + 1e-7)


def input_grad(body: Callable, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_u ce(u) (batch-mean CE of `body`, the model in eval mode), detached; no parameter gradients."""
    u = u.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(body(u), y), u)
    return g.detach()


def eval_body(model: Classifier, bn_stats: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """model.body in eval mode, reading the BatchNorm running statistics as `bn_stats` says.

    updated: the module itself (call it after this step's train forward; nothing changes the buffers afterwards).
    snapshot: a functional call on a copy of the buffers taken now, before the train forward: the train forward
    updates running_mean/var in place and autograd does not version-check them, so an eval graph that stays alive
    across it would otherwise be back-propagated with statistics other than those of its forward.
    """
    model.eval()
    if bn_stats == "updated":
        return model.body
    params = dict(model.body.named_parameters())
    buffers = {n: b.clone() for n, b in model.body.named_buffers()}
    return lambda u: torch.func.functional_call(model.body, (params, buffers), (u,))


def train_ce(model: Classifier, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Batch-mean CE in train mode (updates the BatchNorm running statistics)."""
    model.train()
    return F.cross_entropy(model(x), y)


def trainable(model: Classifier) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_grads(model: Classifier, x: torch.Tensor, y: torch.Tensor,
                params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Train-mode forward and backward now (updates the running statistics): (ce detached, d ce / d params).

    Parameter gradients only (no .grad is touched, DeepSpeed's hooks do not fire); the graph is freed here."""
    ce = train_ce(model, x, y)
    grads = torch.autograd.grad(ce, params)
    return ce.detach(), list(grads)


def param_grad_term(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 0-dim tensor of value 0 whose gradient with respect to each p is exactly G_p (G detached).

    s = sum_p <p, G_p> has d s / d p = G_p; returning s - s.detach() keeps that gradient and the value 0, so the
    caller's single backward adds precomputed gradients. A non-finite G makes the value NaN (the loop sees it)."""
    s = sum((p * g.detach()).sum() for p, g in zip(params, grads, strict=True))
    return s - s.detach()


def regularized(model: Classifier, x, y, cfg: ObjectiveConfig,
                reg_fn: Callable[[Callable, torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, Stats]:
    """ce_train + R with R = reg_fn(body, u, y) computed on the eval-mode body, under cfg.bn_stats.

    updated: the train forward-backward first (statistics updated, graph freed), then R's graph; the returned loss
    is R + param_grad_term(d ce / d theta), value ce + R. One graph alive at a time.
    snapshot: R's graph on a copy of the statistics from before the step, then the train forward; loss = ce + R.
    """
    if cfg.bn_stats == "updated":
        params = trainable(model)
        ce, g_train = train_grads(model, x, y, params)
        reg = reg_fn(eval_body(model, "updated"), model.normalize(x), y)
        model.train()
        return reg + ce + param_grad_term(params, g_train), {"ce": ce, "reg": reg.detach()}
    reg = reg_fn(eval_body(model, "snapshot"), model.normalize(x), y)
    ce = train_ce(model, x, y)
    return ce + reg, {"ce": ce.detach(), "reg": reg.detach()}


# ---------------------------------------------------------------------------------------------------------- GUARD

def guard_reg(body: Callable, u: torch.Tensor, y: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """beta * |ce(u+z) - ce(u)|, z from the input gradient at u; two separate eval forwards (differentiable)."""
    z = direction(input_grad(body, u, y), cfg.h)
    return cfg.beta * (F.cross_entropy(body(u + z), y) - F.cross_entropy(body(u), y)).abs()


def guard_reference(model: Classifier, x, y, cfg: ObjectiveConfig) -> tuple[torch.Tensor, Stats]:
    """The literal order, every graph alive until the caller's one joint backward.

    updated (the authors' order, `pretrain/pretrain.py`): train fwd; eval fwd + input backward for z; eval fwds at
    u+z and at u; one backward of ce + R. snapshot: the eval part first, on a copy of the pre-step statistics, then
    the train fwd."""
    if cfg.bn_stats == "updated":
        ce = train_ce(model, x, y)
        reg = guard_reg(eval_body(model, "updated"), model.normalize(x), y, cfg)
        model.train()
    else:
        reg = guard_reg(eval_body(model, "snapshot"), model.normalize(x), y, cfg)
        ce = train_ce(model, x, y)
    return ce + reg, {"ce": ce.detach(), "reg": reg.detach()}


def guard_batched_reg(body: Callable, u: torch.Tensor, y: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """After z is known, one eval forward of the packed (2B, ...) batch [u+z ; u] (exact: eval BN is per-sample)."""
    from kernels.pack_perturbed import pack_perturbed

    packed = pack_perturbed(u.detach(), input_grad(body, u, y), cfg.h)  # (2B, C, H, W)
    ce_pert, ce_clean = F.cross_entropy(body(packed), torch.cat([y, y]), reduction="none").view(2, -1).mean(1)
    return cfg.beta * (ce_pert - ce_clean).abs()


def guard_batched(model: Classifier, x, y, cfg: ObjectiveConfig) -> tuple[torch.Tensor, Stats]:
    """guard with the packed 2B eval forward; under updated the train forward-backward runs first (`regularized`)."""
    return regularized(model, x, y, cfg, lambda body, u, y_: guard_batched_reg(body, u, y_, cfg))


def guard_reuse(model: Classifier, x, y, cfg: ObjectiveConfig) -> tuple[torch.Tensor, Stats]:
    """Three forward-backward passes, each graph freed after its backward; the returned loss carries the gradient.

    dR/dtheta = beta * sign(d) * (grad ce(u+z) - grad ce(u)), d = ce(u+z) - ce(u). The train pass (train mode)
    yields grad ce_train; the clean pass (eval, at u) yields g and grad_theta ce(u) from one backward; the perturbed
    pass (eval, at u+z) yields grad_theta ce(u+z). updated: train pass first; snapshot: train pass last. The summed
    gradient enters the returned loss through `param_grad_term` (value ce + R, gradient exactly the sum).
    """
    params = trainable(model)
    if cfg.bn_stats == "updated":
        ce, acc = train_grads(model, x, y, params)
    model.eval()  # snapshot: the train pass comes after every eval backward, so the module's buffers serve as is
    u = model.normalize(x).detach().requires_grad_(True)
    ce_clean = F.cross_entropy(model.body(u), y)
    g, *grad_clean = torch.autograd.grad(ce_clean, [u, *params])
    ce_pert = F.cross_entropy(model.body(u.detach() + direction(g, cfg.h)), y)
    d = (ce_pert - ce_clean).detach()
    coeff = cfg.beta * torch.sign(d)  # 0-dim: no host sync
    if cfg.bn_stats == "updated":
        for a, gc in zip(acc, grad_clean, strict=True):  # acc -= coeff * grad ce(u), in place
            a.addcmul_(gc, coeff, value=-1)
    else:
        acc = [gc.mul_(-coeff) for gc in grad_clean]
    del grad_clean  # at most two parameter-sized gradient sets alive at once
    for a, gp in zip(acc, torch.autograd.grad(ce_pert, params), strict=True):  # acc += coeff * grad ce(u+z)
        a.addcmul_(gp, coeff)
    if cfg.bn_stats == "snapshot":  # only now: every eval graph has been back-propagated on the pre-step statistics
        ce, g_train = train_grads(model, x, y, params)
        for a, gt in zip(acc, g_train, strict=True):
            a.add_(gt)
    reg = cfg.beta * d.abs()
    model.train()
    return (ce + reg) + param_grad_term(params, acc), {"ce": ce, "reg": reg}


GUARD_STRATEGIES = {"reference": guard_reference, "batched": guard_batched, "reuse": guard_reuse}


def guard(model: Classifier, x, y, cfg: ObjectiveConfig) -> tuple[torch.Tensor, Stats]:
    """beta * |ce(u+z) - ce(u)| + ce_train (docs/spec.md section 2, 'guard': the reference ImageNet-scale code)."""
    return GUARD_STRATEGIES[cfg.strategy](model, x, y, cfg)


def curvature_reg(body: Callable, u: torch.Tensor, y: torch.Tensor, cfg: ObjectiveConfig,
                  ranks: int | None = None) -> torch.Tensor:
    """lam * mean_i ||grad_u ce(u+z)_i - grad_u ce(u)_i||_2 (paper Eq. 11), kept differentiable (double backward).

    Both input gradients come from one eval forward of the packed 2B batch with create_graph (eval BN is
    per-sample, so the two halves do not interact). The rows are per-sample gradients (summed CE); the reference
    convention differentiates the batch mean instead, i.e. divides each row by B (`global_batch(len(y), ranks)`)."""
    z = direction(input_grad(body, u, y), cfg.h)
    both = torch.cat([u + z, u]).detach().requires_grad_(True)  # (2B, C, H, W)
    ce_sum = F.cross_entropy(body(both), torch.cat([y, y]), reduction="sum")
    (grads,) = torch.autograd.grad(ce_sum, both, create_graph=True)  # rows: per-sample gradients
    pert, clean = grads.chunk(2)
    scale = cfg.lam / global_batch(len(y), ranks) if cfg.lam_convention == "reference" else cfg.lam
    return scale * (pert - clean).flatten(1).norm(dim=1).mean()


def global_batch(micro_batch: int, ranks: int | None = None) -> int:
    """The batch the authors' mean runs over: their DataParallel averages the loss over the whole batch, and with
    data-parallel ranks averaging their gradients, dividing by micro-batch x ranks gives exactly their gradient.
    ranks: the data-parallel ranks that share one batch (None: the process group's size; 1: a network trained by
    one process alone, as each MTT/TESLA expert is)."""
    import torch.distributed as dist

    if ranks is None:
        ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return micro_batch * ranks


def guard_curvature(model: Classifier, x, y, cfg: ObjectiveConfig, ranks: int | None = None
                    ) -> tuple[torch.Tensor, Stats]:
    """ce_train + the curvature regularizer (`curvature_reg`), under cfg.bn_stats (`regularized`)."""
    return regularized(model, x, y, cfg, lambda body, u, y_: curvature_reg(body, u, y_, cfg, ranks))


def grad_norm_reg(body: Callable, u: torch.Tensor, y: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """grad_norm_beta * mean_i ||grad_u ce_i(u)||_2^2 with the graph kept (it changes parameter gradients)."""
    u = u.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(body(u), y, reduction="sum"), u, create_graph=True)
    return cfg.grad_norm_beta * g.flatten(1).pow(2).sum(1).mean()


def grad_norm(model: Classifier, x, y, cfg: ObjectiveConfig) -> tuple[torch.Tensor, Stats]:
    """ce_train + the gradient-norm regularizer (`grad_norm_reg`), under cfg.bn_stats (`regularized`)."""
    return regularized(model, x, y, cfg, lambda body, u, y_: grad_norm_reg(body, u, y_, cfg))


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
# Objectives whose value depends on how many ranks share the batch (guard-curvature's reference convention): they take
# `ranks` (see `global_batch`).
RANK_DEPENDENT = ("guard-curvature",)


class Objective:
    """`loss, stats = objective(model, x, y)` for the configured registry entry.

    ranks: the data-parallel ranks that share one batch: None (the squeeze teacher: the process group's size) or 1
    (a network each process trains alone, as the MTT/TESLA experts)."""

    def __init__(self, cfg: ObjectiveConfig, ranks: int | None = None):
        self.cfg = cfg
        fn = OBJECTIVES[cfg.name]
        self.fn = functools.partial(fn, ranks=ranks) if cfg.name in RANK_DEPENDENT else fn

    def __call__(self, model: Classifier, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        return self.fn(model, x, y, self.cfg)


def build_objective(cfg: ObjectiveConfig, input_shape: Sequence[int] | None = None,
                    ranks: int | None = None) -> Objective:
    """The configured objective; `input_shape` (C, H, W) resolves h_scaling = resolution into the step used."""
    cfg.validate()
    return Objective(dataclasses.replace(cfg, h=effective_h(cfg, input_shape), h_scaling="none"), ranks)
