"""Trajectory matching (MTT, TESLA) on flat parameter vectors: the functional network, the unrolled student, the
matching loss and its gradients with respect to the synthetic images and the learnable inner learning rate.

Notation (one distillation iteration): theta_0 = theta*_t (an expert's parameters after epoch t), target theta* =
theta*_{t+M}; the student takes N = syn_steps SGD steps on synthetic minibatches X_i (indices and an augmentation
seed per step), theta_{i+1} = theta_i - alpha g_i with g_i = d CE(f(theta_i, X_i), y_i) / d theta_i, and

    L = ||theta_N - theta*||^2 / ||theta_0 - theta*||^2 = ||theta_0 - alpha sum_i g_i - theta*||^2 / D.

`mtt_grads` differentiates the unrolled graph (memory linear in N: every step's activations and its gradient graph
are kept). `tesla_grads` is TESLA's computation (Cui et al. 2023, justincui03/tesla distill.py): dL/dg_i =
(2/D)(alpha (theta* - theta_0) + alpha^2 G), G = sum_j g_j, is the same vector for every step, so after one pass that
accumulates G the images' gradient is sum_i (dL/dg_i)^T dg_i/dX_i, each term recomputed one step at a time
(memory constant in N).

TESLA's coefficient: its code (distill.py:416-420) applies (1/D)(alpha (theta* - theta_0) + alpha^2 G) per step,
half of dL/dg_i: it writes `2 * torch.autograd.grad(...)`, and autograd.grad returns a tuple, so `2 *` repeats the
tuple and element [0] carries coefficient 1. The published lr_img values were tuned with that step, so it is the
default here (`exact = False`); `exact = True` applies the true derivative (twice the step). The lr gradient
(distill.py:425-428) is a true derivative in both. The remarks below are about the exact derivative; the default
image gradient is half of it.

TESLA treats g_i as depending on X_i only: the terms through theta_i's dependence on the
earlier batches X_j (j < i) and on alpha are dropped, so it equals MTT's gradient for N = 1 and approximates it for
N > 1. Measured in float64 (depth-2 width-4 ConvNet, 8 px, 6 images, batches of 3; tests/distill/test_mtt.py), relative
L2 difference of the image gradient TESLA vs MTT: alpha 0.01: 7.9e-3 / 2.2e-2 / 4.8e-2 / 0.11 for N = 2 / 5 / 10 /
20 (cosine >= 0.993); alpha 0.1: 8.7e-2 / 0.25 / 0.55 / 0.65 (cosine 0.996 / 0.970 / 0.851 / 0.761). The gap grows
with alpha and N, as the dropped terms are alpha * Hessian products. N = 1: equal to 4e-16.

Unlike the reference code, which keeps every theta_i and every augmented batch (memory growing by one parameter
vector and one batch per step), both passes here recompute theta_i from theta_0 and the augmented batch from its
seed, so nothing grows with N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from guard_fast.data.dsa import STRATEGY, apply_dsa_in, sample_dsa

# (images (B, 3, S, S) normalized, seed) -> augmented images: differentiable in the images, deterministic in the seed
Augment = Callable[[torch.Tensor, int], torch.Tensor]


def no_augment(x: torch.Tensor, seed: int) -> torch.Tensor:
    return x


class FlatNet:
    """A module evaluated at a flat parameter vector: `flat(model)` packs its parameters (registration order),
    `net(theta, x)` runs the module with parameters viewed from theta (differentiable in theta and x)."""

    def __init__(self, module: nn.Module):
        self.module = module
        named = list(module.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.num_params = sum(self.numels)

    def flat(self, module: nn.Module | None = None) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in (module or self.module).parameters()])

    def params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, torch.split(theta, self.numels), self.shapes, strict=True)}

    def __call__(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, self.params(theta), (x,))


@dataclass(frozen=True)
class Step:
    """One inner step's minibatch: synthetic-image indices and its augmentation seed."""

    indices: torch.Tensor
    seed: int


def plan_steps(n_images: int, batch: int, syn_steps: int, gen: torch.Generator, seed_base: int) -> list[Step]:
    """MTT's minibatching: a fresh random permutation cut into batches of `batch` whenever the previous one is used
    up; step i's augmentation seed is seed_base + i."""
    steps: list[Step] = []
    chunks: list[torch.Tensor] = []
    for i in range(syn_steps):
        if not chunks:
            chunks = list(torch.split(torch.randperm(n_images, generator=gen), batch))
        steps.append(Step(chunks.pop(0), seed_base + i))
    return steps


def inner_loss(net: FlatNet, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student at theta; y is (B,) class ids or (B, C) probabilities (TESLA's soft labels)."""
    return F.cross_entropy(net(theta, x), y)


def sgd_step(net: FlatNet, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lr: torch.Tensor,
             create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """theta - lr * dCE/dtheta and the gradient; create_graph keeps it differentiable in theta, x and lr."""
    if not theta.requires_grad:
        theta = theta.requires_grad_(True)
    g = torch.autograd.grad(inner_loss(net, theta, x, y), theta, create_graph=create_graph)[0]
    return theta - lr * g, g


def matching_loss(theta_n: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||theta_N - theta*||^2 / ||theta_0 - theta*||^2 (sums of squares over every parameter)."""
    return (theta_n - target).pow(2).sum() / (start - target).pow(2).sum()


def mtt_grads(net: FlatNet, images: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor, start: torch.Tensor,
              target: torch.Tensor, steps: list[Step], augment: Augment = no_augment
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MTT: the whole unrolled loop as one autograd graph. Returns (loss, dL/dimages, dL/dlr)."""
    images = images.detach().requires_grad_(True)
    lr = lr.detach().requires_grad_(True)
    theta = start.detach().clone().requires_grad_(True)
    for s in steps:
        x = augment(images[s.indices], s.seed)  # (b, 3, S, S)
        theta, _ = sgd_step(net, theta, x, labels[s.indices], lr, create_graph=True)
    loss = matching_loss(theta, start, target)
    g_img, g_lr = torch.autograd.grad(loss, (images, lr))
    return loss.detach(), g_img, g_lr


def tesla_grads(net: FlatNet, images: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor, start: torch.Tensor,
                target: torch.Tensor, steps: list[Step], augment: Augment = no_augment, exact: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TESLA: two passes of N steps, one step's graph alive at a time. Returns (loss, image gradient, dL/dlr); the
    image gradient is TESLA's code's (half of dL/dimages) unless `exact`."""
    images, lr, start = images.detach(), lr.detach(), start.detach()
    alpha = float(lr)
    denom = (start - target).pow(2).sum()
    # pass 1: G = sum_i g_i along the student trajectory (no graph kept)
    theta, gsum = start.clone(), torch.zeros_like(start)
    for s in steps:
        x = augment(images[s.indices], s.seed)
        theta, g = sgd_step(net, theta.detach(), x, labels[s.indices], lr, create_graph=False)
        gsum += g
    # dL/dg_i, the same for every i (g_i treated as a function of X_i alone); TESLA's code applies half of it
    coef = ((2.0 if exact else 1.0) / denom) * (alpha * (target - start) + alpha ** 2 * gsum)  # (P,)
    # pass 2: recompute theta_i (identical to pass 1) and each step's dependence on its own batch
    g_img = torch.zeros_like(images)
    theta = start.clone()
    for s in steps:
        batch = images[s.indices].requires_grad_(True)  # (b, 3, S, S) leaf
        x = augment(batch, s.seed)
        theta_req = theta.detach().requires_grad_(True)
        g = torch.autograd.grad(inner_loss(net, theta_req, x, labels[s.indices]), theta_req, create_graph=True)[0]
        (dx,) = torch.autograd.grad(g @ coef, batch)
        g_img.index_add_(0, s.indices, dx)
        theta = theta - alpha * g.detach()
    # the loss and its lr gradient with G held fixed (TESLA's grand_loss)
    lr_req = lr.clone().requires_grad_(True)
    loss = matching_loss(start - lr_req * gsum, start, target)
    (g_lr,) = torch.autograd.grad(loss, lr_req)
    return loss.detach(), g_img, g_lr


GRADS = {"mtt": mtt_grads, "tesla": tesla_grads}

AUGMENTS = ("none", "dsa")
"""augmentation of every real batch (experts) and every synthetic minibatch (distillation)"""


def build_augment(name: str, mean: torch.Tensor, std: torch.Tensor, strategy: str = STRATEGY,
                  space: str = "normalized") -> Augment:
    """none, or DSA with one draw per image (MTT's DiffAugment with seed -1) from a generator seeded by the step's
    seed, on normalized inputs u, acting in `space`: normalized (MTT/TESLA's code: dsa(u)) or pixel
    (norm(dsa(denorm(u))), our earlier behaviour)."""
    if name == "none":
        return no_augment

    def augment(u: torch.Tensor, seed: int) -> torch.Tensor:  # u: (B, 3, S, S) normalized
        gen = torch.Generator().manual_seed(seed)
        return apply_dsa_in(u, sample_dsa(gen, strategy, u.shape[2], u.shape[3], u.shape[0]), space, "normalized",
                            mean, std)

    return augment
