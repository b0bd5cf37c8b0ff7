"""Squeeze: train the teacher on real data with a GUARD regularizer (or a baseline) on a DeepSpeed engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
from tqdm import tqdm

from guard_fast.config import DataConfig, DistConfig, ModelConfig, OutputConfig
from guard_fast.data import build_loader
from guard_fast.distributed import DistInfo
from guard_fast.engine import Checkpointer, OptimConfig, build_engine, build_optimizer, build_scheduler
from guard_fast.errors import ConfigError, GuardFastError
from guard_fast.io import atomic_json
from guard_fast.models import build_model, save_checkpoint
from guard_fast.objectives import DOUBLE_BACKWARD, ObjectiveConfig, build_objective
from guard_fast.runinfo import RunDir
from guard_fast.validate import accuracy


@dataclass
class SqueezeConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(dir="runs/squeeze"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    resume: bool = False
    """continue from the newest complete checkpoint in output.dir/checkpoints (a fresh start if there is none)"""
    stop_after: int = 0
    """stop after this many micro-steps as if killed, keeping checkpoints (0 = train to the end; for tests)"""
    val_every: int = 1
    """epochs between validations (0 = only at the end)"""
    val_batches: int = 0
    """validation batches per rank (0 = the whole val split)"""
    robust_eval_eps: list[float] = field(default_factory=list)
    """L-inf radii in [0,1] pixel units for a quick PGD robust accuracy at validation (empty = clean only)"""
    robust_eval_steps: int = 10
    """PGD steps of the quick robust validation (step size eps/4, random start)"""

    def validate(self) -> None:
        if self.model.compile and self.objective.name in DOUBLE_BACKWARD:
            raise ConfigError(f"model.compile with objective.name = {self.objective.name!r}: torch.compile cannot "
                              "run double backward; set model.compile=false")
        if self.stop_after < 0 or self.val_every < 0 or self.val_batches < 0:
            raise ConfigError("stop_after, val_every and val_batches must be >= 0")


def prepare_model(model: torch.nn.Module, cfg: ModelConfig) -> torch.nn.Module:
    """channels_last, then compile (compile must see the final memory format); DeepSpeed wraps the result."""
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.compile()  # in place: the module (and its state-dict keys) stay the same object
    return model


def run_squeeze(cfg: SqueezeConfig, info: DistInfo) -> dict[str, Any]:
    """Train the teacher; returns the final metrics. Writes output.dir/{teacher.pt, result.json, metrics.jsonl}."""
    run = RunDir(cfg.output.dir, cfg, is_main=info.is_main, device=info.device)
    seed = cfg.dist.seed
    train = build_loader(cfg.data, "train", rank=info.rank, world=info.world, device=info.device, seed=seed)
    val = build_loader(cfg.data, "val", rank=info.rank, world=info.world, device=info.device)
    spec = train.spec
    if len(train) < cfg.optim.grad_accum:
        raise GuardFastError(f"{cfg.data.path}: {train.num_samples} training images give {len(train)} batches of "
                             f"{cfg.data.batch_size} per rank; need at least optim.grad_accum = {cfg.optim.grad_accum}")
    torch.manual_seed(seed)  # identical initialization on every rank
    model = build_model(cfg.model.arch, spec.num_classes, spec.mean, spec.std, cfg.model.width, cfg.model.checkpoint)
    model = prepare_model(model.to(info.device), cfg.model)
    objective = build_objective(cfg.objective)
    steps_per_epoch = len(train)  # micro-steps
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch // cfg.optim.grad_accum)
    engine = build_engine(model, optimizer, scheduler, cfg.dist, cfg.optim, cfg.data.batch_size, info.device)
    dtype = torch.bfloat16 if cfg.dist.precision == "bf16" else torch.float32
    ckpt = Checkpointer(run.path / "checkpoints", engine)
    torch.manual_seed(seed + 1 + info.rank)  # per-rank stream for random attack starts
    step = 0
    if cfg.resume and (loaded := ckpt.load()) is not None:
        step = loaded[0]
        if info.is_main:
            print(f"resumed from step {step}")
    total = cfg.optim.epochs * steps_per_epoch
    bar = tqdm(total=total, initial=step, desc="squeeze", disable=not (info.is_main and cfg.output.progress))
    first_bad = torch.full((), -1, dtype=torch.long, device=info.device)  # first non-finite step, checked lazily
    metrics: dict[str, Any] = {}
    t_log, n_log = time.time(), 0

    def check_finite() -> None:
        bad = int(first_bad)  # host sync: only at log/checkpoint/epoch boundaries
        if bad >= 0:
            last = ckpt.latest()
            raise GuardFastError(f"non-finite loss at step {bad} (epoch {bad // steps_per_epoch}); stopped. Last good "
                                 f"checkpoint: {last['tag'] if last else 'none'} in {ckpt.folder}")

    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        train.set_epoch(epoch)
        for x, y in islice(train, offset, None):  # a resumed epoch skips the batches already seen
            loss, stats = objective(engine.module, x.to(dtype), y)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
            engine.backward(loss)
            engine.step()
            step += 1
            n_log += len(y)
            bar.update(1)
            if step % cfg.output.log_every == 0:
                check_finite()
                rate = n_log * info.world / (time.time() - t_log)
                rec = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0], "images_per_s": rate,
                       **{k: float(v) for k, v in stats.items()}}  # host sync: log interval
                run.log(rec)
                bar.set_postfix(ce=f"{rec['ce']:.3f}", reg=f"{rec['reg']:.2e}", img_s=f"{rate:.0f}",
                                lr=f"{rec['lr']:.2e}")
                t_log, n_log = time.time(), 0
            boundary = step % cfg.optim.grad_accum == 0
            if boundary and cfg.output.ckpt_every and step % cfg.output.ckpt_every == 0:
                check_finite()
                ckpt.save(step, {"epoch": epoch})
            if cfg.stop_after and step >= cfg.stop_after:
                bar.close()
                return {"stopped_at": step}
        check_finite()
        ckpt.save(step, {"epoch": epoch})
        last_epoch = epoch + 1 == cfg.optim.epochs
        if last_epoch or (cfg.val_every and (epoch + 1) % cfg.val_every == 0):
            metrics = accuracy(engine.module, val, cfg.robust_eval_eps, cfg.robust_eval_steps, cfg.val_batches, dtype)
            run.log({"step": step, "epoch": epoch, **{f"val_{k}": v for k, v in metrics.items()}})
            if info.is_main:
                tqdm.write(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    bar.close()
    result = {"objective": cfg.objective.name, "steps": step, "val": metrics}
    if info.is_main:
        save_checkpoint(engine.module, run.path / "teacher.pt")
        atomic_json(run.path / "result.json", result)
    return result
