"""DM: condense the train split by distribution matching through fresh ConvNets (Zhao & Bilen, WACV 2023).

    guard-fast dm --config configs/digits/dm.toml [--section.key=value ...]
    torchrun --nproc_per_node N launchers/dm.py ...   |   deepspeed --num_gpus N launchers/dm.py ...
"""

from __future__ import annotations

import sys

from guard_fast.distill.dm import DMConfig, run_dm
from guard_fast.runtime.config import parse_args
from guard_fast.runtime.distributed import init_distributed, teardown
from launchers.cli import run


def main(argv: list[str]) -> int:
    cfg = parse_args(DMConfig, argv, "guard-fast dm")
    info = init_distributed(cfg.dist)
    try:
        run_dm(cfg, info)
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="guard-fast dm"))
