"""DC (gradient matching) and GUARD(DC) (paper Algorithm 1): `dc` -> `train-hard`, no teacher.

`dc` runs the dc stage (guard_fast/distill/dc.py; the pipeline's `dc` section, ipc set per chain) and trains a fresh
network on the images with hard labels (guard_fast/student/hard.py; the `train_hard` section). `dc:guard=true` adds
the curvature term to the matched real-batch loss.
"""

from __future__ import annotations

from pathlib import Path

from guard_fast.distill.dc import DCConfig, run_dc
from guard_fast.methods.base import Method, PipelineCfg, Section, Stage, stage_config
from guard_fast.methods.students import TRAIN_HARD
from guard_fast.student.hard import run_train_hard


def _summary(dc: DCConfig, cfg: PipelineCfg) -> str:
    loops = "table by IPC" if not (dc.outer_loop and dc.inner_loop) else f"{dc.outer_loop}/{dc.inner_loop}"
    return (f"- dc: {dc.model.arch} width {dc.model.width}, {dc.iterations} outer iterations, loops {loops}, init "
            f"{dc.init}, lr_img {dc.lr_img}, lr_net {dc.lr_net}, batch_real {dc.batch_real}; GUARD(DC) lam {dc.lam}, h "
            f"{dc.h} ([0,1] pixels, sign direction)")


DC_SECTION = Section("dc", DCConfig, "DC / GUARD(DC) gradient matching (dc.ipc is set per IPC, dc.guard by the method "
                     "option)", _summary)


def _dc(cfg: PipelineCfg, opts: dict[str, str], ipc: int, chain: Path) -> list[Stage]:
    dc = stage_config(cfg, "dc", chain / "dc")
    dc.ipc, dc.guard = ipc, opts.get("guard", "false") == "true"
    distill = Stage("dc", chain / "dc", dc, run_dc, {"manifest": "manifest.json", "grid": "grid.png"})
    tr = stage_config(cfg, "train_hard", chain / "train-hard")
    tr.images = str(distill.folder)
    return [distill, Stage("train-hard", chain / "train-hard", tr, run_train_hard, {"student": "student.pt"},
                           [distill.folder])]


DC = Method("dc", "DC: gradient matching on fresh ConvNets, then hard-label training (guard=true: GUARD(DC))",
            {"guard": ("false", "true")}, ("dc", "train-hard"),
            lambda o: "GUARD(DC)" if o.get("guard", "false") == "true" else "DC", _dc, (DC_SECTION, TRAIN_HARD))
