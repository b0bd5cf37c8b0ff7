"""MTT / TESLA: distill a synthetic set by matching the expert buffer's trajectories.

    guard-fast mtt --config configs/digits/mtt.toml [--method=tesla --labels=expert]
    torchrun --nproc_per_node N launchers/mtt.py ...   |   deepspeed --num_gpus N launchers/mtt.py ...
"""

from __future__ import annotations

import sys

from guard_fast.distill.mtt import MTTConfig, run_mtt
from guard_fast.runtime.config import parse_args
from guard_fast.runtime.distributed import init_distributed, teardown
from launchers.cli import run


def main(argv: list[str]) -> int:
    cfg = parse_args(MTTConfig, argv, "guard-fast mtt")
    info = init_distributed(cfg.dist)
    try:
        run_mtt(cfg, info)
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="guard-fast mtt"))
