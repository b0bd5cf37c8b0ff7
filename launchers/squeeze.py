"""Squeeze: train a GUARD (or baseline) teacher.

    deepspeed --num_gpus N launchers/squeeze.py --config configs/digits/squeeze.toml [--section.key=value ...]
    torchrun --nproc_per_node N launchers/squeeze.py ...  |  python launchers/squeeze.py ...  |  guard-fast squeeze ...
"""

from __future__ import annotations

import sys

from guard_fast.runtime.config import parse_args
from guard_fast.runtime.distributed import init_distributed, teardown
from guard_fast.squeeze.stage import SqueezeConfig, run_squeeze
from launchers.cli import run


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
