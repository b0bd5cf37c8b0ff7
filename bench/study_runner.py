"""Throughput of the study runner: the same small set of stages, sequential vs parallel workers.

Sequential is the runner before issue 30 (`--workers=1`: every pipeline call in the study's own process, which uses
the machine's cores as torch threads); parallel is `--workers=W` worker processes of one thread each. Each
repetition runs both modes from an empty cache, in alternating order, as separate `launchers/study.py` processes on
the same tiny digits study (GUARD vs SRe2L at IPC 1, one selection candidate, `--seeds` seeds: 5 stages per
pipeline call); stages/hour = stages that ran / wall time of the whole study command (start-up, selection split,
report included). The study's own results must agree between the modes (checked here too).

    python -m bench.study_runner [--reps 2] [--workers 2] [--seeds 3] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, summarize, write_results

REPO = Path(__file__).resolve().parent.parent


def tiny_study(data: Path, runs: Path, results: Path, seeds: int) -> list[str]:
    """The study's arguments: every stage small enough that start-up and scheduling costs show."""
    p = "--pipeline."
    return [f"{p}data.path={data}", f"{p}data.image_size=16", f"{p}data.batch_size=32", f"{p}data.workers=0",
            f"{p}data.eval_batch_size=50", f"{p}output.progress=false", f"{p}squeeze.model.width=4",
            f"{p}squeeze.optim.epochs=1", f"{p}recover.iterations=10", f"{p}recover.batch_size=20",
            f"{p}train.model.width=4", f"{p}train.optim.epochs=4", f"{p}train.views.batch_size=10",
            f"{p}evaluate.attack.names=[\"pgd100\"]", f"{p}evaluate.attack.eps=[\"8/255\"]",
            f"{p}evaluate.attack.pgd_steps=5", f"{p}curvature.enabled=false",
            f"--seeds={list(range(seeds))}", f"--runs_dir={runs}", f"--results_dir={results}", "--readme=",
            "--table12.rows=[\"sre2l:teacher=guard | @guard\",\"sre2l:teacher=none\"]", "--table12.ipc=[1]",
            "--table12.pairs=[\"GUARD vs SRe2L\"]", "--table3.rows=[]", "--table3.pairs=[]", "--table5.rows=[]",
            "--table5.pairs=[]", "--cost.config=", "--figures=[]", "--selection.ipc=1",
            "--selection.guard=[\"squeeze.objective.beta=0.1\"]", "--selection.pgd_at=[]", "--selection.eps=8/255",
            "--plan.pairs=[\"GUARD vs SRe2L\"]", "--plan.ipc=1", "--plan.eps=8/255", f"--plan.seeds={seeds}",
            "--plan.stopping_rule=benchmark: all seeds", "--plan.pilot_seeds=2"]


def make_data(root: Path, train: int, val: int) -> Path:
    """The first `train` / `val` digits of every class at 16 px."""
    from guard_fast.data.digits import prepare_digits

    full = root / "full"
    prepare_digits(full, size=16, val_fraction=0.2, seed=0)
    out = root / "subset"
    for split, k in (("train", train), ("val", val)):
        for c in sorted(d.name for d in (full / split).iterdir()):
            (out / split / c).mkdir(parents=True)
            for f in sorted((full / split / c).iterdir())[:k]:
                shutil.copy(f, out / split / c / f.name)
    return out


def run_mode(args: list[str], workers: int, folder: Path) -> dict:
    """One study from an empty cache; wall seconds, stages run, and the per-seed cells it produced."""
    shutil.rmtree(folder, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    r = subprocess.run([sys.executable, str(REPO / "launchers/study.py"), *args, f"--workers={workers}"],
                       capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"study failed (workers={workers}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    stages = len(list((folder / "runs").rglob("stage.json")))
    cells = json.loads((folder / "res" / "results.json").read_text())["cells"]
    return {"seconds": seconds, "stages": stages, "stages_per_hour": 3600 * stages / seconds, "cells": cells}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train", type=int, default=20, help="training images per class")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_data(tmp, a.train, 8)
        modes = {"sequential": 1, "parallel": a.workers}
        samples: dict[str, list[dict]] = {m: [] for m in modes}
        for rep in range(a.reps):
            order = list(modes) if rep % 2 == 0 else list(reversed(modes))  # alternate: drift hits both alike
            for mode in order:
                folder = tmp / mode
                samples[mode].append(run_mode(tiny_study(data, folder / "runs", folder / "res", a.seeds),
                                              modes[mode], folder))
                print(f"rep {rep} {mode}: {samples[mode][-1]['stages']} stages in "
                      f"{samples[mode][-1]['seconds']:.1f} s", flush=True)
    same = all(s["cells"] == samples["sequential"][0]["cells"] for m in modes for s in samples[m])
    results = {m: {"workers": modes[m], "stages": samples[m][0]["stages"],
                   "seconds": summarize([s["seconds"] for s in samples[m]]),
                   "stages_per_hour": summarize([s["stages_per_hour"] for s in samples[m]]),
                   "samples_s": [round(s["seconds"], 2) for s in samples[m]]} for m in modes}
    speedup = results["sequential"]["seconds"]["median"] / results["parallel"]["seconds"]["median"]
    results["speedup"] = speedup
    results["same_results"] = same
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    rows = [[m, r["workers"], r["stages"], f"{r['seconds']['median']:.1f} [{r['seconds']['p20']:.1f}, "
             f"{r['seconds']['p80']:.1f}]", f"{r['stages_per_hour']['median']:.0f}"]
            for m, r in results.items() if isinstance(r, dict)]
    cmd = "python -m bench.study_runner " + " ".join(f"--{k}={v}" for k, v in vars(a).items() if k != "out")
    notes = (f"Command: `{cmd}` (with OMP_NUM_THREADS=1: the sequential runner still sets torch threads to the "
             f"machine's cores). Parallel / sequential speed-up (median wall time): {speedup:.2f}x; per-seed results "
             f"identical in every run: {same}. Load average at the end: {load}. The machine is shared: the spread "
             "is the p20-p80 over repetitions.")
    config = {k: v for k, v in vars(a).items() if k != "out"}
    write_results("study-runner", {**config, "command": cmd}, results,
                  ["mode", "workers", "stages", "wall s, median [p20, p80]", "stages/hour"], rows, a.out, notes)
    print(f"speed-up {speedup:.2f}x, same results: {same}")


if __name__ == "__main__":
    main()
