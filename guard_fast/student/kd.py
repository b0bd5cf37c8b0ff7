"""Train a fresh student on the distilled set with the teacher's soft labels (FKD), on a DeepSpeed engine.

Loss: KL(log_softmax(s/T) || softmax(t/T)), batch mean, T = temperature. Soft labels come either from relabel's
stored epochs (`soft_labels = "stored"`: the stored view plan is replayed, so the student sees exactly the views the
teacher labelled) or from the teacher during training (`"online"`: the same plans recomputed, no storage). Each global
batch of views.batch_size is split into contiguous per-rank slices, so the views are the same for any world size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from guard_fast.attacks.accuracy import accuracy
from guard_fast.data import build_loader
from guard_fast.data.presets import resolve_dataset
from guard_fast.data.soft_labels import StoredLabels
from guard_fast.data.synthetic import load_synthetic
from guard_fast.data.views import EpochPlan, ViewConfig, num_batches, plan_epoch, rank_positions, render
from guard_fast.models import ModelConfig, model_from_config, prepare_model
from guard_fast.runtime.bounds import Positive
from guard_fast.runtime.cluster import open_run
from guard_fast.runtime.config import DataConfig, DistConfig, OutputConfig
from guard_fast.runtime.distributed import DistInfo, setup_phase
from guard_fast.runtime.engine import OptimConfig
from guard_fast.runtime.errors import ConfigError, GuardFastError
from guard_fast.runtime.loop import build_trainer
from guard_fast.runtime.runfolder import stage

SOFT_LABELS = ("stored", "online")


def _student_optim() -> OptimConfig:
    return OptimConfig(name="adamw", lr=1e-3, weight_decay=0.01, epochs=300)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    """the real dataset: preset (classes, size, normalization) and the val split used for validation"""
    model: ModelConfig = field(default_factory=ModelConfig)
    """the student (fresh unless model.checkpoint is set)"""
    dist: DistConfig = field(default_factory=DistConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(dir="runs/train"))
    optim: OptimConfig = field(default_factory=_student_optim)
    views: ViewConfig = field(default_factory=ViewConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    """the teacher, used only when soft_labels = 'online'"""
    images: str = "runs/recover"
    """recover's output folder (manifest.json + images/)"""
    soft_labels: str = "stored"
    """stored (replay relabel's files from `labels`) or online (the teacher labels each batch; no storage)"""
    labels: str = "runs/relabel"
    """relabel's output folder (labels.json + labels/), for soft_labels = 'stored'"""
    render_workers: int = 0
    """processes rendering the augmented views (0 = in the training process; workers restart every epoch)"""
    temperature: Positive = 20.0
    """softmax temperature T of the distillation loss"""
    resume: bool = False
    """continue from the newest complete checkpoint in output.dir/checkpoints (a fresh start if there is none)"""
    allow_config_change: list[str] = field(default_factory=list)
    """with --resume: config keys that may differ from the run's record (only runfolder.SAFE_CHANGES, e.g.
    optim.epochs; docs/reliability.md)"""
    stop_after: int = 0
    """stop after this many steps as if killed, keeping checkpoints (0 = train to the end; for tests)"""
    val_every: int = 0
    """epochs between validations on the real val split (0 = only at the end)"""
    val_batches: int = 0
    """validation batches per rank (0 = the whole val split)"""

    def validate(self) -> None:
        if self.soft_labels not in SOFT_LABELS:
            raise ConfigError(f"soft_labels = {self.soft_labels!r}: valid values are {', '.join(SOFT_LABELS)}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature = {self.temperature}: must be > 0")
        if min(self.stop_after, self.val_every, self.val_batches, self.render_workers) < 0:
            raise ConfigError("stop_after, val_every, val_batches and render_workers must be >= 0")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) = sum_c p_t (log p_t - log p_s), averaged over the batch."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bf16 logits: the loss in fp32
    log_p = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    target = F.softmax(teacher_logits.to(dtype) / temperature, dim=1)
    return F.kl_div(log_p, target, reduction="batchmean")


class RankBatches(Dataset):
    """Batch b of an epoch plan -> (this rank's rendered views (B/world, 3, S, S), their positions)."""

    def __init__(self, pixels: torch.Tensor, plan: EpochPlan, rank: int, world: int, size: int):
        self.pixels, self.plan, self.rank, self.world, self.size = pixels, plan, rank, world, size

    def __len__(self) -> int:
        return self.plan.num_batches

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = rank_positions(self.plan, b, self.rank, self.world)
        return render(self.pixels, self.plan, positions, self.size), torch.tensor(positions)


@stage("train")
def run_train(cfg: TrainConfig, info: DistInfo) -> dict[str, Any]:
    """Train the student; writes output.dir/{student.pt, result.json, metrics.jsonl, checkpoints/}."""
    if cfg.soft_labels == "online" and not cfg.teacher.checkpoint:  # not in validate(): the pipeline fills it in
        raise ConfigError("teacher.checkpoint: soft_labels = 'online' needs the teacher's checkpoint")
    run = open_run(cfg.output.dir, cfg, info=info)
    with setup_phase():  # rank-local work: an error on any rank stops every rank with one line
        spec = resolve_dataset(cfg.data)
        images = load_synthetic(cfg.images, spec.num_classes)
        size, n = spec.image_size, len(images.labels)
        if cfg.views.batch_size % info.world:
            raise ConfigError(f"views.batch_size = {cfg.views.batch_size} must be divisible by the {info.world} ranks")
        steps_per_epoch = num_batches(n, cfg.views.batch_size)
        if steps_per_epoch == 0:
            raise GuardFastError(f"views.batch_size = {cfg.views.batch_size} exceeds the {n} images in {cfg.images}")
        stored = StoredLabels(cfg.labels, images, cfg.views, cfg.optim.epochs) if cfg.soft_labels == "stored" else None
        teacher = None
        if stored is None:
            teacher = model_from_config(cfg.teacher, spec).to(info.device).eval().requires_grad_(False)
        val = build_loader(cfg.data, "val", rank=info.rank, world=info.world, device=info.device)
        torch.manual_seed(cfg.dist.seed)  # identical student initialization on every rank
        model = prepare_model(model_from_config(cfg.model, spec).to(info.device), cfg.model)
    trainer = build_trainer(model, cfg.optim, cfg.dist, cfg.output, micro_batch=cfg.views.batch_size // info.world,
                            steps_per_epoch=steps_per_epoch, run=run, info=info, resume=cfg.resume,
                            stop_after=cfg.stop_after, desc="train")
    engine = trainer.engine
    dtype = torch.bfloat16 if cfg.dist.precision == "bf16" else torch.float32
    metrics: dict[str, Any] = {}
    for epoch, offset in trainer.epochs():
        plan, logits = stored.epoch(epoch) if stored else (plan_epoch(n, size, cfg.views, epoch), None)
        batches = DataLoader(RankBatches(images.pixels, plan, info.rank, info.world, size), batch_size=None,
                             sampler=range(offset, steps_per_epoch), num_workers=cfg.render_workers)
        for x, positions in batches:
            x = x.to(info.device, dtype)  # (B/world, 3, S, S)
            if logits is not None:
                target = logits[positions].to(info.device)  # (B/world, C) stored fp16 logits
            else:
                with torch.no_grad():
                    target = teacher(x)
            loss = kd_loss(engine(x), target, cfg.temperature)
            engine.backward(loss)
            engine.step()
            if trainer.step_done(loss, {}, len(x)):
                return trainer.stopped()
        trainer.end_epoch(epoch)
        if trainer.validation_due(epoch, cfg.val_every):
            metrics = accuracy(engine.module, val, max_batches=cfg.val_batches, dtype=dtype)
            trainer.log_validation(epoch, metrics)
    return trainer.finish("student.pt", {"steps": trainer.step, "soft_labels": cfg.soft_labels, "images": n,
                                         "val": metrics})
