"""Table 4 of the study: bench/step.py's side-by-side measurement of GUARD vs adversarial training, as a function
the study runs as one of its cached stages (the library does not import bench/; launchers/study.py connects them)."""

from __future__ import annotations

from typing import Any

import torch

from bench.step import BenchConfig, run_benchmark
from bench.step_report import build_results, memory_measure
from guard_fast.runtime.config import load_config, to_dict


def measure_cost(cost_cfg: Any, device: torch.device) -> dict[str, Any]:
    """Run the bench preset `cost_cfg.config` (+ `cost_cfg.overrides`) on `device`; returns build_results' dict
    (per-row per-repetition samples_s, time ratios, peak memory) plus the resolved config."""
    cfg = load_config(BenchConfig, cost_cfg.config, list(cost_cfg.overrides))
    raw = run_benchmark(cfg, device, show_progress=False)
    results = build_results(raw, cfg.bench.batch_size, timer="cuda_events" if device.type == "cuda" else
                            "perf_counter", memory_measure=memory_measure(device.type))
    results["config"] = to_dict(cfg)
    return results
