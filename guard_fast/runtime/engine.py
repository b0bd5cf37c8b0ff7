"""Training engine: optimizer, cosine schedule, DeepSpeed engine (checkpoints: runtime/checkpoint.py).

API (used by squeeze and the student trainer):
- `OptimConfig`: the `optim` config section.
- `build_optimizer(model, cfg)`: SGD (momentum) or AdamW; weight decay on weights of rank >= 2 (or on all).
- `build_scheduler(optimizer, cfg, steps_per_epoch)`: per-optimizer-step cosine with optional linear warmup, or DC's
  step schedule.
- `build_engine(model, optimizer, scheduler, dist_cfg, optim_cfg, micro_batch)`: a DeepSpeed engine (ZeRO 0/1/2,
  fp32 or bf16, gradient accumulation and clipping); joins or creates the process group first.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from guard_fast.runtime.bounds import NonNegative, Positive
from guard_fast.runtime.config import DistConfig
from guard_fast.runtime.errors import ConfigError

SCHEDULES = ("cosine", "step")


@dataclass
class OptimConfig:
    name: str = "sgd"
    """optimizer: sgd (momentum) or adamw"""
    lr: Positive = 0.025
    """peak learning rate (absolute, not scaled with batch size or ranks)"""
    momentum: NonNegative = 0.9
    """SGD momentum"""
    weight_decay: NonNegative = 1e-4
    """decoupled (adamw) or L2 (sgd) weight decay, on the parameters weight_decay_on names"""
    epochs: int = 50
    """passes over the training set"""
    warmup_epochs: NonNegative = 0.0
    """linear warmup from 0 to lr over this many epochs, then cosine decay to 0"""
    grad_accum: int = 1
    """micro-batches per optimizer step (the effective batch is batch_size * ranks * grad_accum)"""
    grad_clip: NonNegative = 0.0
    """clip the global gradient L2 norm to this value (0 = off)"""
    schedule: str = "cosine"
    """cosine (warmup, then cosine to 0) or step (DC's evaluate_synset: lr x 0.1 after epoch epochs//2 + 1)"""
    weight_decay_on: str = "weights"
    """weights (rank >= 2 tensors only) or all (every parameter, as torch's SGD(net.parameters()) in DC's code)"""

    def validate(self) -> None:
        if self.name not in ("sgd", "adamw"):
            raise ConfigError(f"optim.name = {self.name!r}: valid values are 'sgd', 'adamw'")
        if self.lr <= 0 or self.epochs < 1 or self.grad_accum < 1 or self.grad_clip < 0 or self.warmup_epochs < 0:
            raise ConfigError("optim: lr > 0, epochs >= 1, grad_accum >= 1, grad_clip >= 0, warmup_epochs >= 0")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule = {self.schedule!r}: valid values are {', '.join(SCHEDULES)}")
        if self.weight_decay_on not in ("weights", "all"):
            raise ConfigError(f"optim.weight_decay_on = {self.weight_decay_on!r}: valid values are 'weights', 'all'")
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(f"optim.warmup_epochs = {self.warmup_epochs} must be < optim.epochs = {self.epochs}")


def param_groups(model: torch.nn.Module, weight_decay: float, on: str = "weights") -> list[dict[str, Any]]:
    min_ndim = 2 if on == "weights" else 0
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= min_ndim]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < min_ndim]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # DeepSpeed drops empty groups; the scheduler must see the same list


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.weight_decay_on)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def step_factor(step: int, epochs: int, steps_per_epoch: int) -> float:
    """DC's evaluate_synset: lr for epochs 0..epochs//2 + 1, then 0.1 lr (the reference decays after epoch
    Epoch//2 + 1 of its Epoch + 1 epochs and rebuilds the optimizer, resetting momentum; we keep momentum)."""
    return 1.0 if step // max(1, steps_per_epoch) <= epochs // 2 + 1 else 0.1


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`steps_per_epoch` counts optimizer steps (micro-batches / grad_accum)."""
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: step_factor(s, cfg.epochs, steps_per_epoch))
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_group(dist_cfg: DistConfig, device: torch.device) -> None:
    """DeepSpeed needs a process group even for one process: create a 1-rank group on localhost if none exists."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    backend = dist_cfg.backend if dist_cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend=backend, rank=0, world_size=1)


def bound_deepspeed_groups(dist_cfg: DistConfig) -> None:
    """DeepSpeed runs its gradient all-reduces on a clone of the world group that it creates itself, with torch's
    default timeout of 30 min (deepspeed/utils/groups.py, _clone_world_group: dist.new_group(ranks) without a
    timeout); a lost node then hangs the job for 30 min whatever init_process_group was given. Create that clone
    first, with dist.timeout_s (collective: every rank calls it before deepspeed.initialize)."""
    from deepspeed.utils import groups

    if dist.is_initialized() and dist.get_world_size() > 1 and groups._WORLD_GROUP is None:
        groups._WORLD_GROUP = dist.new_group(ranks=list(range(dist.get_world_size())),
                                             timeout=timedelta(seconds=dist_cfg.timeout_s))


def deepspeed_config(dist_cfg: DistConfig, optim_cfg: OptimConfig, micro_batch: int) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": optim_cfg.grad_accum,
        "zero_optimization": {"stage": dist_cfg.zero_stage},
        "zero_allow_untested_optimizer": True,  # our client torch optimizer under ZeRO
        "steps_per_print": 2**31 - 1,  # we log ourselves
    }
    if optim_cfg.grad_clip > 0:
        cfg["gradient_clipping"] = optim_cfg.grad_clip
    if dist_cfg.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"buffer_dtype": "bf16"}  # BatchNorm running statistics follow the weights
    return cfg


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, dist_cfg: DistConfig,
                 optim_cfg: OptimConfig, micro_batch: int, device: torch.device):
    """A DeepSpeed engine over `model`; `engine.step()` also steps the scheduler at accumulation boundaries."""
    import deepspeed

    ensure_process_group(dist_cfg, device)
    bound_deepspeed_groups(dist_cfg)
    model.to(device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(dist_cfg, optim_cfg, micro_batch),
                                           dist_init_required=False)
    return engine
