"""CPU time of a DC-protocol student (ConvNet-128, Fashion-MNIST) by pass size: the step in one pass vs in passes of
`chunk` images, and the test-set evaluation in batches of 256 vs 32, side by side in one process.

    PYTHONPATH=. python -m bench.student_passes [--ipc 50] [--epochs 10] [--reps 2] [--data data/fashion-mnist]

Each variant trains the same random-real set (seeded draw 99) from the same initialization for `epochs` epochs at
batch 256 and scores it on the 10,000 test images (guard_fast/student/hard.py through the preset
configs/fashion-mnist/pipeline-dc.toml); repetitions are interleaved, one torch thread. CPU time: process time of
the whole stage (setup, steps, evaluation). The variants' accuracies must agree to float rounding.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.common import summarize, write_results

PRESET = "configs/fashion-mnist/pipeline-dc.toml"
VARIANTS = [(0, 256), (16, 256), (16, 32), (8, 32)]  # (train_hard.chunk, data.eval_batch_size)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ipc", type=int, default=50)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--data", default="data/fashion-mnist")
    p.add_argument("--name", default="student-passes-fashion-mnist")
    args = p.parse_args(argv)
    from guard_fast.pipeline import PipelineConfig
    from guard_fast.reproduce import one_cpu, random_real_set, stage_cfg
    from guard_fast.runtime.config import load_config
    from guard_fast.student.hard import run_train_hard

    torch.set_num_threads(1)
    samples: dict[str, list[float]] = {}
    accs: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        images = random_real_set(Path(args.data), args.ipc, 99, Path(tmp) / "set")
        for rep in range(args.reps):
            for chunk, eval_bs in VARIANTS:
                key = f"chunk {chunk or 'off'}, eval batch {eval_bs}"
                pc = load_config(PipelineConfig, PRESET, [f"--data.path={args.data}",
                                                          f"--train_hard.optim.epochs={args.epochs}",
                                                          f"--train_hard.chunk={chunk}",
                                                          f"--data.eval_batch_size={eval_bs}"])
                cfg = stage_cfg(pc, "train_hard", Path(tmp) / f"r{rep}-{chunk}-{eval_bs}", 0)
                cfg.images = str(images)
                start = time.process_time()
                result = run_train_hard(cfg, one_cpu())
                samples.setdefault(key, []).append(time.process_time() - start)
                accs[key] = result["val"]["clean"]
    base = summarize(samples[next(iter(samples))])["median"]
    results = {k: {"cpu_s": summarize(v), "speedup": base / summarize(v)["median"], "accuracy": accs[k]}
               for k, v in samples.items()}
    rows = [[k, r["cpu_s"]["median"], r["speedup"], r["accuracy"]] for k, r in results.items()]
    steps = args.epochs * -(-10 * args.ipc // 256)
    write_results(args.name, vars(args), results, ["variant", "CPU s (median)", "speedup", "test accuracy"], rows,
                  notes=f"{steps} steps of batch 256 (IPC {args.ipc}) + the 10,000-image evaluation per variant; "
                        f"{args.reps} interleaved repetitions. `python -m bench.student_passes --ipc {args.ipc} "
                        f"--epochs {args.epochs} --reps {args.reps}`")
    for r in rows:
        print(r)
    return results


if __name__ == "__main__":
    main()
