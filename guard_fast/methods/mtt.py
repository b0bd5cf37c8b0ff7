"""MTT and TESLA (the paper's Table 2 comparison rows): experts -> trajectory matching -> a fresh ConvNet trained on
the synthetic set (their papers' evaluation: SGD with DSA, MTT's learned lr; TESLA's soft labels) -> evaluate.

The expert buffer's folder (root/experts) is shared by both methods and every IPC. TESLA's labels follow its public
code (justincui03/tesla distill.py): hard class labels by default, which is what that code runs on CIFAR, Tiny-ImageNet
and ImageNette (its soft-label branch, --teacher_label, is used only in its ImageNet-1K command and concatenates an
empty list, an error, for every other dataset); `tesla:labels=expert` adds the soft labels (softmax of the target
expert's logits on the current images, recomputed every iteration), its ImageNet-1K setting."""

from __future__ import annotations

import copy
from pathlib import Path

from guard_fast.distill.experts import ExpertsConfig, run_experts
from guard_fast.distill.mtt import MTTConfig, run_mtt
from guard_fast.methods.base import Method, PipelineCfg, Section, Stage, stage_config
from guard_fast.methods.students import TRAIN_HARD
from guard_fast.student.hard import run_train_hard

EXPERTS = Section(
    "experts", ExpertsConfig, "MTT/TESLA's expert buffer (shared by both methods and every IPC)",
    lambda ex, cfg: (f"- experts: {ex.num_experts} x {ex.epochs} epochs, {ex.model.arch} width {ex.model.width}, sgd "
                     f"lr {ex.lr}, batch {ex.batch_size}, augment {ex.augment}"))
MATCHING = Section(
    "mtt", MTTConfig, "MTT/TESLA's trajectory matching (method, labels, ipc, buffer and the network are set per "
    "method)",
    lambda mt, cfg: (f"- mtt/tesla: {mt.iterations} iterations of {mt.syn_steps} steps (batch "
                     f"{mt.batch_syn or 'all'}), expert_epochs {mt.expert_epochs}, max_start_epoch "
                     f"{mt.max_start_epoch}, lr_img {mt.lr_img}, lr_lr {mt.lr_lr}, lr_teacher {mt.lr_teacher}, "
                     f"augment {mt.augment}"))
SECTIONS = (EXPERTS, MATCHING, TRAIN_HARD)


def plan_matching(cfg: PipelineCfg, method: str, labels: str, ipc: int, chain: Path) -> list[Stage]:
    root = chain.parent.parent
    ex = stage_config(cfg, "experts", root / "experts")
    experts = Stage("experts", root / "experts", ex, run_experts, {"buffer": "buffer.json"})
    mt = stage_config(cfg, "mtt", chain / "distill")
    mt.method, mt.labels, mt.ipc, mt.buffer = method, labels, ipc, str(experts.folder)
    mt.model = copy.deepcopy(ex.model)  # the student of the matching must be the experts' network
    distill = Stage("mtt", chain / "distill", mt, run_mtt, {"manifest": "manifest.json", "grid": "grid.png"},
                    [experts.folder])
    tr = stage_config(cfg, "train_hard", chain / "train-hard")
    tr.images, tr.lr_from_set, tr.labels = str(distill.folder), True, "soft" if labels == "expert" else "hard"
    train = Stage("train-hard", chain / "train-hard", tr, run_train_hard, {"student": "student.pt"}, [distill.folder])
    return [experts, distill, train]


def _mtt(cfg: PipelineCfg, opts: dict[str, str], ipc: int, chain: Path) -> list[Stage]:
    return plan_matching(cfg, "mtt", "hard", ipc, chain)


def _tesla(cfg: PipelineCfg, opts: dict[str, str], ipc: int, chain: Path) -> list[Stage]:
    return plan_matching(cfg, "tesla", opts.get("labels", "hard"), ipc, chain)


KINDS = ("experts", "mtt", "train-hard")
MTT = Method("mtt", "MTT: match expert trajectories by unrolled SGD on the synthetic set; student with the learned lr",
             {}, KINDS, lambda o: "MTT", _mtt, SECTIONS)
TESLA = Method("tesla", "TESLA: MTT's objective with constant memory in syn_steps; labels=expert adds its soft "
               "labels from an expert (its ImageNet-1K setting)", {"labels": ("hard", "expert")}, KINDS,
               lambda o: "TESLA" if o.get("labels", "hard") == "hard" else "TESLA(soft labels)", _tesla, SECTIONS)
