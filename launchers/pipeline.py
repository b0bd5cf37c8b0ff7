"""Pipeline: squeeze -> recover -> relabel -> train -> evaluate for every method and IPC, cached and resumable.

    guard-fast pipeline --config configs/digits/demo.toml [--force=recover,train] [--section.key=value ...]
    torchrun --nproc_per_node N launchers/pipeline.py ...   |   deepspeed --num_gpus N launchers/pipeline.py ...
"""

from __future__ import annotations

import sys

from guard_fast.pipeline import PipelineConfig, run_pipeline
from guard_fast.runtime.config import parse_args
from guard_fast.runtime.distributed import init_distributed, teardown
from launchers.cli import run


def main(argv: list[str]) -> int:
    cfg = parse_args(PipelineConfig, argv, "guard-fast pipeline")
    info = init_distributed(cfg.dist)
    try:
        run_pipeline(cfg, info)
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="guard-fast pipeline"))
