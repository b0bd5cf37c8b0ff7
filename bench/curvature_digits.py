"""Curvature of a GUARD teacher vs a plain teacher on the bundled digits (paper Fig. 2, teacher level).

    python -m bench.curvature_digits [--data data/digits] [--out results/curvature-digits] [--epochs 3]

Trains both teachers in this process with the squeeze objectives of guard_fast.regularizers.objectives (`guard`: the
demo's beta 0.003, h 3, reuse order; `none`: plain CE), identical seed, data order and budget (SGD, plain torch loop:
no DeepSpeed engine, so it runs where the engine cannot start), then measures both with `run_curvature`
(guard_fast/robustness/curvature.py) on a seeded val subset and writes curvature.{json,md,png} to --out.
The student comparison (GUARD vs SRe2L students) is the pipeline's:
`guard-fast pipeline --config configs/digits/demo.toml --curvature.enabled=true`.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from guard_fast.data import build_loader
from guard_fast.models import build_model, save_checkpoint
from guard_fast.regularizers.objectives import ObjectiveConfig, build_objective
from guard_fast.robustness.curvature import CurvatureConfig, run_curvature
from guard_fast.runtime.config import DataConfig, load_config
from guard_fast.runtime.distributed import DistInfo


def train_teacher(data: DataConfig, objective: str, epochs: int, width: int, out: Path) -> dict[str, float]:
    """SGD (lr 0.05, momentum 0.9, wd 5e-4, cosine per step) with the named squeeze objective; returns the time."""
    loader = build_loader(data, "train", seed=0)
    torch.manual_seed(0)
    model = build_model("resnet18-cifar", loader.num_classes, loader.spec.mean, loader.spec.std, width=width)
    obj = build_objective(ObjectiveConfig(name=objective, beta=0.003, h=3.0, strategy="reuse"))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    total, step, t0 = epochs * len(loader), 0, time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            for group in opt.param_groups:
                group["lr"] = 0.05 * 0.5 * (1 + math.cos(math.pi * step / total))
            model.train()
            loss, _ = obj(model, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    save_checkpoint(model, out)
    return {"seconds": time.perf_counter() - t0, "steps": step}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/digits")
    p.add_argument("--out", default="results/curvature-digits")
    p.add_argument("--work", default="runs/curvature-digits", help="teacher checkpoints (git-ignored)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--num_images", type=int, default=48)
    args, rest = p.parse_known_args(argv)
    data = DataConfig(path=args.data, workers=0, batch_size=64)
    work = Path(args.work)
    paths = {}
    for objective in ("guard", "none"):
        paths[objective] = work / objective / "teacher.pt"
        took = train_teacher(data, objective, args.epochs, args.width, paths[objective])
        print(f"{objective} teacher: {took['steps']} steps, {took['seconds']:.0f} s")
    cfg = load_config(CurvatureConfig, None, [f"--data.path={args.data}", "--data.workers=0",
                                              f"--model.width={args.width}", f"--output.dir={args.out}",
                                              f"--num_images={args.num_images}", "--output.progress=false",
                                              f"--checkpoints={paths['guard']},{paths['none']}",
                                              "--labels=GUARD teacher,plain teacher", "--groups=teachers,teachers",
                                              *rest])
    res = run_curvature(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    print(f"wrote {args.out}/curvature.{{json,md,png}} ({res['dataset']['images']} images, {res['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
