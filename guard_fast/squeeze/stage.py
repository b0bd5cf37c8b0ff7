"""Squeeze: train the teacher on real data with a GUARD regularizer (or a baseline) on a DeepSpeed engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch

from guard_fast.attacks.accuracy import accuracy
from guard_fast.data import build_loader
from guard_fast.models import ModelConfig, model_from_config, prepare_model
from guard_fast.regularizers.objectives import DOUBLE_BACKWARD, ObjectiveConfig, build_objective
from guard_fast.runtime.bounds import Radius
from guard_fast.runtime.cluster import open_run
from guard_fast.runtime.config import DataConfig, DistConfig, OutputConfig
from guard_fast.runtime.distributed import DistInfo, setup_phase
from guard_fast.runtime.engine import OptimConfig
from guard_fast.runtime.errors import ConfigError, GuardFastError
from guard_fast.runtime.loop import build_trainer
from guard_fast.runtime.runfolder import stage


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
    allow_config_change: list[str] = field(default_factory=list)
    """with --resume: config keys that may differ from the run's record (only runfolder.SAFE_CHANGES, e.g.
    optim.epochs; docs/reliability.md)"""
    stop_after: int = 0
    """stop after this many micro-steps as if killed, keeping checkpoints (0 = train to the end; for tests)"""
    val_every: int = 1
    """epochs between validations (0 = only at the end)"""
    val_batches: int = 0
    """validation batches per rank (0 = the whole val split)"""
    robust_eval_eps: list[Radius] = field(default_factory=list)
    """L-inf radii in [0,1] pixel units for a quick PGD robust accuracy at validation (empty = clean only)"""
    robust_eval_steps: int = 10
    """PGD steps of the quick robust validation (step size eps/4, random start)"""

    def validate(self) -> None:
        if self.model.compile and self.objective.name in DOUBLE_BACKWARD:
            raise ConfigError(f"model.compile with objective.name = {self.objective.name!r}: torch.compile cannot "
                              "run double backward; set model.compile=false")
        if self.stop_after < 0 or self.val_every < 0 or self.val_batches < 0:
            raise ConfigError("stop_after, val_every and val_batches must be >= 0")


@stage("squeeze")
def run_squeeze(cfg: SqueezeConfig, info: DistInfo) -> dict[str, Any]:
    """Train the teacher; returns the final metrics. Writes output.dir/{teacher.pt, result.json, metrics.jsonl}."""
    run = open_run(cfg.output.dir, cfg, info=info)
    seed = cfg.dist.seed
    with setup_phase():  # rank-local work: an error on any rank stops every rank with one line
        train = build_loader(cfg.data, "train", rank=info.rank, world=info.world, device=info.device, seed=seed)
        val = build_loader(cfg.data, "val", rank=info.rank, world=info.world, device=info.device)
        if len(train) < cfg.optim.grad_accum:
            raise GuardFastError(f"{cfg.data.path}: {train.num_samples} training images give {len(train)} batches "
                                 f"of {cfg.data.batch_size} per rank; need at least optim.grad_accum = "
                                 f"{cfg.optim.grad_accum}")
        torch.manual_seed(seed)  # identical initialization on every rank
        model = prepare_model(model_from_config(cfg.model, train.spec).to(info.device), cfg.model)
        objective = build_objective(cfg.objective, train.spec.input_shape)
    trainer = build_trainer(model, cfg.optim, cfg.dist, cfg.output, micro_batch=cfg.data.batch_size,
                            steps_per_epoch=len(train), run=run, info=info, resume=cfg.resume,
                            stop_after=cfg.stop_after, desc="squeeze",
                            rng_seed=seed + 1 + info.rank)  # per-rank stream for random attack starts
    engine = trainer.engine
    dtype = torch.bfloat16 if cfg.dist.precision == "bf16" else torch.float32
    metrics: dict[str, Any] = {}
    for epoch, offset in trainer.epochs():
        train.set_epoch(epoch)
        for x, y in islice(train, offset, None):  # a resumed epoch skips the batches already seen
            loss, stats = objective(engine.module, x.to(dtype), y)
            engine.backward(loss)
            engine.step()
            if trainer.step_done(loss, stats, len(y)):
                return trainer.stopped()
        trainer.end_epoch(epoch)
        if trainer.validation_due(epoch, cfg.val_every):
            metrics = accuracy(engine.module, val, cfg.robust_eval_eps, cfg.robust_eval_steps, cfg.val_batches, dtype)
            trainer.log_validation(epoch, metrics)
    skipped = {"train": train.skipped, "val": val.skipped}  # data.skip_corrupt: images skipped by this process
    if cfg.data.skip_corrupt:
        run.log({"step": trainer.step, "skipped_images": skipped})
        if info.is_main:
            print(f"skipped unreadable images: {skipped['train']} train, {skipped['val']} val (data.skip_corrupt)")
    return trainer.finish("teacher.pt", {"objective": cfg.objective.name, "h": objective.cfg.h, "steps": trainer.step,
                                         "val": metrics, "skipped_images": skipped})
