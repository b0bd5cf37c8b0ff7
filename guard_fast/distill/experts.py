"""Experts: the buffer of training trajectories that MTT and TESLA match (MTT's buffer.py).

Each expert is a fresh network (seeded by (seed, expert)) trained on the real train split with plain SGD (lr 0.01, no
momentum, no weight decay, batch 256, reshuffled every epoch by a seeded generator; the last partial batch is kept),
its flat parameters saved after every epoch. Experts are independent: expert e runs on rank e % world, so the buffer
does not depend on the number of ranks, and a restarted run skips the experts already saved. ZCA whitening (an MTT
option) is not offered: our sets are [0,1] pixel images attacked in pixel space, and a whitening step would have to
become part of every student.

The loss of every step is a training objective of guard_fast/regularizers/objectives.py (`objective`, the squeeze
teacher's implementation): `none` is plain CE (MTT, TESLA); a GUARD regularizer or an adversarial-training baseline
gives GUARD(MTT) / GUARD(TESLA) experts, matched exactly as plain ones. The batch is augmented where MTT augments it
(DSA on the normalized images, `dsa_space`) and the objective receives its pixels x = denormalize(u): the GUARD terms
perturb u = normalize(x) in normalized units (`objective.h`), the attacks perturb x in [0,1] pixel units and project
onto [0,1], which clips an augmented pixel DSA pushed outside that range. Each expert is trained by one process alone,
so a batch-mean convention counts its own batch only (ranks = 1). buffer.json records the objective and its settings;
guard_fast/distill/buffer.py refuses a buffer made with another objective than a run asks for.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from guard_fast.data.dsa import SPACES
from guard_fast.data.presets import resolve_dataset
from guard_fast.data.real import load_real
from guard_fast.distill.buffer import BUFFER, expert_path
from guard_fast.distill.matching import AUGMENTS, FlatNet, build_augment
from guard_fast.models import Classifier, ModelConfig, model_from_config
from guard_fast.regularizers.objectives import Objective, ObjectiveConfig, Stats, build_objective
from guard_fast.runtime import distributed as D
from guard_fast.runtime.bounds import Positive
from guard_fast.runtime.cluster import open_run
from guard_fast.runtime.config import DataConfig, DistConfig, OutputConfig
from guard_fast.runtime.distributed import DistInfo
from guard_fast.runtime.errors import ConfigError, GuardFastError
from guard_fast.runtime.io import atomic_json, atomic_torch_save, saved_with_key
from guard_fast.runtime.runfolder import stage


def _convnet() -> ModelConfig:
    return ModelConfig(arch="convnet", width=128)


def _plain_ce() -> ObjectiveConfig:
    return ObjectiveConfig(name="none")


@dataclass
class ExpertsConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=_convnet)
    """the expert network (MTT/TESLA: ConvNet, width 128, depth 3 at 32 px)"""
    dist: DistConfig = field(default_factory=DistConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(dir="runs/experts"))
    num_experts: int = 5
    """experts to train (MTT: 100)"""
    epochs: int = 50
    """epochs per expert; parameters are saved after each (MTT: 50)"""
    lr: Positive = 0.01
    """SGD learning rate (no momentum, no weight decay, as MTT)"""
    batch_size: int = 256
    """images per SGD step (MTT: 256)"""
    augment: str = "dsa"
    """augmentation of the real batches: none or dsa (MTT's experts use DSA, one draw per image)"""
    dsa_space: str = "normalized"
    """where DSA acts: normalized (MTT's buffer.py: on normalized tensors) or pixel ([0,1] pixels, black fill)"""
    objective: ObjectiveConfig = field(default_factory=_plain_ce)
    """the experts' training loss, the squeeze objectives' implementation (objective.name: none = plain CE, MTT and
    TESLA's experts; guard, guard-curvature, grad-norm, pgd-at, fgsm-rs or trades for GUARD(MTT)/GUARD(TESLA)
    experts; objective.beta, h, lam, eps ... as in squeeze)"""
    stop_after: int = 0
    """stop after this many experts on each rank as if killed (0 = run to the end; for tests)"""

    def validate(self) -> None:
        if min(self.num_experts, self.epochs, self.batch_size) < 1:
            raise ConfigError("num_experts, epochs and batch_size must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"lr = {self.lr}: must be > 0")
        if self.augment not in AUGMENTS:
            raise ConfigError(f"augment = {self.augment!r}: valid values are {', '.join(AUGMENTS)}")
        if self.dsa_space not in SPACES:
            raise ConfigError(f"dsa_space = {self.dsa_space!r}: valid values are {', '.join(SPACES)}")
        self.objective.validate()


def buffer_key(cfg: ExpertsConfig, spec: dict[str, Any]) -> str:
    """Hash of everything that determines the trajectories (not the output folder, progress, world size or count:
    adding experts keeps the old ones)."""
    c = asdict(cfg)
    for k in ("output", "stop_after", "num_experts"):
        c.pop(k)
    c["dist"], c["spec"] = {"seed": cfg.dist.seed}, spec
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]


def expert_seed(seed: int, e: int) -> int:
    return seed * 1_000_003 + e


def expert_objective(cfg: ExpertsConfig) -> Objective:
    """cfg.objective for an expert: trained by one process alone, its batch-mean conventions count its own batch."""
    return build_objective(cfg.objective, ranks=1)


def expert_step(model: Classifier, objective: Objective, opt: torch.optim.Optimizer, u: torch.Tensor,
                y: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """One SGD step of the expert on the augmented normalized batch u (B, 3, S, S): the objective's loss of its pixels
    x = denormalize(u), one backward, one step. Returns (loss, stats), detached (no host sync)."""
    loss, stats = objective(model, model.denormalize(u), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), stats


def train_expert(model: Classifier, pixels: torch.Tensor, labels: torch.Tensor, cfg: ExpertsConfig, seed: int,
                 device: torch.device, bar: tqdm | None = None) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """SGD on normalized real images under cfg.objective; returns the (epochs + 1, P) flat trajectory and the
    per-epoch means of the objective's train CE and regularizer ({"ce": [...], "reg": [...]})."""
    flat = FlatNet(model.body)
    objective = expert_objective(cfg)
    augment = build_augment(cfg.augment, model.mean, model.std, space=cfg.dsa_space)
    opt = torch.optim.SGD(model.body.parameters(), lr=cfg.lr, momentum=0.0, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    trajectory, curves = [flat.flat().cpu()], {"ce": [], "reg": []}
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(labels), generator=gen)
        sums = torch.zeros(3, device=device)  # sum of B * (loss, ce, reg) over the epoch
        for b, idx in enumerate(torch.split(order, cfg.batch_size)):
            u = model.normalize(pixels[idx].to(device).float() / 255)  # (B, 3, S, S) normalized
            u = augment(u, expert_seed(seed, epoch * 100_003 + b))
            loss, stats = expert_step(model, objective, opt, u, labels[idx].to(device))
            sums += len(idx) * torch.stack([loss, stats["ce"], stats["reg"]])
        loss_mean, ce, reg = (sums / len(labels)).tolist()  # host sync: once per epoch
        if not math.isfinite(loss_mean):
            raise GuardFastError(f"experts: expert seed {seed}: non-finite loss in epoch {epoch + 1} (objective "
                                 f"{cfg.objective.name}); lower lr or the objective's coefficient; the experts "
                                 "already written are kept")
        curves["ce"].append(ce)
        curves["reg"].append(reg)
        trajectory.append(flat.flat().cpu())
        if bar is not None:
            bar.update(1)
    return torch.stack(trajectory), curves


@torch.no_grad()
def accuracy_on(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    correct = 0
    for idx in torch.split(torch.arange(len(labels)), 512):
        correct += int((model(pixels[idx].to(device).float() / 255).argmax(1) == labels[idx].to(device)).sum())
    return correct / max(1, len(labels))


@stage("experts")
def run_experts(cfg: ExpertsConfig, info: DistInfo) -> dict[str, Any]:
    """Train cfg.num_experts experts into output.dir (experts/expert_<e>.pt, buffer.json, result.json)."""
    run = open_run(cfg.output.dir, cfg, info=info)  # every rank agrees on the folder
    spec = resolve_dataset(cfg.data)
    key = buffer_key(cfg, asdict(spec))
    real = load_real(cfg.data, "train", progress=info.is_main and cfg.output.progress)
    val = load_real(cfg.data, "val")
    run.start()  # inputs checked: write the run's record
    mine = list(range(info.rank, cfg.num_experts, info.world))
    todo = [e for e in mine if not saved_with_key(expert_path(run.path, e), key)]
    bar = tqdm(total=len(mine) * cfg.epochs, initial=(len(mine) - len(todo)) * cfg.epochs, desc="experts",
               disable=not (info.is_main and cfg.output.progress))
    for n, e in enumerate(todo):
        if cfg.stop_after and n >= cfg.stop_after:
            bar.close()
            return {"stopped_after_experts": n}
        seed = expert_seed(cfg.dist.seed, e)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the expert's initialization
            model = model_from_config(cfg.model, spec, checkpoint="").to(info.device)
        trajectory, curves = train_expert(model, real.pixels, real.labels, cfg, seed, info.device, bar)
        val_acc = accuracy_on(model, val.pixels, val.labels, info.device)
        atomic_torch_save(expert_path(run.path, e), {"key": key, "expert": e, "seed": seed, "trajectory": trajectory,
                                                     "train_ce": curves["ce"], "train_reg": curves["reg"],
                                                     "val_acc": val_acc})
        run.log({"expert": e, "rank": info.rank, "train_ce": curves["ce"][-1], "train_reg": curves["reg"][-1],
                 "val_acc": val_acc})
    bar.close()
    D.barrier()  # every rank's experts are on disk
    result: dict[str, Any] = {}
    if info.is_main:
        blobs = [torch.load(expert_path(run.path, e), map_location="cpu", weights_only=True, mmap=True)
                 for e in range(cfg.num_experts)]
        num_params = int(blobs[0]["trajectory"].shape[1])
        manifest = {"key": key, "dataset": cfg.data.dataset, "num_classes": spec.num_classes,
                    "image_size": spec.image_size, "arch": cfg.model.arch, "width": cfg.model.width,
                    "num_params": num_params, "epochs": cfg.epochs, "num_experts": cfg.num_experts, "lr": cfg.lr,
                    "batch_size": cfg.batch_size, "augment": cfg.augment, "dsa_space": cfg.dsa_space,
                    "seed": cfg.dist.seed, "objective": asdict(cfg.objective)}
        result = {"num_experts": cfg.num_experts, "epochs": cfg.epochs, "num_params": num_params,
                  "objective": cfg.objective.name, "val_acc": [b["val_acc"] for b in blobs],
                  "final_train_ce": [b["train_ce"][-1] for b in blobs],
                  "final_train_reg": [b["train_reg"][-1] for b in blobs]}
        atomic_json(run.path / "result.json", result)
        atomic_json(run.path / BUFFER, manifest)  # last: its presence means the buffer is complete
    return D.broadcast_object(result)
