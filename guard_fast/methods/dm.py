"""DM (Zhao & Bilen, WACV 2023): distribution matching -> a student trained with DSA, no teacher.

`dm` runs the dm stage (guard_fast/distill/dm.py; the pipeline's `dm` section, ipc set per chain) and trains a fresh
network on the images with DSA on every batch (the `train_dsa` section: main_DM.py's evaluation, evaluate_synset with
DSA for 1000 epochs, :21). DM has no GUARD variant: it trains no network and matches no real-batch loss, so there is
no place for the curvature term (docs/methods/dm.md).
"""

from __future__ import annotations

from pathlib import Path

from guard_fast.distill.dm import DMConfig, run_dm
from guard_fast.methods.base import Method, PipelineCfg, Section, Stage, stage_config
from guard_fast.methods.students import TRAIN_DSA
from guard_fast.student.hard import run_train_hard


def _summary(d: DMConfig, cfg: PipelineCfg) -> str:
    dsa = f"DSA {d.dsa_strategy} in {d.dsa_space} space" if d.dsa else "no DSA"
    return (f"- dm: {d.model.arch} width {d.model.width} (fresh each iteration), {d.space} space, {dsa}, "
            f"{d.iterations} iterations, init {d.init}, clamp {d.clamp}, lr_img {d.lr_img} (momentum "
            f"{d.momentum_img}), batch_real {d.batch_real}")


DM_SECTION = Section("dm", DMConfig, "DM: distribution matching through fresh ConvNets (dm.ipc is set per IPC)",
                     _summary)


def _dm(cfg: PipelineCfg, opts: dict[str, str], ipc: int, chain: Path) -> list[Stage]:
    d = stage_config(cfg, "dm", chain / "dm")
    d.ipc = ipc
    distill = Stage("dm", chain / "dm", d, run_dm, {"manifest": "manifest.json", "grid": "grid.png"})
    tr = stage_config(cfg, "train_dsa", chain / "train-hard")
    tr.images = str(distill.folder)
    return [distill, Stage("train-hard", chain / "train-hard", tr, run_train_hard, {"student": "student.pt"},
                           [distill.folder])]


DM = Method("dm", "DM: match mean embeddings of real and synthetic batches through fresh ConvNets (same DSA draw), "
            "then a student trained with DSA; no GUARD variant (no trained network)", {}, ("dm", "train-hard"),
            lambda o: "DM", _dm, (DM_SECTION, TRAIN_DSA))
