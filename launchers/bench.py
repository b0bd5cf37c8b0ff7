"""guard-fast bench: time per training iteration and peak memory of every squeeze objective, side by side.

One process: `guard-fast bench --config configs/bench/cpu.toml`. N ranks (DeepSpeed engine, gloo on CPU):
`deepspeed --num_gpus N launchers/bench.py --config ...` (or torchrun); rank 0 writes per-rank and aggregate images/s.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Run as a script, this file's folder heads sys.path and `import bench` would find this file instead of the top-level
# bench/ package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from guard_fast.runtime.config import parse_args
from guard_fast.runtime.distributed import all_gather_objects, init_distributed, teardown
from launchers.cli import run


def _load() -> tuple[float, ...]:
    """1/5/15-minute load average of the host (the CPU is often shared), empty where the OS has none."""
    return tuple(round(v, 2) for v in os.getloadavg()) if hasattr(os, "getloadavg") else ()


def main(argv: list[str]) -> int:
    from bench.step import BenchConfig, run_benchmark
    from bench.step_report import write_bench_results

    cfg = parse_args(BenchConfig, argv, prog="guard-fast bench", needs_args=False)  # synthetic inputs
    info = init_distributed(cfg.dist)
    try:
        engine_factory = None
        if info.world > 1:
            from guard_fast.runtime.engine import OptimConfig, build_engine

            def engine_factory(model, optimizer):
                return build_engine(model, optimizer, None, cfg.dist, OptimConfig(), cfg.bench.batch_size,
                                    info.device)

        load_before = _load()
        raw = run_benchmark(cfg, info.device, engine_factory, show_progress=info.is_main)
        per_rank = all_gather_objects({"rank": info.rank, "samples": raw["samples"]}) if info.world > 1 else None
        if info.is_main:
            conditions = {"load average (1/5/15 min) before": load_before, "after": _load(),
                          "cpu count": os.cpu_count()}
            for path in write_bench_results(cfg, raw, info.device, per_rank, conditions):
                print(f"wrote {path}")
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="guard-fast bench"))
