"""SRe2L (squeeze -> recover -> relabel -> train) and CDA (the same with recover's crop curriculum), with any squeeze
objective as the teacher: GUARD is `sre2l:teacher=guard`, SRe2L+Adv is `sre2l:teacher=pgd-at`, GUARD(CDA) is
`cda:teacher=guard`. `sre2l:images=real` is the control arm: recover is replaced by a seeded random real subset of
the train split (the subset stage), relabelled by the same teacher (the same squeeze folder, so the same teacher
stage as `sre2l:teacher=none` in one pipeline folder) and distilled into the student exactly like a recovered set."""

from __future__ import annotations

import copy
from pathlib import Path

from guard_fast.data.presets import resolve_dataset
from guard_fast.data.views import ViewConfig
from guard_fast.distill.recover import CURRICULA, RecoverConfig, run_recover
from guard_fast.distill.relabel import RelabelConfig, run_relabel
from guard_fast.distill.subset import SubsetConfig, run_subset
from guard_fast.methods.base import Method, PipelineCfg, Section, Stage, stage_config
from guard_fast.models import ModelConfig
from guard_fast.regularizers.objectives import OBJECTIVES
from guard_fast.runtime.errors import ConfigError
from guard_fast.squeeze.stage import SqueezeConfig, run_squeeze
from guard_fast.student.kd import TrainConfig, run_train

SQUEEZE = Section(
    "squeeze", SqueezeConfig, "teacher training; squeeze.objective.name is set per method (teacher=...), squeeze.model "
    "is also the teacher of recover and relabel",
    lambda sq, cfg: (f"- squeeze: {sq.model.arch} width {sq.model.width}, {sq.optim.name} lr {sq.optim.lr}, "
                     f"{sq.optim.epochs} epochs, batch {cfg.data.batch_size}/rank; GUARD h {sq.objective.h}"
                     f"{' scaled to the input resolution' if sq.objective.h_scaling == 'resolution' else ''}, beta "
                     f"{sq.objective.beta}, strategy {sq.objective.strategy}"))
RECOVER = Section(
    "recover", RecoverConfig, "synthesis (recover.ipc is set per IPC; the teacher comes from squeeze; cda sets the "
    "curriculum)",
    lambda rc, cfg: (f"- recover: {rc.iterations} iterations, lr {rc.lr}, r_bn {rc.r_bn}, jitter {rc.jitter} px, CDA "
                     f"{rc.curriculum}"))
RELABEL = Section("relabel", RelabelConfig, "soft labels (views and epochs follow train.views and train.optim.epochs)")
TRAIN = Section(
    "train", TrainConfig, "the KD student (train.model); soft_labels = 'online' skips the relabel stage",
    lambda tr, cfg: (f"- relabel/train: student {tr.model.arch} width {tr.model.width}, {tr.optim.name} lr "
                     f"{tr.optim.lr}, {tr.optim.epochs} epochs, batch {tr.views.batch_size}, T {tr.temperature}, "
                     f"soft labels {tr.soft_labels}"))
SUBSET = Section("subset", SubsetConfig, "the real-subset control (sre2l:images=real): subset.ipc is set per IPC, the "
                 "draw is seeded by dist.seed")
SECTIONS = (SQUEEZE, RECOVER, RELABEL, TRAIN)

SRE2L_LABELS = {"none": "SRe2L", "guard": "GUARD", "pgd-at": "SRe2L+Adv"}
CDA_LABELS = {"none": "CDA", "guard": "GUARD(CDA)"}


def teacher_stage(cfg: PipelineCfg, objective: str, root: Path) -> Stage:
    """The squeeze stage of a teacher objective; its folder is shared by every method using that teacher."""
    folder = root / "teachers" / objective
    squeeze = stage_config(cfg, "squeeze", folder)
    squeeze.objective.name = objective
    return Stage("squeeze", folder, squeeze, run_squeeze, {"teacher": "teacher.pt"})


def chain_views(cfg: PipelineCfg, ipc: int) -> ViewConfig:
    """train.views with batch_size capped at the set's size (IPC x classes), so one `ipc = [1, 10, 50]` list runs
    IPC 1 too (relabel and train refuse batches larger than the set)."""
    views = copy.deepcopy(cfg.train.views)
    if views.batch_size > ipc:  # only then can the set be smaller than a batch
        try:
            views.batch_size = min(views.batch_size, ipc * resolve_dataset(cfg.data).num_classes)
        except ConfigError:
            pass  # class count unknown yet: the stage reports it
    return views


def images_stage(cfg: PipelineCfg, images: str, sq: Stage, teacher: ModelConfig, ipc: int, chain: Path,
                 curriculum: str | None, milestone: float | None) -> Stage:
    """The chain's image set: recovered from the teacher (`recovered`; `teacher` is its model config, loading
    sq's checkpoint) or a seeded real subset (`real`)."""
    outputs = {"manifest": "manifest.json", "grid": "grid.png"}
    if images == "real":
        sub = stage_config(cfg, "subset", chain / "subset")
        sub.ipc = ipc
        return Stage("subset", chain / "subset", sub, run_subset, outputs)
    rc = stage_config(cfg, "recover", chain / "recover")
    rc.model, rc.ipc = copy.deepcopy(teacher), ipc
    if curriculum is not None:
        rc.curriculum = curriculum
    if milestone is not None:
        rc.milestone = milestone
    return Stage("recover", chain / "recover", rc, run_recover, outputs, [sq.folder])


def plan_chain(cfg: PipelineCfg, teacher_objective: str, ipc: int, chain: Path, curriculum: str | None = None,
               milestone: float | None = None, images: str = "recovered") -> list[Stage]:
    root = chain.parent.parent
    sq = teacher_stage(cfg, teacher_objective, root)
    teacher = copy.deepcopy(cfg.squeeze.model)
    teacher.checkpoint, teacher.compile = str(sq.folder / "teacher.pt"), False
    recover = images_stage(cfg, images, sq, teacher, ipc, chain, curriculum, milestone)
    tr = stage_config(cfg, "train", chain / "train")
    tr.images, tr.labels, tr.teacher = str(recover.folder), str(chain / "relabel"), copy.deepcopy(teacher)
    tr.views = chain_views(cfg, ipc)
    stages = [sq, recover]
    if tr.soft_labels == "stored":
        rl = stage_config(cfg, "relabel", chain / "relabel")
        rl.model, rl.images = copy.deepcopy(teacher), str(recover.folder)
        rl.views, rl.epochs = copy.deepcopy(tr.views), cfg.train.optim.epochs
        stages.append(Stage("relabel", chain / "relabel", rl, run_relabel, {"labels": "labels.json"},
                            [recover.folder, sq.folder]))
    stages.append(Stage("train", chain / "train", tr, run_train, {"student": "student.pt"},
                        [recover.folder, stages[-1].folder]))
    return stages


def _sre2l(cfg: PipelineCfg, opts: dict[str, str], ipc: int, chain: Path) -> list[Stage]:
    return plan_chain(cfg, opts.get("teacher", "none"), ipc, chain, images=opts.get("images", "recovered"))


def _sre2l_label(opts: dict[str, str]) -> str:
    teacher = opts.get("teacher", "none")
    if opts.get("images") == "real":
        return "Real subset" if teacher == "none" else f"Real subset({SRE2L_LABELS.get(teacher, teacher)} teacher)"
    return SRE2L_LABELS.get(teacher, f"SRe2L({teacher})")


def _cda(cfg: PipelineCfg, opts: dict[str, str], ipc: int, chain: Path) -> list[Stage]:
    milestone = float(opts["milestone"]) if "milestone" in opts else None
    return plan_chain(cfg, opts.get("teacher", "none"), ipc, chain, opts.get("curriculum", "cosine"), milestone)


SRE2L = Method("sre2l", "SRe2L: squeeze a teacher, recover images by BatchNorm matching (images=real: a seeded "
               "real subset instead), relabel, train by KD",
               {"teacher": tuple(OBJECTIVES), "images": ("recovered", "real")},
               ("squeeze", "recover", "subset", "relabel", "train"), _sre2l_label, _sre2l, (*SECTIONS, SUBSET),
               {"guard": "teacher=guard", "pgd_at": "teacher=pgd-at", "grad_norm": "teacher=grad-norm"})
CDA = Method("cda", "CDA: SRe2L with recover's crop curriculum (default cosine; milestone from recover.milestone)",
             {"teacher": tuple(OBJECTIVES), "curriculum": tuple(c for c in CURRICULA if c != "off"),
              "milestone": None}, ("squeeze", "recover", "relabel", "train"),
             lambda o: CDA_LABELS.get(o.get("teacher", "none"), f"CDA({o.get('teacher')})"), _cda, SECTIONS)
