"""Train a fresh network on a distilled set with its hard labels: DC / DSA / MTT's evaluation protocol.

DC's `evaluate_synset` (VICO-UoE/DatasetCondensation utils.py): a fresh ConvNet, SGD momentum 0.9, weight decay
5e-4 on every parameter, lr 0.01 multiplied by 0.1 (not halved) after epoch Epoch//2 + 1, batch 256 shuffled with the
last partial batch kept, CE loss, 300 epochs (1000 with augmentation; set optim.epochs). With `augment = "dsa"` every
batch gets DSA with one draw per image (the reference's seed = -1 path; guard_fast/data/dsa.py), acting on the
normalized images as the authors' code does (dsa_space; "pixel" is our earlier [0,1]-pixel behaviour). With
`augment = "dc"` every batch gets DC's own evaluation augmentation (get_daparam / augment, utils.py:428-445, 365-424:
one of dc_strategy's operations per image, on normalized images; guard_fast/data/dc_augment.py), which DC's code
uses for MNIST students only ('crop_scale_rotate', then 1000 epochs, main.py:117-121). The images
are the set's float tensors when it has them (as the reference, which trains on the tensors it optimized);
quantize = true trains on the 8-bit PNG values instead.

Differences from the reference: we run `epochs` epochs (the reference loops Epoch + 1 times); at the decay we keep
SGD's momentum (the reference rebuilds the optimizer, resetting it).

Distribution: each global batch (a seeded shuffle per epoch, the same for any world size) is split into contiguous
per-rank slices; every rank's loss is its slice's CE sum times world / (global batch size), so DeepSpeed's gradient
average is the global batch mean for any split. DSA draws are made for the global batch, then sliced.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from guard_fast.attacks.accuracy import accuracy
from guard_fast.data import build_loader
from guard_fast.data.dc_augment import MNIST_STRATEGY, check_dc_strategy, dc_augment_pixels
from guard_fast.data.dsa import SPACES, STRATEGY, apply_dsa_in, check_strategy, sample_dsa
from guard_fast.data.presets import resolve_dataset
from guard_fast.data.synthetic import SyntheticSet, load_synthetic
from guard_fast.models import ModelConfig, model_from_config, prepare_model
from guard_fast.runtime.cluster import open_run
from guard_fast.runtime.config import DataConfig, DistConfig, OutputConfig
from guard_fast.runtime.distributed import DistInfo, setup_phase
from guard_fast.runtime.engine import OptimConfig
from guard_fast.runtime.errors import ConfigError, GuardFastError
from guard_fast.runtime.loop import build_trainer
from guard_fast.runtime.runfolder import stage

AUGMENTS = ("none", "dsa", "dc")


def _hard_optim() -> OptimConfig:
    return OptimConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, epochs=300, schedule="step",
                       weight_decay_on="all")


@dataclass
class HardTrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    """the real dataset: preset (classes, size, normalization) and the val split used for validation"""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="convnet", width=128))
    """the network trained on the distilled set (DC: ConvNet width 128, fresh)"""
    dist: DistConfig = field(default_factory=DistConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(dir="runs/train-hard"))
    optim: OptimConfig = field(default_factory=_hard_optim)
    """DC: SGD momentum 0.9, weight decay 5e-4 on all parameters, lr 0.01 x 0.1 after epoch epochs//2 + 1, 300
    epochs (1000 with augment = dsa)"""
    images: str = "runs/dc"
    """the synthetic-set folder (manifest.json + images/) of any distillation stage"""
    batch_size: int = 256
    """images per optimizer step over all ranks (DC's batch_train); the last partial batch of an epoch is kept"""
    chunk: int = 0
    """images per forward/backward pass inside a rank's slice of the batch (0: the whole slice in one pass). The
    step's gradient is the same sum to float rounding; on CPU, passes of 16 keep a ConvNet's first-block activations
    in cache (about 1.5x faster per 256-image step, docs/reproduction.md)"""
    augment: str = "none"
    """none, dsa (differentiable siamese augmentation, one draw per image) or dc (DC's evaluation augmentation:
    one of dc_strategy's operations per image, normalized space; DC uses it for MNIST)"""
    dc_strategy: str = MNIST_STRATEGY
    """DC augmentation operations joined by '_' from crop, scale, rotate, noise (augment = dc)"""
    dsa_strategy: str = STRATEGY
    """DSA groups joined by '_' (augment = dsa)"""
    dsa_space: str = "normalized"
    """where DSA acts (augment = dsa): normalized (the authors' code: brightness in std units, mean-colour fill) or
    pixel ([0,1] pixels, black fill)"""
    quantize: bool = False
    """train on the 8-bit PNG values of a float set (default: its float tensors, as the authors' code); sets without
    floats (recover's) are always their PNGs"""
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
    lr_from_set: bool = False
    """use the learning rate the set's distillation learned (manifest syn_lr: MTT/TESLA) instead of optim.lr"""
    labels: str = "hard"
    """hard (the set's class ids) or soft (the probabilities of the set's soft-label file: TESLA, cross-entropy
    against them)"""

    def validate(self) -> None:
        if self.augment not in AUGMENTS:
            raise ConfigError(f"augment = {self.augment!r}: valid values are {', '.join(AUGMENTS)}")
        try:
            check_strategy(self.dsa_strategy)
        except ValueError as e:
            raise ConfigError(f"dsa_strategy: {e}") from None
        try:
            check_dc_strategy(self.dc_strategy)
        except ValueError as e:
            raise ConfigError(f"dc_strategy: {e}") from None
        if self.dsa_space not in SPACES:
            raise ConfigError(f"dsa_space = {self.dsa_space!r}: valid values are {', '.join(SPACES)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size = {self.batch_size}: must be >= 1")
        if self.labels not in ("hard", "soft"):
            raise ConfigError(f"labels = {self.labels!r}: valid values are 'hard', 'soft'")
        if min(self.stop_after, self.val_every, self.val_batches, self.chunk) < 0:
            raise ConfigError("stop_after, val_every, val_batches and chunk must be >= 0")


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's shuffle of n images, seeded by (seed, epoch): identical on every rank and after a resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def set_labels(cfg: HardTrainConfig, images: SyntheticSet) -> torch.Tensor:
    """The targets: class ids, or (labels = soft) the probabilities of the file the set's manifest names, checked
    to belong to these images."""
    if cfg.labels == "hard":
        return images.labels
    entry = images.manifest.get("soft_labels")
    if not entry:
        raise GuardFastError(f"{cfg.images}: labels = soft, but the set has no soft labels (only TESLA sets do)")
    path = Path(cfg.images) / entry["file"]
    try:
        soft = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GuardFastError(f"{path}: cannot load the soft labels ({type(e).__name__}: {e})") from None
    if soft.get("content_hash") != images.content_hash or soft["probs"].shape != (len(images.labels),
                                                                                  images.num_classes):
        raise GuardFastError(f"{path}: soft labels made for another image set; rerun the distillation")
    return soft["probs"].float()


def slice_backward(engine: Any, x: torch.Tensor, y: torch.Tensor, scale: float, chunk: int) -> torch.Tensor:
    """Backward of scale x (CE sum over this rank's slice) in passes of `chunk` images (0: one pass); returns the
    loss. DeepSpeed's manual accumulation boundary: the passes before the last only accumulate gradients, the last
    one reduces them over ranks (any ZeRO stage), and the caller's engine.step() is the one optimizer step."""
    parts = list(zip(x.split(chunk), y.split(chunk), strict=True)) if chunk and len(y) > chunk else [(x, y)]
    total = torch.zeros((), device=x.device)
    for k, (xc, yc) in enumerate(parts):
        engine.set_gradient_accumulation_boundary(k == len(parts) - 1)
        loss = F.cross_entropy(engine(xc).float(), yc, reduction="sum") * scale
        engine.backward(loss)
        total += loss.detach()
    return total


@stage("train-hard")
def run_train_hard(cfg: HardTrainConfig, info: DistInfo) -> dict[str, Any]:
    """Train on the distilled set's hard labels; writes output.dir/{student.pt, result.json, metrics.jsonl,
    checkpoints/}."""
    run = open_run(cfg.output.dir, cfg, info=info)
    with setup_phase():  # rank-local work: an error on any rank stops every rank with one line
        spec = resolve_dataset(cfg.data)
        images = load_synthetic(cfg.images, spec.num_classes)
        if images.image_size != spec.image_size:
            raise GuardFastError(f"{cfg.images}: {images.image_size} px images, but the data config says "
                                 f"{spec.image_size} px")
        n = len(images.labels)
        if n < info.world:
            raise GuardFastError(f"{cfg.images} holds {n} images, fewer than the {info.world} ranks")
        pixels = images.train_pixels(cfg.quantize).to(info.device)  # (N, 3, S, S) pixel units
        mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (spec.mean, spec.std))
        labels = set_labels(cfg, images).to(info.device)  # (N,) class ids or (N, C) probabilities
        optim = copy.deepcopy(cfg.optim)
        if cfg.lr_from_set:
            if "syn_lr" not in images.manifest:
                raise GuardFastError(f"{cfg.images}: lr_from_set, but the set's manifest has no learned lr (syn_lr); "
                                     "only MTT/TESLA sets do")
            optim.lr = float(images.manifest["syn_lr"])
        batch = min(cfg.batch_size, n)
        steps_per_epoch = -(-n // batch)
        val = build_loader(cfg.data, "val", rank=info.rank, world=info.world, device=info.device)
        torch.manual_seed(cfg.dist.seed)  # identical network initialization on every rank
        model = prepare_model(model_from_config(cfg.model, spec).to(info.device), cfg.model)
    trainer = build_trainer(model, optim, cfg.dist, cfg.output, micro_batch=max(1, batch // info.world),
                            steps_per_epoch=steps_per_epoch, run=run, info=info, resume=cfg.resume,
                            stop_after=cfg.stop_after, desc="train-hard")
    engine = trainer.engine
    dtype = torch.bfloat16 if cfg.dist.precision == "bf16" else torch.float32
    metrics: dict[str, Any] = {}
    for epoch, offset in trainer.epochs():
        order = epoch_order(n, cfg.dist.seed, epoch)
        for b in range(offset, steps_per_epoch):
            ids = order[b * batch:(b + 1) * batch]  # the global batch
            x, y = pixels[ids], labels[ids]
            if cfg.augment == "dsa":  # one draw per image of the global batch, seeded by (seed, epoch, batch)
                gen = torch.Generator().manual_seed((cfg.dist.seed * 1_000_003 + epoch) * 100_003 + b)
                draw = sample_dsa(gen, cfg.dsa_strategy, x.shape[2], x.shape[3], len(ids))
                x = apply_dsa_in(x, draw, cfg.dsa_space, "pixel", mean, std)
            elif cfg.augment == "dc":  # DC's per-image draws, seeded by (seed, epoch, batch) like DSA's
                rng = np.random.default_rng((cfg.dist.seed * 1_000_003 + epoch) * 100_003 + b)
                x = dc_augment_pixels(x, cfg.dc_strategy, rng, mean, std)
            xs, ys = x.tensor_split(info.world)[info.rank], y.tensor_split(info.world)[info.rank]
            loss = slice_backward(engine, xs.to(dtype), ys, info.world / len(ids), cfg.chunk)
            engine.step()
            if trainer.step_done(loss, {}, len(ys)):
                return trainer.stopped()
        trainer.end_epoch(epoch)
        if trainer.validation_due(epoch, cfg.val_every):
            metrics = accuracy(engine.module, val, max_batches=cfg.val_batches, dtype=dtype)
            trainer.log_validation(epoch, metrics)
    return trainer.finish("student.pt", {"steps": trainer.step, "images": n, "augment": cfg.augment,
                                         "content_hash": images.content_hash, "val": metrics,
                                         "trained_on": "floats" if images.floats is not None and not cfg.quantize
                                         else "8-bit"})
