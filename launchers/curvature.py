"""Curvature: input-Hessian eigenvalues, GUARD's finite-difference curvature, gradient norms and gradient/eigenvector
cosines at real val images, per checkpoint (paper Fig. 2).

    guard-fast curvature --config configs/digits/curvature.toml --checkpoints=a.pt,b.pt [--labels=GUARD,SRe2L]
    torchrun --nproc_per_node N launchers/curvature.py ...   |   python launchers/curvature.py ...

Writes output.dir/{curvature.json, curvature.md, curvature.png} (rank 0).
"""

from __future__ import annotations

import sys

from guard_fast.robustness.curvature import CurvatureConfig, run_curvature
from guard_fast.runtime.config import parse_args
from guard_fast.runtime.distributed import init_distributed, teardown
from launchers.cli import run


def main(argv: list[str]) -> int:
    cfg = parse_args(CurvatureConfig, argv, "guard-fast curvature")
    info = init_distributed(cfg.dist)
    try:
        result = run_curvature(cfg, info)
        if info.is_main:
            print(f"wrote {cfg.output.dir}/curvature.json, curvature.md, curvature.png "
                  f"({result['dataset']['images']} images, {result['seconds']:.1f} s)")
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="guard-fast curvature"))
