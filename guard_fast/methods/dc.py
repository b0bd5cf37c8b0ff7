"""DC (gradient matching) and GUARD(DC) (paper Algorithm 1): `dc` -> `train-hard`, no teacher.

`dc` runs the dc stage (guard_fast/distill/dc.py; the pipeline's `dc` section, ipc set per chain) and trains a fresh
network on the images with hard labels (guard_fast/student/hard.py; the `train_hard` section). `dc:guard=true` adds
the curvature term to the matched real-batch loss.

Student protocol (option `protocol`): `matched` (default) trains DC's and GUARD(DC)'s students alike, as the
`train_hard` section says; `authors` reproduces main_CURE.py's Table 5 evaluation, whose students train for
epoch_eval_train + 1 epochs: 301 for DC (:23, 142; the loop of utils.py:563) and 1001 for GUARD(DC) (:131-133, 140),
an asymmetry that favours GUARD(DC). The images do not depend on the protocol: both protocols (and any label) of
one method share its dc stage folder, `<root>/dc[-guard-true]/ipc<k>/dc`, so the set is distilled once.
"""

from __future__ import annotations

from pathlib import Path

from guard_fast.distill.dc import DCConfig, run_dc
from guard_fast.methods.base import Method, PipelineCfg, Section, Stage, stage_config
from guard_fast.methods.students import TRAIN_HARD
from guard_fast.student.hard import run_train_hard


def _summary(dc: DCConfig, cfg: PipelineCfg) -> str:
    loops = "table by IPC" if not (dc.outer_loop and dc.inner_loop) else f"{dc.outer_loop}/{dc.inner_loop}"
    return (f"- dc: {dc.model.arch} width {dc.model.width}, {dc.space} space, {dc.iterations} outer iterations, loops "
            f"{loops}, init {dc.init}, clamp {dc.clamp}, lr_img {dc.lr_img}, lr_net {dc.lr_net}, batch_real "
            f"{dc.batch_real}; GUARD(DC) lam {dc.lam}, h {dc.h} (sign direction)")


DC_SECTION = Section("dc", DCConfig, "DC / GUARD(DC) gradient matching (dc.ipc is set per IPC, dc.guard by the method "
                     "option)", _summary)
AUTHORS_EPOCHS = {False: 301, True: 1001}  # main_CURE.py's student epochs: DC, GUARD(DC)


def _dc(cfg: PipelineCfg, opts: dict[str, str], ipc: int, chain: Path) -> list[Stage]:
    guard = opts.get("guard", "false") == "true"
    folder = chain.parent.parent / ("dc-guard-true" if guard else "dc") / chain.name / "dc"  # shared: see above
    dc = stage_config(cfg, "dc", folder)
    dc.ipc, dc.guard = ipc, guard
    distill = Stage("dc", folder, dc, run_dc, {"manifest": "manifest.json", "grid": "grid.png"})
    tr = stage_config(cfg, "train_hard", chain / "train-hard")
    tr.images = str(distill.folder)
    if opts.get("protocol", "matched") == "authors":
        tr.optim.epochs = AUTHORS_EPOCHS[dc.guard]
    return [distill, Stage("train-hard", chain / "train-hard", tr, run_train_hard, {"student": "student.pt"},
                           [distill.folder])]


def _label(opts: dict[str, str]) -> str:
    name = "GUARD(DC)" if opts.get("guard", "false") == "true" else "DC"
    return name + (" authors' protocol" if opts.get("protocol", "matched") == "authors" else "")


DC = Method("dc", "DC: gradient matching on fresh ConvNets, then hard-label training (guard=true: GUARD(DC); "
            "protocol=authors: main_CURE.py's student epochs)",
            {"guard": ("false", "true"), "protocol": ("matched", "authors")}, ("dc", "train-hard"), _label, _dc,
            (DC_SECTION, TRAIN_HARD))
