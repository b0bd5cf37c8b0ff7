"""Subset: a random real subset of the train split as an image set, the control arm of the SRe2L family.

`ipc` real images per class of `data.path/train`, drawn with a generator seeded by `dist.seed` (class by class, in
the folder's sorted order), resized to the model input like every real image and written in the recovered-set
format (guard_fast/data/synthetic.py): relabel and the KD student then treat it exactly like a recovered set. Each
manifest item names its source file (`source`, relative to the train folder), so the set can be checked against
the training data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from guard_fast.data.folder import scan_folder
from guard_fast.data.presets import resolve_dataset
from guard_fast.data.real import read_real
from guard_fast.data.synthetic import save_grid, write_synthetic
from guard_fast.runtime import distributed as D
from guard_fast.runtime.cluster import open_run
from guard_fast.runtime.config import DataConfig, DistConfig, OutputConfig
from guard_fast.runtime.distributed import DistInfo, setup_phase
from guard_fast.runtime.errors import ConfigError, GuardFastError
from guard_fast.runtime.io import atomic_json
from guard_fast.runtime.runfolder import stage


@dataclass
class SubsetConfig:
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(dir="runs/subset"))
    ipc: int = 10
    """real train images per class"""
    grid_classes: int = 10
    """classes (rows) shown in grid.png"""

    def validate(self) -> None:
        if self.ipc < 1:
            raise ConfigError(f"ipc = {self.ipc}: must be >= 1")


def draw_subset(samples: list[tuple[str, int]], num_classes: int, ipc: int, seed: int) -> list[list[int]]:
    """Per class, `ipc` indices into `samples` (a seeded permutation of that class's images, in folder order)."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(num_classes):
        ids = [i for i, (_, k) in enumerate(samples) if k == c]
        if len(ids) < ipc:
            raise GuardFastError(f"class {c} has {len(ids)} train images, fewer than ipc = {ipc}")
        picks.append([ids[int(j)] for j in torch.randperm(len(ids), generator=gen)[:ipc]])
    return picks


@stage("subset")
def run_subset(cfg: SubsetConfig, info: DistInfo) -> dict[str, Any]:
    """Write cfg.ipc seeded real train images per class into output.dir (images/, manifest.json, grid.png,
    result.json)."""
    run = open_run(cfg.output.dir, cfg, info=info)
    with setup_phase():
        spec = resolve_dataset(cfg.data)
        train = Path(cfg.data.path) / "train"
        classes, samples = scan_folder(train)
        if len(classes) != spec.num_classes:
            raise GuardFastError(f"{train}: {len(classes)} class folders, but the config/preset says "
                                 f"{spec.num_classes} classes (data.num_classes)")
        picks = draw_subset(samples, spec.num_classes, cfg.ipc, cfg.dist.seed)
    run.start()
    result: dict[str, Any] = {}
    if info.is_main:
        items, pixels = [], []
        for c, ids in enumerate(picks):
            for k, i in enumerate(ids):
                path = samples[i][0]
                pixels.append(read_real(path, spec.channels, spec.image_size))
                items.append({"label": c, "ipc_index": k, "source": Path(path).relative_to(train).as_posix()})
        px = torch.stack(pixels)
        meta = {"ipc": cfg.ipc, "image_size": spec.image_size, "dataset": cfg.data.dataset, "method": "real subset",
                "seed": cfg.dist.seed}
        manifest = write_synthetic(run.path, px, items, classes, meta)
        save_grid(run.path / "grid.png", px, torch.tensor([it["label"] for it in items]), cfg.grid_classes)
        result = {"images": len(items), "ipc": cfg.ipc, "classes": len(classes),
                  "content_hash": manifest["content_hash"]}
        atomic_json(run.path / "result.json", result)
    D.barrier()
    return D.broadcast_object(result)
