"""Config sections shared by several methods: the hard-label student that DC, MTT and TESLA (and the methods after
them) train on their synthetic sets."""

from __future__ import annotations

from guard_fast.methods.base import Section
from guard_fast.student.hard import HardTrainConfig

TRAIN_HARD = Section(
    "train_hard", HardTrainConfig, "the network trained on a DC / MTT / TESLA set (images, lr_from_set and labels are "
    "set per method)",
    lambda th, cfg: (f"- train-hard: {th.model.arch} width {th.model.width}, {th.optim.name} lr {th.optim.lr} "
                     f"({th.optim.schedule}; MTT/TESLA: the learned lr), wd {th.optim.weight_decay} on "
                     f"{th.optim.weight_decay_on}, {th.optim.epochs} epochs, batch {th.batch_size}, augment "
                     f"{th.augment}"))
