"""DC (gradient matching) and GUARD(DC) (paper Algorithm 1): `dc` -> `train-hard`, no teacher.

`dc` runs the dc stage (guard_fast/distill/dc.py; the pipeline's `dc` section, ipc set per chain) and trains a fresh
network on the images with hard labels (guard_fast/student/hard.py; the `train_hard` section). `dc:guard=true` adds
the curvature term to the matched real-batch loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from guard_fast.distill.dc import run_dc
from guard_fast.methods.base import Method, Stage, stage_config
from guard_fast.student.hard import run_train_hard

if TYPE_CHECKING:
    from guard_fast.pipeline import PipelineConfig


def _dc(cfg: PipelineConfig, opts: dict[str, str], ipc: int, chain: Path) -> list[Stage]:
    dc = stage_config(cfg, "dc", chain / "dc")
    dc.ipc, dc.guard = ipc, opts.get("guard", "false") == "true"
    distill = Stage("dc", chain / "dc", dc, run_dc, {"manifest": "manifest.json", "grid": "grid.png"})
    tr = stage_config(cfg, "train_hard", chain / "train-hard")
    tr.images = str(distill.folder)
    return [distill, Stage("train-hard", chain / "train-hard", tr, run_train_hard, {"student": "student.pt"},
                           [distill.folder])]


DC = Method("dc", "DC: gradient matching on fresh ConvNets, then hard-label training (guard=true: GUARD(DC))",
            {"guard": ("false", "true")}, ("dc", "train-hard"),
            lambda o: "GUARD(DC)" if o.get("guard", "false") == "true" else "DC", _dc)
