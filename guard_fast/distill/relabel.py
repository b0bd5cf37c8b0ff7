"""Relabel: the teacher's soft labels on FKD views of the synthetic set, stored per epoch for the student to replay.

`labels/epoch_<e>.pt` (one file per epoch, loadable with `torch.load(mmap=True, weights_only=True)`) holds the epoch's
view plan (order, crop boxes, flips, CutMix partners and boxes) and the teacher's fp16 logits per view (or, with
`topk`, the top-k logit values and class indices). `labels.json` records the view config, the image set's
content_hash, the teacher and the bytes written. Epoch e is computed by rank e % world; finished epochs are skipped
after a restart.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from guard_fast.data.presets import resolve_dataset
from guard_fast.data.soft_labels import LABELS, epoch_path
from guard_fast.data.synthetic import SyntheticSet, load_synthetic
from guard_fast.data.views import EpochPlan, ViewConfig, plan_epoch, render
from guard_fast.models import ModelConfig, model_from_config, prepare_model
from guard_fast.runtime import distributed as D
from guard_fast.runtime.cluster import open_run
from guard_fast.runtime.config import DataConfig, DistConfig, OutputConfig
from guard_fast.runtime.distributed import DistInfo, setup_phase
from guard_fast.runtime.errors import ConfigError, GuardFastError
from guard_fast.runtime.io import atomic_json, atomic_torch_save, file_sha256, saved_with_key
from guard_fast.runtime.runfolder import stage


@dataclass
class RelabelConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    """the teacher (model.checkpoint = squeeze's teacher.pt)"""
    dist: DistConfig = field(default_factory=DistConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(dir="runs/relabel"))
    views: ViewConfig = field(default_factory=ViewConfig)
    images: str = "runs/recover"
    """recover's output folder (manifest.json + images/)"""
    epochs: int = 300
    """epochs of soft labels to store (the student may train for at most this many)"""
    topk: int = 0
    """store only the k largest logits per view (0 = all classes)"""
    stop_after: int = 0
    """stop after this many epochs on each rank as if killed (0 = run to the end; for tests)"""

    def validate(self) -> None:
        if self.epochs < 1 or self.topk < 0:
            raise ConfigError("epochs must be >= 1 and topk >= 0")


def labels_key(images_hash: str, teacher_sha: str, views: ViewConfig, topk: int, image_size: int) -> str:
    blob = f"{images_hash}|{teacher_sha}|{views.key()}|{topk}|{image_size}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@torch.no_grad()
def label_epoch(teacher: torch.nn.Module, images: SyntheticSet, plan: EpochPlan, size: int, topk: int,
                device: torch.device) -> dict[str, torch.Tensor]:
    """Teacher logits (fp16) on every view of the plan, batch by batch."""
    out = []
    for b in range(plan.num_batches):
        positions = range(b * plan.batch_size, (b + 1) * plan.batch_size)
        out.append(teacher(render(images.pixels, plan, positions, size).to(device)).float().cpu())
    logits = torch.cat(out) if out else torch.zeros((0, images.num_classes))  # (V, C)
    if topk:
        values, indices = logits.topk(min(topk, logits.shape[1]), dim=1)
        return {"topk_values": values.half(), "topk_indices": indices.to(torch.int32)}
    return {"logits": logits.half()}


@stage("relabel")
def run_relabel(cfg: RelabelConfig, info: DistInfo) -> dict[str, Any]:
    """Write output.dir/labels/epoch_*.pt and labels.json; returns {'bytes': ..., 'epochs': ...}."""
    if not cfg.model.checkpoint:  # checked here, not in validate(): the pipeline fills it in after squeeze
        raise ConfigError("model.checkpoint: relabel needs the teacher's checkpoint (squeeze's teacher.pt)")
    run = open_run(cfg.output.dir, cfg, info=info)  # every rank agrees on the folder
    with setup_phase():  # rank-local work: an error on any rank stops every rank with one line
        spec = resolve_dataset(cfg.data)
        images = load_synthetic(cfg.images, spec.num_classes)
        size = spec.image_size
        teacher = model_from_config(cfg.model, spec)
        teacher = prepare_model(teacher.to(info.device).eval().requires_grad_(False), cfg.model)
        if len(images.labels) < cfg.views.batch_size:
            raise GuardFastError(f"views.batch_size = {cfg.views.batch_size} exceeds the {len(images.labels)} images "
                                 f"in {cfg.images}; lower it")
        key = labels_key(images.content_hash, file_sha256(cfg.model.checkpoint), cfg.views, cfg.topk, size)
    run.start()  # inputs checked: write the run's record
    folder = run.path / "labels"
    mine = [e for e in range(cfg.epochs) if e % info.world == info.rank]
    todo = [e for e in mine if not saved_with_key(epoch_path(run.path, e), key)]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="relabel", unit="epoch",
               disable=not (info.is_main and cfg.output.progress))
    for n, e in enumerate(todo):
        if cfg.stop_after and n >= cfg.stop_after:
            bar.close()
            return {"stopped_after_epochs": n}
        plan = plan_epoch(len(images.labels), size, cfg.views, e)
        record = {"key": key, "epoch": e, **plan.to_dict(),
                  **label_epoch(teacher, images, plan, size, cfg.topk, info.device)}
        atomic_torch_save(epoch_path(run.path, e), record)
        bar.update(1)
    bar.close()
    D.barrier()  # every epoch file is on disk
    nbytes = sum(p.stat().st_size for p in folder.glob("epoch_*.pt"))
    meta = {"key": key, "images": str(cfg.images), "images_hash": images.content_hash, "num_images":
            len(images.labels), "num_classes": spec.num_classes, "image_size": size, "epochs": cfg.epochs,
            "topk": cfg.topk, "views": asdict(cfg.views), "views_key": cfg.views.key(),
            "teacher": cfg.model.checkpoint, "bytes": nbytes}
    if info.is_main:
        atomic_json(run.path / LABELS, meta)
        tqdm.write(f"relabel: {cfg.epochs} epochs, {nbytes / 2**20:.2f} MiB in {folder}")
    return {"bytes": nbytes, "epochs": cfg.epochs}
