"""Evaluate: clean, PGD-100, Square, AutoAttack, CW and MIM accuracy of checkpoints, with a report.

    guard-fast evaluate --config configs/digits/evaluate.toml --checkpoints=a.pt,b.pt [--labels=GUARD,SRe2L]
    torchrun --nproc_per_node N launchers/evaluate.py ...   |   python launchers/evaluate.py ...

Writes output.dir/{evaluation.json, evaluation.md, robustness.png} (rank 0).
"""

from __future__ import annotations

import sys

from guard_fast.robustness.evaluate import EvaluateConfig, run_evaluate
from guard_fast.runtime.config import parse_args
from guard_fast.runtime.distributed import init_distributed, teardown
from launchers.cli import run


def main(argv: list[str]) -> int:
    cfg = parse_args(EvaluateConfig, argv, "guard-fast evaluate")
    info = init_distributed(cfg.dist)
    try:
        evaluation = run_evaluate(cfg, info)
        if info.is_main:
            print(f"wrote {cfg.output.dir}/evaluation.json, evaluation.md, robustness.png "
                  f"({evaluation['dataset']['images']} images, {evaluation['seconds']:.1f} s)")
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="guard-fast evaluate"))
