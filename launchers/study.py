"""Study: the paper's tables on the bundled digits over several seeds, with paired statistics; cached and resumable.

    guard-fast study --config configs/digits/study.toml [--quick] [--report_only] [--key=value ...]
    torchrun --nproc_per_node N launchers/study.py ...   (every stage distributes itself)
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder heads sys.path and `import bench` would find launchers/bench.py instead of the
# top-level bench/ package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from guard_fast.runtime.distributed import init_distributed, teardown
from guard_fast.study.config import load_study
from guard_fast.study.run import run_study
from launchers.cli import run


def main(argv: list[str]) -> int:
    from bench.study_cost import measure_cost

    cfg = load_study(argv)
    info = init_distributed(cfg.pipeline.dist)
    try:
        summary = run_study(cfg, info, cost_fn=lambda cost_cfg, folder: measure_cost(cost_cfg, info.device))
        if info.is_main:
            primary = {k: v["verdict"] for k, v in summary["primary"]["pairs"].items()} or "no verdict yet"
            print(f"wrote {summary['results_dir']}/report.md; primary: {primary}; secondary: {summary['verdicts']}; "
                  f"missing cells: {len(summary['missing'])}")
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="guard-fast study"))
