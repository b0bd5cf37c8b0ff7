"""Estimated GPU-hours per stage of a paper-scale run (ImageNet-1K, IPC 50), from measured CPU ratios and one anchor.

An estimate, not a measurement. Method: the work of each stage in images (counts below) divided by its images/s gives
its time in CPU units (bench/results/stages.json, 224 px path, the fastest measured variant of each stage); the one
published GPU figure, the CDA authors' 29 h of recover for ImageNet-1K IPC 50 on one RTX 4090 (as quoted in issue
19), converts those units to hours. Assumptions: (1) the anchor ran `--anchor-iterations` recover iterations per image
(not verified here; SRe2L's ImageNet-1K budget is 1000, the GUARD paper uses 2000); (2) the stages' GPU speeds stand
in the same ratio as their CPU speeds (all are ResNet-18 passes at 224 px, so their ratios follow their pass counts;
GPUs run large batches more efficiently, which favours relabel and train); (3) a squeeze step costs a student step
(same network, forward + backward + optimizer step) times the GUARD/plain step ratio from
bench/results/bench-guard-cpu-*.json (reuse strategy, eager).

    python -m bench.stage_estimate [--stages bench/results/stages.json] [--anchor-hours 29] [--anchor-iterations 1000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import RESULTS, markdown_table
from guard_fast.runtime.io import atomic_text

IMAGENET_TRAIN = 1_281_167
CLASSES, IPC = 1000, 50


def best_rates(stages: dict, shape: str = "imagenet 224 px") -> dict[str, tuple[float, str]]:
    """stage -> (fastest median images/s, its variant) on `shape`."""
    best: dict[str, tuple[float, str]] = {}
    for key, s in stages["results"]["stats"].items():
        sh, stage, variant = key.split(" | ")
        if sh == shape and s["median"] > best.get(stage, (0.0, ""))[0]:
            best[stage] = (s["median"], variant)
    return best


def guard_over_plain(path: Path) -> float:
    rows = json.loads(path.read_text())["results"]["rows"]
    row = next(r for r in rows if r["label"] == "guard[reuse]")
    return float(row["time_ratio"]["median"] if isinstance(row["time_ratio"], dict) else row["time_ratio"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stage_estimate", description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default=str(RESULTS / "stages.json"))
    p.add_argument("--guard-bench", default=str(RESULTS / "bench-guard-cpu-resnet18-cifar-32px-b64-fp32.json"))
    p.add_argument("--anchor-hours", type=float, default=29.0, help="published recover hours (one RTX 4090)")
    p.add_argument("--anchor-iterations", type=int, default=1000, help="recover iterations behind the anchor")
    p.add_argument("--iterations", type=int, default=2000, help="recover iterations of the run estimated (paper)")
    p.add_argument("--epochs", type=int, default=300, help="relabel/student epochs (docs/spec.md section 4)")
    p.add_argument("--squeeze-epochs", type=int, default=50, help="teacher epochs (docs/spec.md section 2 presets)")
    args = p.parse_args(argv)

    rates = best_rates(json.loads(Path(args.stages).read_text()))
    guard_x = guard_over_plain(Path(args.guard_bench))
    n = CLASSES * IPC
    # stage -> (images of work, images/s in CPU units, how the rate was obtained)
    work = {
        "squeeze (GUARD teacher)": (args.squeeze_epochs * IMAGENET_TRAIN, rates["train"][0] / guard_x,
                                    f"student step rate ({rates['train'][1]}) / {guard_x:.2f} (GUARD reuse x plain)"),
        "recover": (n * args.iterations, rates["recover"][0], f"measured ({rates['recover'][1]})"),
        "relabel": (n * args.epochs, rates["relabel"][0], f"measured ({rates['relabel'][1]})"),
        "train (student)": (n * args.epochs, rates["train"][0], f"measured ({rates['train'][1]})"),
    }
    hours_per_cpu_s = args.anchor_hours / (n * args.anchor_iterations / rates["recover"][0])
    rows, total = [], 0.0
    for stage, (images, rate, how) in work.items():
        h = images / rate * hours_per_cpu_s
        total += h
        rows.append([stage, f"{images:,}", how, f"{h:.0f}"])
    rows.append(["total", "", "", f"{total:.0f}"])
    md = ["# Estimated RTX-4090-hours per stage, ImageNet-1K IPC 50 (an estimate from CPU ratios, not a measurement)",
          "", markdown_table(["stage", "images of work", "rate used", "est. GPU-hours"], rows), "",
          f"Anchor: recover = {args.anchor_hours:g} h at {args.anchor_iterations} iterations x {n:,} images (CDA "
          f"authors, one RTX 4090). Estimated run: {args.iterations} recover iterations, {args.epochs} relabel/"
          f"student epochs, {args.squeeze_epochs} squeeze epochs over {IMAGENET_TRAIN:,} images. Rates: "
          f"{Path(args.stages).name} (224 px path). See the module docstring for the assumptions.", ""]
    out = atomic_text(RESULTS / "stage-estimate.md", "\n".join(md))
    print("\n".join(md))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
