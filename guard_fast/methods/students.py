"""Config sections shared by several methods: the hard-label student that DC, MTT and TESLA (and the methods after
them) train on their synthetic sets, and the DSA-augmented student of DSA and DM."""

from __future__ import annotations

from dataclasses import dataclass, field

from guard_fast.methods.base import Section
from guard_fast.runtime.engine import OptimConfig
from guard_fast.student.hard import HardTrainConfig


def _summary(name: str):
    return lambda th, cfg: (f"- {name}: {th.model.arch} width {th.model.width}, {th.optim.name} lr {th.optim.lr} "
                            f"({th.optim.schedule}; MTT/TESLA: the learned lr), wd {th.optim.weight_decay} on "
                            f"{th.optim.weight_decay_on}, {th.optim.epochs} epochs, batch {th.batch_size}, augment "
                            f"{th.augment}" + (f" in {th.dsa_space} space" if th.augment == "dsa" else ""))


TRAIN_HARD = Section(
    "train_hard", HardTrainConfig, "the network trained on a DC / MTT / TESLA set (images, lr_from_set and labels are "
    "set per method)", _summary("train-hard"))


def _dsa_optim() -> OptimConfig:
    return OptimConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, epochs=1000, schedule="step",
                       weight_decay_on="all")


@dataclass
class DSATrainConfig(HardTrainConfig):
    """evaluate_synset with DSA (VICO utils.py:337-361 with args.dsa): DC's student, every batch augmented with one
    DSA draw per image, 1000 epochs (main.py:111-112, main_DM.py:21)."""

    optim: OptimConfig = field(default_factory=_dsa_optim)
    """DC's schedule (SGD momentum 0.9, wd 5e-4 on all, lr 0.01 x 0.1 after epoch epochs//2 + 1), 1000 epochs (the
    authors' loop runs Epoch + 1 = 1001: the cifar10 presets set 1001)"""
    augment: str = "dsa"
    """dsa (the authors' evaluation of DSA and DM sets) or none"""


TRAIN_DSA = Section(
    "train_dsa", DSATrainConfig, "the network trained on a DSA / DM set: DC's student with DSA on every batch "
    "(images is set per method)", _summary("train-dsa"))
