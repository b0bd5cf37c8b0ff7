"""Experts: train the expert trajectories (MTT's buffer) that MTT and TESLA match.

    guard-fast experts --config configs/digits/experts.toml
    torchrun --nproc_per_node N launchers/experts.py ...   |   deepspeed --num_gpus N launchers/experts.py ...
"""

from __future__ import annotations

import sys

from guard_fast.distill.experts import ExpertsConfig, run_experts
from guard_fast.runtime.config import parse_args
from guard_fast.runtime.distributed import init_distributed, teardown
from launchers.cli import run


def main(argv: list[str]) -> int:
    cfg = parse_args(ExpertsConfig, argv, "guard-fast experts")
    info = init_distributed(cfg.dist)
    try:
        run_experts(cfg, info)
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="guard-fast experts"))
