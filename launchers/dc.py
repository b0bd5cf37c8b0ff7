"""DC: condense the train split by gradient matching (guard=true: GUARD(DC), paper Algorithm 1).

    guard-fast dc --config configs/digits/dc.toml [--section.key=value ...]
    torchrun --nproc_per_node N launchers/dc.py ...   |   deepspeed --num_gpus N launchers/dc.py ...
"""

from __future__ import annotations

import sys

from guard_fast.distill.dc import DCConfig, run_dc
from guard_fast.runtime.config import parse_args
from guard_fast.runtime.distributed import init_distributed, teardown
from launchers.cli import run


def main(argv: list[str]) -> int:
    cfg = parse_args(DCConfig, argv, "guard-fast dc")
    info = init_distributed(cfg.dist)
    try:
        run_dc(cfg, info)
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="guard-fast dc"))
