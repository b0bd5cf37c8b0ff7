"""Squeeze: train a GUARD (or baseline) teacher.

    deepspeed --num_gpus N launchers/squeeze.py --config configs/squeeze-digits.toml [--section.key=value ...]
    torchrun --nproc_per_node N launchers/squeeze.py ...   |   python launchers/squeeze.py ...   |   guard-fast squeeze ...
"""

from __future__ import annotations

import sys

from guard_fast.cli import run
from guard_fast.config import parse_args
from guard_fast.distributed import init_distributed, teardown
from guard_fast.squeeze import SqueezeConfig, run_squeeze


def main(argv: list[str]) -> int:
    cfg = parse_args(SqueezeConfig, argv, "guard-fast squeeze")
    info = init_distributed(cfg.dist)
    try:
        run_squeeze(cfg, info)
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="guard-fast squeeze"))
