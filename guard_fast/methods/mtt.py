"""MTT and TESLA (the paper's Table 2 comparison rows), and GUARD(MTT) / GUARD(TESLA): experts -> trajectory matching
-> a fresh ConvNet trained on the synthetic set (their papers' evaluation: SGD with DSA, MTT's learned lr; TESLA's soft
labels) -> evaluate.

Option `experts` (default none = plain CE) is the experts' training objective, any squeeze objective
(guard_fast/regularizers/objectives.py, settings from the `experts.objective` section): `mtt:experts=guard` is
GUARD(MTT), `tesla:experts=guard` GUARD(TESLA); the matching itself is unchanged. One expert buffer per objective,
root/experts (plain CE) or root/experts-<objective>, shared by both methods and every IPC.

TESLA's labels follow its public code (justincui03/tesla distill.py): hard class labels by default, which is what that
code runs on CIFAR, Tiny-ImageNet and ImageNette (its soft-label branch, --teacher_label, is used only in its
ImageNet-1K command and concatenates an empty list, an error, for every other dataset); `tesla:labels=expert` adds the
soft labels (softmax of the target expert's logits on the current images, recomputed every iteration), its ImageNet-1K
setting."""

from __future__ import annotations

import copy
from pathlib import Path

from guard_fast.distill.experts import ExpertsConfig, run_experts
from guard_fast.distill.mtt import MTTConfig, run_mtt
from guard_fast.methods.base import Method, PipelineCfg, Section, Stage, stage_config
from guard_fast.methods.students import TRAIN_HARD
from guard_fast.regularizers.objectives import OBJECTIVES, ObjectiveConfig
from guard_fast.student.hard import run_train_hard

EXPERTS = Section(
    "experts", ExpertsConfig, "MTT/TESLA's expert buffer (one per expert objective, shared by both methods and every "
    "IPC); experts.objective.name is set per method (experts=...), its other settings apply to every GUARD arm",
    lambda ex, cfg: (f"- experts: {ex.num_experts} x {ex.epochs} epochs, {ex.model.arch} width {ex.model.width}, sgd "
                     f"lr {ex.lr}, batch {ex.batch_size}, augment {ex.augment}; GUARD experts: beta "
                     f"{ex.objective.beta}, h {ex.objective.h}, strategy {ex.objective.strategy}"))
MATCHING = Section(
    "mtt", MTTConfig, "MTT/TESLA's trajectory matching (method, labels, ipc, buffer, expert_objective and the network "
    "are set per method)",
    lambda mt, cfg: (f"- mtt/tesla: {mt.iterations} iterations of {mt.syn_steps} steps (batch "
                     f"{mt.batch_syn or 'all'}), expert_epochs {mt.expert_epochs}, max_start_epoch "
                     f"{mt.max_start_epoch}, lr_img {mt.lr_img}, lr_lr {mt.lr_lr}, lr_teacher {mt.lr_teacher}, "
                     f"augment {mt.augment}"))
SECTIONS = (EXPERTS, MATCHING, TRAIN_HARD)


def experts_stage(cfg: PipelineCfg, objective: str, root: Path) -> Stage:
    """The experts of one training objective; the folder is shared by MTT and TESLA and every IPC. The plain experts
    take no setting of [experts.objective] (none uses none), so tuning the GUARD arms keeps their cached buffer."""
    folder = root / ("experts" if objective == "none" else f"experts-{objective}")
    ex = stage_config(cfg, "experts", folder)
    ex.objective = ObjectiveConfig(name="none") if objective == "none" else ex.objective
    ex.objective.name = objective
    return Stage("experts", folder, ex, run_experts, {"buffer": "buffer.json"})


def plan_matching(cfg: PipelineCfg, method: str, labels: str, ipc: int, chain: Path,
                  objective: str = "none") -> list[Stage]:
    experts = experts_stage(cfg, objective, chain.parent.parent)
    mt = stage_config(cfg, "mtt", chain / "distill")
    mt.method, mt.labels, mt.ipc, mt.buffer = method, labels, ipc, str(experts.folder)
    mt.expert_objective = objective
    mt.model = copy.deepcopy(experts.config.model)  # the student of the matching must be the experts' network
    distill = Stage("mtt", chain / "distill", mt, run_mtt, {"manifest": "manifest.json", "grid": "grid.png"},
                    [experts.folder])
    tr = stage_config(cfg, "train_hard", chain / "train-hard")
    tr.images, tr.lr_from_set, tr.labels = str(distill.folder), True, "soft" if labels == "expert" else "hard"
    train = Stage("train-hard", chain / "train-hard", tr, run_train_hard, {"student": "student.pt"}, [distill.folder])
    return [experts, distill, train]


def _mtt(cfg: PipelineCfg, opts: dict[str, str], ipc: int, chain: Path) -> list[Stage]:
    return plan_matching(cfg, "mtt", "hard", ipc, chain, opts.get("experts", "none"))


def _tesla(cfg: PipelineCfg, opts: dict[str, str], ipc: int, chain: Path) -> list[Stage]:
    return plan_matching(cfg, "tesla", opts.get("labels", "hard"), ipc, chain, opts.get("experts", "none"))


def label(name: str, opts: dict[str, str]) -> str:
    """MTT, GUARD(MTT), TESLA(soft labels), GUARD(TESLA(soft labels)), MTT(pgd-at experts), ..."""
    inner = [*(["soft labels"] if opts.get("labels", "hard") == "expert" else []),
             *([f"{opts['experts']} experts"] if opts.get("experts", "none") not in ("none", "guard") else [])]
    text = f"{name}({', '.join(inner)})" if inner else name
    return f"GUARD({text})" if opts.get("experts") == "guard" else text


KINDS = ("experts", "mtt", "train-hard")
EXPERT_OBJECTIVES = tuple(OBJECTIVES)
MTT = Method("mtt", "MTT: match expert trajectories by unrolled SGD on the synthetic set; student with the learned lr "
             "(experts=guard: GUARD(MTT), experts trained with the GUARD objective)",
             {"experts": EXPERT_OBJECTIVES}, KINDS, lambda o: label("MTT", o), _mtt, SECTIONS)
TESLA = Method("tesla", "TESLA: MTT's objective with constant memory in syn_steps; labels=expert adds its soft "
               "labels from an expert (its ImageNet-1K setting); experts=guard: GUARD(TESLA)",
               {"labels": ("hard", "expert"), "experts": EXPERT_OBJECTIVES}, KINDS, lambda o: label("TESLA", o),
               _tesla, SECTIONS)
