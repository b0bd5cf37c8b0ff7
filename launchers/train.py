"""Train: a fresh student on the distilled set with soft labels (stored or online).

    guard-fast train --config configs/digits/train.toml [--section.key=value ...]
    torchrun --nproc_per_node N launchers/train.py ...   |   deepspeed --num_gpus N launchers/train.py ...
"""

from __future__ import annotations

import sys

from guard_fast.runtime.config import parse_args
from guard_fast.runtime.distributed import init_distributed, teardown
from guard_fast.student.kd import TrainConfig, run_train
from launchers.cli import run


def main(argv: list[str]) -> int:
    cfg = parse_args(TrainConfig, argv, "guard-fast train")
    info = init_distributed(cfg.dist)
    try:
        run_train(cfg, info)
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="guard-fast train"))
