"""DSA (Zhao & Bilen, ICML 2021) and GUARD(DSA): DC's gradient matching with siamese augmentation -> a student
trained with DSA, no teacher.

`dsa` runs the dc stage with `dsa = true` (guard_fast/distill/dc.py) from the pipeline's own `[dsa]` section, whose
defaults are VICO-UoE/DatasetCondensation's README command for DSA (`main.py --method DSA --init real --dsa_strategy
color_crop_cutout_flip_scale_rotate`: normalized images, real init, lr_img 0.1, batch_real 256, 1000 iterations,
loops by IPC), then trains a fresh network with DSA on every batch (the `train_dsa` section: evaluate_synset with
DSA, 1000 epochs, main.py:111-112). `dsa:guard=true` adds GUARD's curvature term to the matched real-batch loss, as
`dc:guard=true` does for DC (docs/methods/dsa.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from guard_fast.distill.dc import DCConfig, run_dc
from guard_fast.methods.base import Method, PipelineCfg, Section, Stage, stage_config
from guard_fast.methods.students import TRAIN_DSA
from guard_fast.runtime.config import OutputConfig
from guard_fast.student.hard import run_train_hard


@dataclass
class DSAConfig(DCConfig):
    """The dc stage with DSA's defaults (VICO main.py and its README command for --method DSA)."""

    output: OutputConfig = field(default_factory=lambda: OutputConfig(dir="runs/dsa"))
    init: str = "real"
    """real (VICO's README command for DSA: --init real) or noise (standard normal in the units of `space`)"""
    space: str = "normalized"
    """normalized (VICO: data normalized at load, main.py:88, 100) or pixel (raw pixel-unit tensors)"""
    dsa: bool = True
    """set by the method (always true for `dsa`)"""


def _summary(d: DSAConfig, cfg: PipelineCfg) -> str:
    loops = "table by IPC" if not (d.outer_loop and d.inner_loop) else f"{d.outer_loop}/{d.inner_loop}"
    return (f"- dsa: {d.model.arch} width {d.model.width}, {d.space} space, DSA {d.dsa_strategy} in {d.dsa_space} "
            f"space, {d.iterations} outer iterations, loops {loops}, init {d.init}, clamp {d.clamp}, lr_img "
            f"{d.lr_img}, lr_net {d.lr_net}, batch_real {d.batch_real}; GUARD(DSA) lam {d.lam}, h {d.h}")


DSA_SECTION = Section("dsa", DSAConfig, "DSA / GUARD(DSA): gradient matching with siamese augmentation (dsa.ipc is "
                      "set per IPC, dsa.guard by the method option)", _summary)


def _dsa(cfg: PipelineCfg, opts: dict[str, str], ipc: int, chain: Path) -> list[Stage]:
    folder = chain / "dsa"
    d = stage_config(cfg, "dsa", folder)
    d.ipc, d.guard, d.dsa = ipc, opts.get("guard", "false") == "true", True
    distill = Stage("dsa", folder, d, run_dc, {"manifest": "manifest.json", "grid": "grid.png"})
    tr = stage_config(cfg, "train_dsa", chain / "train-hard")
    tr.images = str(distill.folder)
    return [distill, Stage("train-hard", chain / "train-hard", tr, run_train_hard, {"student": "student.pt"},
                           [distill.folder])]


DSA = Method("dsa", "DSA: DC's gradient matching with the same DSA draw on each class's real and synthetic batch, "
             "then a student trained with DSA (guard=true: GUARD(DSA))", {"guard": ("false", "true")},
             ("dsa", "train-hard"), lambda o: "GUARD(DSA)" if o.get("guard", "false") == "true" else "DSA", _dsa,
             (DSA_SECTION, TRAIN_DSA))
