"""Recover: synthesize a distilled image set from a teacher by BatchNorm-statistics matching.

    guard-fast recover --config configs/digits/recover.toml --model.checkpoint=runs/squeeze/teacher.pt
    torchrun --nproc_per_node N launchers/recover.py ...   |   deepspeed --num_gpus N launchers/recover.py ...
"""

from __future__ import annotations

import sys

from guard_fast.distill.recover import RecoverConfig, run_recover
from guard_fast.runtime.config import parse_args
from guard_fast.runtime.distributed import init_distributed, teardown
from launchers.cli import run


def main(argv: list[str]) -> int:
    cfg = parse_args(RecoverConfig, argv, "guard-fast recover")
    info = init_distributed(cfg.dist)
    try:
        run_recover(cfg, info)
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="guard-fast recover"))
