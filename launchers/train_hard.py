"""Train-hard: a fresh network on a distilled set with its hard labels (DC / MTT evaluation protocol).

    guard-fast train-hard --config configs/digits/pipeline-dc.toml [--section.key=value ...]
    torchrun --nproc_per_node N launchers/train_hard.py ...   |   deepspeed --num_gpus N launchers/train_hard.py ...
"""

from __future__ import annotations

import sys

from guard_fast.runtime.config import parse_args
from guard_fast.runtime.distributed import init_distributed, teardown
from guard_fast.student.hard import HardTrainConfig, run_train_hard
from launchers.cli import run


def main(argv: list[str]) -> int:
    cfg = parse_args(HardTrainConfig, argv, "guard-fast train-hard")
    info = init_distributed(cfg.dist)
    try:
        run_train_hard(cfg, info)
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="guard-fast train-hard"))
