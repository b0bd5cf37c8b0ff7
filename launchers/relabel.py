"""Relabel: store the teacher's soft labels on replayable FKD views of a recovered image set.

    guard-fast relabel --config configs/digits/relabel.toml [--section.key=value ...]
    torchrun --nproc_per_node N launchers/relabel.py ...   |   deepspeed --num_gpus N launchers/relabel.py ...
"""

from __future__ import annotations

import sys

from guard_fast.distill.relabel import RelabelConfig, run_relabel
from guard_fast.runtime.config import parse_args
from guard_fast.runtime.distributed import init_distributed, teardown
from launchers.cli import run


def main(argv: list[str]) -> int:
    cfg = parse_args(RelabelConfig, argv, "guard-fast relabel")
    info = init_distributed(cfg.dist)
    try:
        run_relabel(cfg, info)
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="guard-fast relabel"))
