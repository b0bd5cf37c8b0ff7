"""The benchmark harness (bench/step.py, bench/step_report.py, launchers/bench.py) on a tiny model. No timing
thresholds: the tests check that every method is measured, that the reported ratios follow from the raw samples, the
memory measure on known allocations, and the output format."""

from __future__ import annotations

import json
import math
import statistics
import subprocess

import pytest
import torch

from bench.step import BenchConfig, _profiled_peak_bytes, expand_methods, run_benchmark
from bench.step_report import HEADER, build_results, check_goals, write_bench_results
from guard_fast.regularizers.objectives import GUARD_STRATEGIES, OBJECTIVES
from guard_fast.runtime.config import load_config
from guard_fast.runtime.errors import ConfigError

TINY = ["--model.width=8", "--bench.image_size=16", "--bench.batch_size=4", "--bench.warmup=1", "--bench.reps=2",
        "--dist.device=cpu"]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Every objective (every guard strategy, PGD with K = 1 and 2) measured once on a width-8 ResNet-18."""
    out = tmp_path_factory.mktemp("bench")
    cfg = load_config(BenchConfig, overrides=TINY + ["--bench.pgd_steps=[1, 2]", f"--bench.out_dir={out}"])
    raw = run_benchmark(cfg, torch.device("cpu"), show_progress=False)
    return cfg, raw


def test_every_method_is_measured(measured):
    cfg, raw = measured
    rows = raw["rows"]
    assert not raw["errors"], raw["errors"]
    assert {m.objective for m in rows} == set(OBJECTIVES)
    assert {m.label for m in rows if m.objective == "guard"} == {f"guard[{s},updated]" for s in GUARD_STRATEGIES}
    assert {"pgd-at[K=1]", "pgd-at[K=2]"} <= {m.label for m in rows}
    for m in rows:
        samples = raw["samples"][m.label]
        assert len(samples) == cfg.bench.reps and all(math.isfinite(t) and t > 0 for t in samples), m.label
        mem = raw["memory"][m.label]
        assert math.isfinite(mem["peak_mib"]) and mem["peak_mib"] >= mem["static_mib"] > 0, m.label
        assert mem["step_mib"] > 0, m.label  # every step allocates activations


def test_ratios_follow_from_raw_samples(measured):
    cfg, raw = measured
    results = build_results(raw, cfg.bench.batch_size)
    plain = raw["samples"]["none"]
    for row in results["rows"]:
        s = raw["samples"][row["label"]]
        assert row["time_s"]["median"] == pytest.approx(statistics.median(s))
        paired = [a / b for a, b in zip(s, plain, strict=True)]
        assert row["time_ratio"]["median"] == pytest.approx(statistics.median(paired))
        assert row["images_per_s"]["median"] == pytest.approx(statistics.median([4 / t for t in s]))
        expected_mem = raw["memory"][row["label"]]["peak_mib"] / raw["memory"]["none"]["peak_mib"]
        assert row["memory_ratio"] == pytest.approx(expected_mem)
    none_row = next(r for r in results["rows"] if r["label"] == "none")
    assert none_row["time_ratio"]["median"] == 1.0 and none_row["memory_ratio"] == 1.0
    # a goal is the paired ratio of the two rows it names
    by_label = {r["label"]: r for r in results["rows"]}
    for goal in results["goals"]:
        num, den = by_label[goal["numerator"]], by_label[goal["denominator"]]
        if "mem" not in goal["goal"]:
            ratios = [a / b for a, b in zip(num["samples_s"], den["samples_s"], strict=True)]
            assert goal["value"] == pytest.approx(statistics.median(ratios))


def test_results_files_schema_and_markdown(measured, tmp_path):
    cfg, raw = measured
    cfg.bench.out_dir = str(tmp_path)
    paths = write_bench_results(cfg, raw, torch.device("cpu"), conditions={"load": (0.0,)})
    assert [p.suffix for p in paths] == [".json", ".md", ".png"]
    payload = json.loads(paths[0].read_text())
    assert set(payload) == {"benchmark", "config", "environment", "results"}
    res = payload["results"]
    assert set(res) == {"timer", "memory_measure", "batch_size_per_rank", "world", "rows", "skipped", "goals",
                        "conditions"}
    for row in res["rows"]:
        assert set(row) == {"label", "objective", "variant", "strategy", "bn_stats", "error", "samples_s", "time_s",
                            "images_per_s", "time_ratio", "memory_mib", "memory_ratio"}
        assert set(row["time_s"]) == {"median", "p20", "p80", "n"}
        assert set(row["memory_mib"]) == {"peak_mib", "static_mib", "step_mib"}
    for goal in res["goals"]:
        assert set(goal) == {"goal", "variant", "bn_stats", "description", "numerator", "denominator", "value",
                             "target", "met"}
    assert payload["config"]["bench"]["reps"] == 2
    md = paths[1].read_text()
    assert "| " + " | ".join(HEADER) + " |" in md
    for m in raw["rows"]:
        assert f"| {m.label} |" in md
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cpu_memory_measure_on_known_allocations():
    """Peak of live bytes: two 1 MiB buffers alive together count twice, one freed before the next counts once."""
    mib = 2**20

    def together():
        a = torch.ones(mib, dtype=torch.uint8)
        b = torch.ones(mib, dtype=torch.uint8)
        return a, b

    def sequential():
        for _ in range(3):
            torch.ones(mib, dtype=torch.uint8)

    assert _profiled_peak_bytes(together) == pytest.approx(2 * mib, rel=0.01)
    assert _profiled_peak_bytes(sequential) == pytest.approx(mib, rel=0.01)


def test_expand_methods_variants_and_labels():
    cfg = load_config(BenchConfig, overrides=TINY + ["--bench.variants=[\"eager\", \"compiled\"]",
                                                     "--bench.warmup=2", "--bench.pgd_steps=[3, 10]",
                                                     "--bench.objectives=[\"pgd-at\", \"grad-norm\"]"])
    rows, skipped = expand_methods(cfg)
    assert [m.label for m in rows] == ["none", "pgd-at[K=3]", "pgd-at[K=10]", "grad-norm[updated]", "none+compile",
                                       "pgd-at[K=3]+compile", "pgd-at[K=10]+compile"]
    assert skipped == ["grad-norm+compile: needs double backward, which torch.compile cannot compile"]
    cfg = load_config(BenchConfig, overrides=TINY + ["--bench.bn_stats=[\"updated\", \"snapshot\"]",
                                                     "--bench.objectives=[\"guard\"]",
                                                     "--bench.guard_strategies=[\"reuse\"]"])
    rows, _ = expand_methods(cfg)
    assert [(m.label, m.cfg.bn_stats, m.cfg.strategy) for m in rows[1:]] == [
        ("guard[reuse,updated]", "updated", "reuse"), ("guard[reuse,snapshot]", "snapshot", "reuse")]


def test_goals_per_bn_stats_and_best_variant():
    """Goals are computed per guard bn_stats value and per variant; the 'best' group compares each side at its
    fastest variant (here compiled plain and eager guard), paired by repetition."""
    def row(label, objective, variant, samples, strategy=None, bn=None):
        return {"label": label, "objective": objective, "variant": variant, "strategy": strategy, "bn_stats": bn,
                "samples_s": samples, "time_s": {"median": statistics.median(samples)},
                "memory_mib": {"peak_mib": 100.0}}

    rows = [row("none", "none", "eager", [1.0, 1.0, 1.0]), row("none+compile", "none", "compiled", [0.5, 0.5, 0.5])]
    for bn, k in (("updated", 1.0), ("snapshot", 2.0)):
        rows += [row(f"guard[reference,{bn}]", "guard", "eager", [4.0 * k] * 3, "reference", bn),
                 row(f"guard[reuse,{bn}]", "guard", "eager", [3.0 * k] * 3, "reuse", bn),
                 row(f"guard[reuse,{bn}]+compile", "guard", "compiled", [3.5 * k] * 3, "reuse", bn)]
    goals = {(g["goal"], g["variant"], g["bn_stats"]): g for g in check_goals(rows)}
    best = goals[("guard-over-plain", "best", "updated")]
    assert (best["numerator"], best["denominator"], best["value"]) == ("guard[reuse,updated]", "none+compile", 6.0)
    assert goals[("guard-over-plain", "eager", "snapshot")]["value"] == 6.0
    assert goals[("reference-over-best", "best", "snapshot")]["value"] == pytest.approx(4 / 3)
    assert goals[("guard-over-plain", "compiled", "updated")]["value"] == 7.0


def test_process_timer_counts_cpu_not_sleep():
    """bench.cpu_timer = process: a sleeping step costs ~0 CPU seconds, a busy one about its wall time."""
    import time

    from bench.step import time_step

    assert time_step(lambda: time.sleep(0.2), torch.device("cpu"), "process") < 0.05
    assert time_step(lambda: time.sleep(0.2), torch.device("cpu"), "wall") >= 0.2


@pytest.mark.parametrize("override,match", [
    ("--bench.cpu_timer=\"user\"", "cpu_timer"),
    ("--bench.objectives=[\"none\", \"adv\"]", "bench.objectives"),
    ("--bench.variants=[\"jit\"]", "bench.variants"),
    ("--bench.variants=[\"compiled\"]", "warmup"),
    ("--model.compile", "bench.variants"),
    ("--bench.reps=0", "reps"),
])
def test_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(BenchConfig, overrides=TINY + [override])


@pytest.mark.multirank
@pytest.mark.subprocess
@pytest.mark.slow
def test_two_rank_mode_reports_per_rank_and_aggregate(tmp_path):
    """Two CPU ranks (gloo, DeepSpeed engine): rank 0 writes per-rank images/s and their sum."""
    from tests.conftest import PYTHON, REPO, subprocess_env

    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "launchers" / "bench.py"),
           *TINY, "--bench.objectives=[\"none\", \"fgsm-rs\"]", f"--bench.out_dir={tmp_path}", "--bench.name=dist",
           "--bench.plot=false"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "dist.json").read_text())["results"]
    assert res["world"] == 2
    for row in res["rows"]:
        assert [r["rank"] for r in row["per_rank"]] == [0, 1]
        assert row["aggregate_images_per_s"] == pytest.approx(sum(r["images_per_s"] for r in row["per_rank"]))
