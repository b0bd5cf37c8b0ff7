"""GUARD teachers on the bundled digits with objective.bn_stats = updated (the authors') and snapshot, side by side.

    python -m bench.bn_stats_digits [--epochs 5] [--width 8] [--data data/digits] [--runs runs/bn-stats-digits]

Runs one squeeze per value (configs/digits/squeeze.toml, same seed and budget, validation only at the end with the
squeeze's quick PGD at 1/255 and 4/255: `--robust_eval_eps=1/255,4/255`, 10 steps of eps/4 from a random start, whole
val split); a run folder that already holds result.json is reused. Writes results/bn-stats-digits.{json,md} with the
exact commands.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from bench.common import write_results
from guard_fast.data.digits import prepare_digits

REPO = Path(__file__).resolve().parent.parent
MODES = ("updated", "snapshot")


def squeeze_args(args: argparse.Namespace, bn_stats: str) -> list[str]:
    return ["--config", "configs/digits/squeeze.toml", f"--model.width={args.width}", f"--optim.epochs={args.epochs}",
            f"--objective.bn_stats={bn_stats}", "--robust_eval_eps=1/255,4/255", "--val_every=0", "--data.workers=0",
            "--output.progress=false", f"--data.path={args.data}", f"--output.dir={Path(args.runs) / bn_stats}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bn_stats_digits")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--data", default="data/digits")
    p.add_argument("--runs", default="runs/bn-stats-digits")
    p.add_argument("--out", default=str(REPO / "results"))
    args = p.parse_args(argv)
    prepare_digits(args.data)
    rows, results, commands = [], {}, []
    for bn in MODES:
        cmd = squeeze_args(args, bn)
        commands.append("guard-fast squeeze " + shlex.join(cmd))
        out = Path(args.runs) / bn
        if not (out / "result.json").exists():
            subprocess.run([sys.executable, str(REPO / "launchers/squeeze.py"), *cmd], check=True, cwd=REPO)
        val = json.loads((out / "result.json").read_text())["val"]
        results[bn] = val
        rows.append([bn, *[round(100 * val[k], 2) for k in ("clean", "pgd@0.00392157", "pgd@0.0156863")]])
    header = ["objective.bn_stats", "clean %", "PGD-10 1/255 %", "PGD-10 4/255 %"]
    notes = "\n".join([
        "GUARD teachers (guard, beta 1e-4, strategy reuse) on the digits (1438 train / 359 val, 32 px), "
        f"resnet18-cifar width {args.width}, {args.epochs} epochs SGD, identical seed and budget; the squeeze's "
        "final validation: PGD-10 with step eps/4 and a random start on the whole val split. `updated` = the "
        "authors' semantics (the regularizer's eval forwards see this step's BatchNorm statistics), `snapshot` = "
        "statistics from before the step.", "", "Commands:", "", *[f"    {c}" for c in commands]])
    paths = write_results("bn-stats-digits", vars(args) | {"out": "results"}, results, header, rows,
                          out_dir=args.out, notes=notes)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
