"""Recover: synthesize images per class by matching the teacher's BatchNorm statistics (SRe2L, with CDA option).

Work items are (class, IPC index) pairs ordered IPC-major, cut into chunks of `batch_size` images, so one chunk
optimizes many classes at once; chunk k goes to rank k % world. Every random choice of a chunk (initial noise, crops,
flips, rolls) comes from a generator seeded by (seed, k): the images do not depend on the number of ranks, and a
restarted run skips the chunks already saved and reproduces the rest exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from guard_fast.data.augment import resized_crop, sample_rrc
from guard_fast.data.presets import resolve_dataset
from guard_fast.data.synthetic import class_names, save_grid, to_uint8, write_synthetic
from guard_fast.models import Classifier, ModelConfig, model_from_config, prepare_model
from guard_fast.runtime import distributed as D
from guard_fast.runtime.bounds import NonNegative, Positive
from guard_fast.runtime.cluster import open_run
from guard_fast.runtime.config import DataConfig, DistConfig, OutputConfig
from guard_fast.runtime.distributed import DistInfo, setup_phase
from guard_fast.runtime.errors import ConfigError, GuardFastError
from guard_fast.runtime.io import atomic_json, atomic_torch_save, file_sha256, saved_with_key
from guard_fast.runtime.rundir import RunDir
from guard_fast.runtime.runfolder import stage

CURRICULA = ("off", "step", "linear", "cosine")


@dataclass
class RecoverConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(dir="runs/recover"))
    ipc: int = 10
    """images per class to synthesize"""
    iterations: int = 1000
    """Adam steps per chunk (paper: 2000; reference 1000-4000)"""
    lr: Positive = 0.25
    """Adam learning rate on normalized pixels (reference: 0.25 ImageNette/ImageNet, 0.1 Tiny-ImageNet)"""
    r_bn: NonNegative = 0.01
    """weight of the BatchNorm statistics loss (reference: 0.01 ImageNette/ImageNet, 1.0 Tiny-ImageNet)"""
    first_bn_multiplier: NonNegative = 10.0
    """extra weight of the first BatchNorm layer's term"""
    jitter: int = 4
    """maximum random roll in pixels per axis each iteration (reference: 32 at 224 px, 4 at 64 px)"""
    batch_size: int = 100
    """images optimized together per chunk (mixing classes and IPC indices)"""
    crop_scale_min: float = 0.08
    """lower bound of the per-iteration RandomResizedCrop area fraction (the final value under CDA)"""
    curriculum: str = "off"
    """CDA crop curriculum: off, step, linear or cosine decay of the crop lower bound from 1.0 to crop_scale_min"""
    milestone: float = 0.5
    """fraction of the iterations over which the CDA curriculum decays (ignored when curriculum = off)"""
    grid_classes: int = 10
    """classes (rows) shown in grid.png"""
    stop_after: int = 0
    """stop after this many chunks on each rank as if killed (0 = run to the end; for tests)"""

    def validate(self) -> None:
        if min(self.ipc, self.iterations, self.batch_size) < 1:
            raise ConfigError("ipc, iterations and batch_size must be >= 1")
        if self.lr <= 0 or self.r_bn < 0 or self.jitter < 0:
            raise ConfigError("lr must be > 0; r_bn and jitter >= 0")
        if self.curriculum not in CURRICULA:
            raise ConfigError(f"curriculum = {self.curriculum!r}: valid values are {', '.join(CURRICULA)}")
        if self.curriculum != "off" and not 0.0 < self.milestone <= 1.0:
            raise ConfigError(f"milestone = {self.milestone}: must be in (0, 1] when the CDA curriculum is on")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ConfigError(f"crop_scale_min = {self.crop_scale_min}: must be in (0, 1]")


def crop_lower_bound(it: int, iterations: int, cfg: RecoverConfig) -> float:
    """CDA: the RandomResizedCrop lower bound at iteration `it`, decaying from 1.0 to crop_scale_min over the first
    `milestone * iterations` iterations (constant crop_scale_min when the curriculum is off)."""
    lo = cfg.crop_scale_min
    end = cfg.milestone * iterations
    if cfg.curriculum == "off" or it >= end:
        return lo
    t = it / end
    if cfg.curriculum == "step":
        return 1.0
    if cfg.curriculum == "linear":
        return 1.0 - (1.0 - lo) * t
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * t))


class BNStatLoss:
    """Forward hooks on every BatchNorm2d of the teacher: sum_l m_l (||mu_l - running_mean_l||_2 +
    ||var_l - running_var_l||_2) of the layer inputs' batch statistics, m_1 = first_multiplier, m_l = 1 after."""

    def __init__(self, model: torch.nn.Module, first_multiplier: float):
        self.terms: list[torch.Tensor] = []
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        if not bns:
            raise GuardFastError("the teacher has no BatchNorm2d layers; recover matches their statistics")
        weights = [first_multiplier] + [1.0] * (len(bns) - 1)
        self.handles = [bn.register_forward_hook(self._hook(w)) for bn, w in zip(bns, weights, strict=True)]

    def _hook(self, weight: float):
        def hook(bn: torch.nn.BatchNorm2d, inputs: tuple[torch.Tensor], _out) -> None:
            x = inputs[0]  # (B, C, H, W)
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False)
            self.terms.append(weight * (torch.linalg.vector_norm(mean - bn.running_mean)
                                        + torch.linalg.vector_norm(var - bn.running_var)))
        return hook

    def pop(self) -> torch.Tensor:
        total = torch.stack(self.terms).sum()
        self.terms.clear()
        return total

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def chunk_items(num_classes: int, ipc: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """(class, ipc index) pairs, IPC-major, cut into chunks of batch_size."""
    items = [(c, k) for k in range(ipc) for c in range(num_classes)]
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


def augment(x: torch.Tensor, gen: torch.Generator, lower: float, jitter: int) -> torch.Tensor:
    """One RandomResizedCrop(scale=(lower, 1)) + flip for the whole batch, then a random roll of up to jitter px."""
    size = x.shape[-1]
    x = resized_crop(x, sample_rrc(gen, size, size, (lower, 1.0)), size)
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(-1)
    if jitter:
        dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=gen).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return x


def recover_chunk(teacher: Classifier, labels: torch.Tensor, cfg: RecoverConfig, size: int, seed: int,
                  bar: tqdm | None = None) -> tuple[torch.Tensor, list[float]]:
    """Optimize one chunk; returns images in [0,1] (B, 3, S, S) and the loss at every 10th iteration."""
    device = labels.device
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn((len(labels), teacher.channels, size, size), generator=gen).to(device).requires_grad_(True)
    lo = ((0 - teacher.mean) / teacher.std).to(device)  # (1, C, 1, 1) valid normalized range per channel
    hi = ((1 - teacher.mean) / teacher.std).to(device)
    opt = torch.optim.Adam([u], lr=cfg.lr, betas=(0.5, 0.9))
    bn = BNStatLoss(teacher.body, cfg.first_bn_multiplier)
    history: list[float] = []
    try:
        for it in range(cfg.iterations):
            for g in opt.param_groups:  # cosine, no warmup
                g["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * it / cfg.iterations))
            x = augment(u, gen, crop_lower_bound(it, cfg.iterations, cfg), cfg.jitter)
            logits = teacher.body(teacher.input_format(x))
            loss = F.cross_entropy(logits, labels) + cfg.r_bn * bn.pop()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                u.copy_(torch.maximum(torch.minimum(u, hi), lo))
            if it % 10 == 0 or it == cfg.iterations - 1:
                history.append(float(loss.detach()))  # host sync: every 10th iteration
            if bar is not None:
                bar.update(1)
    finally:
        bn.remove()
    return teacher.denormalize(u.detach()).clamp(0, 1), history


def images_key(cfg: RecoverConfig, spec_dict: dict[str, Any]) -> str:
    """Hash of everything that determines the images (not the output folder, progress or world size)."""
    c = asdict(cfg)
    c.pop("output"), c.pop("stop_after"), c.pop("grid_classes")
    c["dist"] = {"seed": cfg.dist.seed}
    ckpt = Path(cfg.model.checkpoint)
    c["teacher_sha256"] = file_sha256(ckpt) if ckpt.is_file() else None
    c["spec"] = spec_dict
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]


@stage("recover")
def run_recover(cfg: RecoverConfig, info: DistInfo) -> dict[str, Any]:
    """Synthesize cfg.ipc images per class into output.dir (images/, manifest.json, grid.png, result.json)."""
    if not cfg.model.checkpoint:  # checked here, not in validate(): the pipeline fills it in after squeeze
        raise ConfigError("model.checkpoint: recover needs the teacher's checkpoint (squeeze's teacher.pt)")
    run = open_run(cfg.output.dir, cfg, info=info)  # every rank agrees on the folder
    with setup_phase():  # rank-local work: an error on any rank stops every rank with one line
        spec = resolve_dataset(cfg.data)
        size = spec.image_size
        key = images_key(cfg, asdict(spec))
        teacher = model_from_config(cfg.model, spec)
        teacher = prepare_model(teacher.to(info.device).eval().requires_grad_(False), cfg.model)
    run.start()  # inputs checked: write the run's record
    chunks = chunk_items(spec.num_classes, cfg.ipc, cfg.batch_size)
    mine = list(range(info.rank, len(chunks), info.world))
    folder = run.path / "chunks"
    todo = [k for k in mine if not saved_with_key(folder / f"chunk{k:05d}.pt", key)]
    bar = tqdm(total=len(mine) * cfg.iterations, initial=(len(mine) - len(todo)) * cfg.iterations, desc="recover",
               disable=not (info.is_main and cfg.output.progress))
    # Images with flat dark regions drive activations and gradients into denormal floats, which make x86 CPUs ~10x
    # slower (seen here: 0.25 -> 3.5 s/iteration mid-run on digits); flush them to zero on CPU, restore after.
    torch.set_flush_denormal(info.device.type == "cpu")
    try:
        return _recover_chunks(cfg, info, run, teacher, chunks, todo, folder, key, size, spec.num_classes, bar)
    finally:
        torch.set_flush_denormal(False)


def _recover_chunks(cfg: RecoverConfig, info: DistInfo, run: RunDir, teacher: Classifier, chunks, todo: list[int],
                    folder: Path, key: str, size: int, num_classes: int, bar: tqdm) -> dict[str, Any]:
    for n, k in enumerate(todo):
        if cfg.stop_after and n >= cfg.stop_after:
            bar.close()
            return {"stopped_after_chunks": n}
        labels = torch.tensor([c for c, _ in chunks[k]], device=info.device)
        seed = cfg.dist.seed * 1_000_003 + k
        images, history = recover_chunk(teacher, labels, cfg, size, seed, bar)
        atomic_torch_save(folder / f"chunk{k:05d}.pt", {"key": key, "chunk": k, "rank": info.rank, "seed": seed,
                                                        "items": chunks[k], "images": images.cpu(),
                                                        "loss": history})
        run.log({"chunk": k, "rank": info.rank, "loss_first": history[0], "loss_last": history[-1]})
    bar.close()
    D.barrier()  # every rank's chunks are on disk
    result: dict[str, Any] = {}
    if info.is_main:
        result = _assemble(run.path, folder, len(chunks), key, cfg, num_classes, size)
    return D.broadcast_object(result)


def _assemble(root: Path, folder: Path, num_chunks: int, key: str, cfg: RecoverConfig, num_classes: int,
              size: int) -> dict[str, Any]:
    """Chunks -> ImageFolder PNGs + manifest (class-major order) + grid + result.json (rank 0)."""
    entries, images = [], []
    for k in range(num_chunks):
        chunk = torch.load(folder / f"chunk{k:05d}.pt", map_location="cpu", weights_only=True)
        if chunk["key"] != key:
            raise GuardFastError(f"{folder}/chunk{k:05d}.pt belongs to another configuration; delete {folder}")
        for (c, i), img in zip(chunk["items"], chunk["images"], strict=True):
            entries.append({"label": int(c), "ipc_index": int(i), "chunk": k, "seed": int(chunk["seed"]),
                            "loss_last": chunk["loss"][-1]})
            images.append(img)
    order = sorted(range(len(entries)), key=lambda j: (entries[j]["label"], entries[j]["ipc_index"]))
    items = [entries[j] for j in order]
    pixels = to_uint8(torch.stack([images[j] for j in order]))
    classes = class_names(cfg.data, num_classes)
    meta = {"images_key": key, "ipc": cfg.ipc, "image_size": size, "dataset": cfg.data.dataset,
            "teacher": cfg.model.checkpoint, "iterations": cfg.iterations, "curriculum": cfg.curriculum}
    manifest = write_synthetic(root, pixels, items, classes, meta)
    labels = torch.tensor([it["label"] for it in items])
    save_grid(root / "grid.png", pixels, labels, cfg.grid_classes)
    result = {"images": len(items), "ipc": cfg.ipc, "classes": num_classes, "content_hash": manifest["content_hash"],
              "mean_final_loss": sum(it["loss_last"] for it in items) / len(items)}
    atomic_json(root / "result.json", result)
    return result
