"""Evaluation attacks on torchattacks, with the paper's settings as defaults (docs/spec.md section 5).

Units: every eps is an L-inf radius in [0,1] pixel units, because the attacks see the [0,1] model (normalization is
the model's first layer, so torchattacks' own `set_normalization_used` is never called). Step sizes scale with eps:
PGD-100 steps eps * pgd_alpha_frac (0.25/255 at eps 1/255, the paper's value) and MIM steps eps * mim_alpha_frac
(1/255 at eps 1/255), so a sweep over eps = 1, 2, 4, 8 /255 keeps the paper's step-to-radius ratio. CW is L2 and has
no eps: it runs once per checkpoint (`ATTACKS["cw"].uses_eps` is False).

MIM follows the authors' own implementation by default (mim_grad_norm = "batch", `BatchL1MIM`): both
yumozi/GUARD train/evaluate.py:252-272 (the SRe2L-side tables; step 1/255, :39) and yumozi/dataset_condensation
utils.py:527-547 (main_CURE.py's Table 5 evaluation; step 0.25/255, :404) divide each step's gradient by its L1 norm
over the WHOLE batch before adding it to the momentum; torchattacks' MIFGSM (mim_grad_norm = "image") divides by each
image's mean absolute gradient. The two agree at the first step and differ after it (the batch norm weighs each
image's steps by the whole batch's gradient size), so the batch-coupled version attacks whole loader batches
(`AttackConfig.couples_batch`), as the authors' loops do, and its result depends on the evaluation batch size.

AutoAttack (standard) is built here as torchattacks' own recipe - MultiAttack of APGD-CE, APGD-T, FAB-T and Square,
each run on what the previous ones left robust - so its sub-attack steps are a setting: aa_steps = 10 is what
torchattacks.AutoAttack runs; aa_steps = 100 is the original AutoAttack's standard
(Croce & Hein 2020: 100 iterations for APGD-CE, APGD-T and FAB-T). APGD-T and FAB-T try the top aa_target_classes
other classes (the original's 9), never more than the dataset has: torchattacks derives that count from `n_classes`,
which is therefore min(num_classes, aa_target_classes + 1) - never torchattacks' default of 10 on a smaller dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
import torchattacks

from guard_fast.runtime.bounds import NonNegative, Positive, Radius
from guard_fast.runtime.errors import ConfigError

# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class AttackConfig:
    names: list[str] = field(default_factory=lambda: ["pgd100", "square", "autoattack", "cw", "mim"])
    """attacks to run, in report order: pgd100, square, autoattack, cw, mim (any subset)"""
    eps: list[Radius] = field(default_factory=lambda: [1 / 255])
    """L-inf radii in [0,1] pixel units, one report table each (write 1/255 or 4/255); CW ignores them"""
    pgd_steps: int = 100
    """PGD iterations (the paper: 100)"""
    pgd_alpha_frac: Positive = 0.25
    """PGD step size as a fraction of eps (0.25 -> 0.25/255 at eps 1/255, the paper's step)"""
    pgd_random_start: bool = True
    """start PGD from a uniform random point in the eps ball (the paper: yes)"""
    square_queries: int = 5000
    """Square attack: model queries per image (the paper: 5000)"""
    square_p_init: float = 0.8
    """Square attack: initial fraction of pixels changed per query (torchattacks' and the original's 0.8)"""
    square_restarts: int = 1
    """Square attack: random restarts"""
    aa_version: str = "standard"
    """AutoAttack version: standard (APGD-CE, APGD-T, FAB-T, Square; built here), plus or rand (torchattacks as is)"""
    aa_steps: int = 10
    """iterations of AutoAttack's APGD-CE, APGD-T and FAB-T: 10 = torchattacks' AutoAttack, 100 = the original
    AutoAttack; standard version only"""
    aa_target_classes: int = 9
    """classes APGD-T and FAB-T target (the original's 9), capped at num_classes - 1; 0 = all num_classes - 1"""
    aa_square_queries: int = 5000
    """queries of AutoAttack's Square sub-attack per image (the original's 5000); standard version only"""
    cw_c: Positive = 1e-4
    """CW (L2): weight of the misclassification term against the squared L2 distance (the paper: 1e-4)"""
    cw_kappa: NonNegative = 0.0
    """CW: confidence margin in logits (the paper: 0)"""
    cw_steps: int = 50
    """CW: Adam steps (the paper: 50)"""
    cw_lr: Positive = 0.01
    """CW: Adam learning rate in tanh space (the paper: 0.01)"""
    mim_steps: int = 20
    """MIM (momentum iterative FGSM): iterations, no random start (the paper: 20)"""
    mim_alpha_frac: Positive = 1.0
    """MIM step size as a fraction of eps (1.0 -> 1/255 at eps 1/255, the paper's step)"""
    mim_decay: NonNegative = 1.0
    """MIM momentum decay factor (the paper: 1.0)"""
    mim_grad_norm: str = "batch"
    """MIM gradient normalization: batch (L1 norm over the whole batch, the authors' evaluation code) or image
    (per-image mean |g|, torchattacks' MIFGSM)"""

    def validate(self) -> None:
        unknown = [n for n in self.names if n not in ATTACKS]
        if unknown:
            raise ConfigError(f"attack.names: unknown attack {unknown[0]!r}; valid: {', '.join(ATTACKS)}")
        if not self.names or len(set(self.names)) != len(self.names):
            raise ConfigError(f"attack.names = {self.names}: give at least one attack, each once")
        if any(self.uses_eps(n) for n in self.names) and not self.eps:
            raise ConfigError("attack.eps is empty: give at least one L-inf radius, e.g. --attack.eps=1/255")
        if any(not 0.0 < e <= 1.0 for e in self.eps) or len(set(self.eps)) != len(self.eps):
            raise ConfigError(f"attack.eps = {self.eps}: each radius must be in (0, 1] ([0,1] pixel units), once")
        counts = {"pgd_steps": self.pgd_steps, "square_queries": self.square_queries, "aa_steps": self.aa_steps,
                  "aa_square_queries": self.aa_square_queries, "cw_steps": self.cw_steps,
                  "mim_steps": self.mim_steps, "square_restarts": self.square_restarts}
        for key, value in counts.items():
            if value < 1:
                raise ConfigError(f"attack.{key} = {value}: must be >= 1")
        for key in ("pgd_alpha_frac", "mim_alpha_frac", "cw_lr", "cw_c"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"attack.{key} = {getattr(self, key)}: must be > 0")
        if not 0.0 < self.square_p_init <= 1.0:
            raise ConfigError(f"attack.square_p_init = {self.square_p_init}: must be in (0, 1]")
        if self.aa_target_classes < 0 or self.cw_kappa < 0 or self.mim_decay < 0:
            raise ConfigError("attack.aa_target_classes, attack.cw_kappa and attack.mim_decay must be >= 0")
        if self.mim_grad_norm not in MIM_NORMS:
            raise ConfigError(f"attack.mim_grad_norm = {self.mim_grad_norm!r}: valid values are "
                              f"{', '.join(MIM_NORMS)}")
        if self.aa_version not in AA_VERSIONS:
            raise ConfigError(f"attack.aa_version = {self.aa_version!r}: valid values are {', '.join(AA_VERSIONS)}")
        if self.aa_version != "standard" and (self.aa_steps != 10 or self.aa_square_queries != 5000):
            raise ConfigError(f"attack.aa_steps/aa_square_queries apply to aa_version = 'standard' only; torchattacks "
                              f"runs {self.aa_version!r} at 10 steps and 5000 queries")

    @staticmethod
    def uses_eps(name: str) -> bool:
        return ATTACKS[name].uses_eps

    def couples_batch(self, name: str) -> bool:
        """True if an image's result depends on the other images of its batch (then attack whole batches)."""
        return name == "mim" and self.mim_grad_norm == "batch"


AA_VERSIONS = ("standard", "plus", "rand")
MIM_NORMS = ("batch", "image")


class BatchL1MIM(torchattacks.MIFGSM):
    """MIM as the GUARD authors' evaluation code computes it (see the module docstring): m <- decay m + g / ||g||_1
    (g the input gradient of the batch-mean CE, the norm over the whole batch), x <- x + alpha sign(m), projected to
    the eps ball around the input and to [0, 1]; no random start, eval mode (torchattacks' wrapper)."""

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        momentum = torch.zeros_like(images)
        adv = images.clone()
        for _ in range(self.steps):
            adv.requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(self.get_logits(adv), labels), adv)
            # an all-zero gradient gives 0 here (the authors' code divides by zero)
            momentum = self.decay * momentum + g / g.abs().sum().clamp_min(torch.finfo(g.dtype).tiny)
            adv = adv.detach() + self.alpha * momentum.sign()
            adv = torch.minimum(torch.maximum(adv, images - self.eps), images + self.eps).clamp(0, 1).detach()
        return adv

# ----------------------------------------------------------------------------------------------------------------
# Builders: (model, cfg, eps, num_classes, seed) -> torchattacks.Attack


def _pgd(model, cfg: AttackConfig, eps: float, num_classes: int, seed: int) -> torchattacks.Attack:
    return torchattacks.PGD(model, eps=eps, alpha=eps * cfg.pgd_alpha_frac, steps=cfg.pgd_steps,
                            random_start=cfg.pgd_random_start)


def _square(model, cfg: AttackConfig, eps: float, num_classes: int, seed: int) -> torchattacks.Attack:
    return torchattacks.Square(model, norm="Linf", eps=eps, n_queries=cfg.square_queries,
                               n_restarts=cfg.square_restarts, p_init=cfg.square_p_init, loss="margin", seed=seed)


def aa_n_classes(cfg: AttackConfig, num_classes: int) -> int:
    """The `n_classes` torchattacks' APGD-T/FAB-T get: they target the top n_classes - 1 other classes."""
    targets = num_classes - 1 if cfg.aa_target_classes == 0 else min(cfg.aa_target_classes, num_classes - 1)
    return targets + 1


def _autoattack(model, cfg: AttackConfig, eps: float, num_classes: int, seed: int) -> torchattacks.Attack:
    if num_classes < 2:
        raise ConfigError(f"AutoAttack needs at least 2 classes, the data has {num_classes}")
    n_classes = aa_n_classes(cfg, num_classes)
    if cfg.aa_version != "standard":
        return torchattacks.AutoAttack(model, norm="Linf", eps=eps, version=cfg.aa_version, n_classes=n_classes,
                                       seed=seed)
    steps = cfg.aa_steps
    return torchattacks.MultiAttack([  # the order and arguments of torchattacks.AutoAttack(version="standard")
        torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed, loss="ce"),
        torchattacks.APGDT(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed, n_classes=n_classes),
        torchattacks.FAB(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed, multi_targeted=True,
                         n_classes=n_classes),
        torchattacks.Square(model, norm="Linf", eps=eps, n_queries=cfg.aa_square_queries, n_restarts=1, seed=seed),
    ])


def _cw(model, cfg: AttackConfig, eps: float, num_classes: int, seed: int) -> torchattacks.Attack:
    return torchattacks.CW(model, c=cfg.cw_c, kappa=cfg.cw_kappa, steps=cfg.cw_steps, lr=cfg.cw_lr)


def _mim(model, cfg: AttackConfig, eps: float, num_classes: int, seed: int) -> torchattacks.Attack:
    cls = BatchL1MIM if cfg.mim_grad_norm == "batch" else torchattacks.MIFGSM
    return cls(model, eps=eps, alpha=eps * cfg.mim_alpha_frac, steps=cfg.mim_steps, decay=cfg.mim_decay)


def _aa_settings(cfg: AttackConfig, num_classes: int) -> dict:
    n_classes = aa_n_classes(cfg, num_classes)
    out = {"version": cfg.aa_version, "n_classes": n_classes, "target_classes": n_classes - 1}
    if cfg.aa_version == "standard":
        return {**out, "sub_attacks": "APGD-CE, APGD-T, FAB-T, Square", "steps": cfg.aa_steps,
                "square_queries": cfg.aa_square_queries}
    return {**out, "steps": 10, "built_by": f"torchattacks.AutoAttack(version={cfg.aa_version!r})"}


@dataclass(frozen=True)
class AttackSpec:
    column: str
    """header in the paper's table layout"""
    norm: str
    """threat model: Linf (bounded by eps) or L2 (CW: unbounded, minimizes the distance)"""
    uses_eps: bool
    """False: run once per checkpoint, whatever attack.eps holds"""
    build: Callable[..., torchattacks.Attack]
    """(model, cfg, eps, num_classes, seed) -> attack"""
    settings: Callable[[AttackConfig, int], dict]
    """(cfg, num_classes) -> the effective parameters, for the report"""


# One registry; its order is the paper's column order.
ATTACKS: dict[str, AttackSpec] = {
    "pgd100": AttackSpec("PGD100", "Linf", True, _pgd, lambda c, k: {
        "steps": c.pgd_steps, "alpha_frac_of_eps": c.pgd_alpha_frac, "random_start": c.pgd_random_start}),
    "square": AttackSpec("Square", "Linf", True, _square, lambda c, k: {
        "queries": c.square_queries, "p_init": c.square_p_init, "restarts": c.square_restarts, "loss": "margin"}),
    "autoattack": AttackSpec("AutoAttack", "Linf", True, _autoattack, _aa_settings),
    "cw": AttackSpec("CW", "L2", False, _cw, lambda c, k: {
        "c": c.cw_c, "kappa": c.cw_kappa, "steps": c.cw_steps, "lr": c.cw_lr}),
    "mim": AttackSpec("MIM", "Linf", True, _mim, lambda c, k: {
        "steps": c.mim_steps, "alpha_frac_of_eps": c.mim_alpha_frac, "decay": c.mim_decay, "random_start": False,
        "grad_norm": c.mim_grad_norm}),
}


def build_attack(name: str, model: torch.nn.Module, cfg: AttackConfig, eps: float, num_classes: int,
                 seed: int = 0) -> torchattacks.Attack:
    """The attack `name` on `model` ([0,1] inputs, normalization inside) at L-inf radius `eps` ([0,1] units; ignored
    by CW). `seed` seeds the attacks that reseed torch themselves (Square, APGD, APGD-T, FAB); seed torch's global
    generator before the call for PGD's random start."""
    if name not in ATTACKS:
        raise ConfigError(f"attack.names: unknown attack {name!r}; valid: {', '.join(ATTACKS)}")
    attack = ATTACKS[name].build(model, cfg, eps, num_classes, seed)
    if attack.normalization_used is not None:  # the model normalizes; torchattacks must not do it again
        raise RuntimeError(f"{name}: torchattacks would normalize the inputs a second time")
    return attack


def settings(cfg: AttackConfig, num_classes: int) -> dict[str, dict]:
    """{attack: {norm, effective parameters}} of every configured attack, for the report."""
    return {n: {"norm": ATTACKS[n].norm, **ATTACKS[n].settings(cfg, num_classes)} for n in cfg.names}
