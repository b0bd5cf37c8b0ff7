"""Images/s of the distillation stages (recover, relabel, student training), eager vs channels_last vs torch.compile.

Each stage is the library's own loop body, timed on synthetic inputs:
- recover: `recover_chunk` (teacher forward + input backward + Adam on the pixels, BN-statistics hooks, per-iteration
  crop/flip/roll); images/s = batch x iterations / s.
- relabel: `label_epoch` (render the FKD views: crop, flip, CutMix; teacher forward, fp16 logits); views/s.
- train: the student step of `run_train` (forward, `kd_loss` against stored logits, backward, AdamW step); images/s.
Variants: eager; channels_last (inputs in channels_last, see models.prepare_model); compiled (torch.compile of the
body). Shapes: the digits path (resnet18-cifar, 32 px) and the ImageNet path (resnet18, 224 px). Every
(shape, stage, variant) cell runs once per repetition, interleaved, so machine drift hits all alike; the first
repetition (compilation, allocator warm-up) is discarded. Ratios are against eager of the same shape and stage.

    python -m bench.stages [--reps 3] [--width 16] [--digits-batch 100] [--imagenet-batch 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch

from bench.common import summarize, write_results
from guard_fast.data.synthetic import SyntheticSet
from guard_fast.data.views import ViewConfig, plan_epoch
from guard_fast.distill.recover import RecoverConfig, recover_chunk
from guard_fast.distill.relabel import label_epoch
from guard_fast.models import Classifier, ModelConfig, build_model, prepare_model
from guard_fast.runtime.engine import OptimConfig, build_optimizer
from guard_fast.student.kd import kd_loss

VARIANTS = {"eager": ModelConfig(), "channels_last": ModelConfig(channels_last=True),
            "compiled": ModelConfig(compile=True)}


@dataclass
class Shape:
    name: str
    arch: str
    size: int  # pixels
    classes: int
    batch: int  # images per recover chunk / relabel batch / student step
    jitter: int  # recover's roll, pixels


def _model(shape: Shape, width: int, seed: int) -> Classifier:
    torch.manual_seed(seed)
    return build_model(shape.arch, shape.classes, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), width=width,
                       image_size=shape.size)


def stage_runners(shape: Shape, variant: str, width: int, iterations: int, steps: int) -> dict[str, Callable]:
    """stage -> f() that does one measured unit of work and returns the number of images it processed."""
    mcfg = VARIANTS[variant]
    base = _model(shape, width, seed=0)
    teacher = prepare_model(copy.deepcopy(base).eval().requires_grad_(False), mcfg)
    labels = torch.arange(shape.batch) % shape.classes
    rcfg = RecoverConfig(iterations=iterations, batch_size=shape.batch, jitter=shape.jitter, model=mcfg)

    def recover() -> int:
        recover_chunk(teacher, labels, rcfg, shape.size, seed=1)
        return shape.batch * iterations

    gen = torch.Generator().manual_seed(2)
    n_views = shape.batch * steps
    pixels = torch.randint(0, 256, (n_views, 3, shape.size, shape.size), generator=gen, dtype=torch.uint8)
    images = SyntheticSet(pixels, torch.arange(n_views) % shape.classes, {"classes": list(range(shape.classes))})
    plan = plan_epoch(n_views, shape.size, ViewConfig(batch_size=shape.batch), epoch=0)

    def relabel() -> int:
        label_epoch(teacher, images, plan, shape.size, topk=0, device=torch.device("cpu"))
        return n_views

    student = prepare_model(copy.deepcopy(base).train(), mcfg)
    opt = build_optimizer(student, OptimConfig(name="adamw", lr=1e-3, weight_decay=0.01))
    x = torch.rand(shape.batch, 3, shape.size, shape.size, generator=gen)  # (B, 3, S, S) rendered views
    target = torch.randn(shape.batch, shape.classes, generator=gen).half()  # stored fp16 teacher logits

    def train() -> int:
        for _ in range(steps):
            loss = kd_loss(student(x), target, temperature=20.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return shape.batch * steps

    return {"recover": recover, "relabel": relabel, "train": train}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="measured repetitions per cell (after one discarded)")
    p.add_argument("--width", type=int, default=16, help="ResNet-18 width (64 = the paper's)")
    p.add_argument("--digits-batch", type=int, default=100, help="images per unit on the digits path (IPC 10 x 10)")
    p.add_argument("--imagenet-batch", type=int, default=8, help="images per unit on the 224 px path")
    p.add_argument("--iterations", type=int, default=4, help="recover iterations per measured unit")
    p.add_argument("--steps", type=int, default=2, help="relabel batches / student steps per measured unit")
    p.add_argument("--shapes", default="digits,imagenet", help="comma list of digits, imagenet")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)

    shapes = {"digits": Shape("digits 32 px", "resnet18-cifar", 32, 10, args.digits_batch, 4),
              "imagenet": Shape("imagenet 224 px", "resnet18", 224, 1000, args.imagenet_batch, 32)}
    cells = {}
    for s in args.shapes.split(","):
        for v in args.variants.split(","):
            for stage, fn in stage_runners(shapes[s], v, args.width, args.iterations, args.steps).items():
                cells[(shapes[s].name, stage, v)] = fn
    samples: dict[str, list[float]] = {" | ".join(k): [] for k in cells}
    for rep in range(args.reps + 1):
        for key, fn in cells.items():  # interleaved: every cell once per repetition
            t0 = time.perf_counter()
            n = fn()
            rate = n / (time.perf_counter() - t0)
            if rep > 0:  # repetition 0: compilation and warm-up, discarded
                samples[" | ".join(key)].append(rate)
            print(f"rep {rep} {' | '.join(key)}: {rate:.1f} img/s", flush=True)

    stats = {k: summarize(v) for k, v in samples.items()}
    rows, ratios = [], {}
    for shape, stage, variant in cells:
        k = f"{shape} | {stage} | {variant}"
        eager = stats[f"{shape} | {stage} | eager"]["median"] if "eager" in args.variants else float("nan")
        ratios[k] = stats[k]["median"] / eager
        s = stats[k]
        rows.append([shape, stage, variant, round(s["median"], 1), f"{s['p20']:.1f}-{s['p80']:.1f}",
                     f"{ratios[k]:.2f}x"])
    config = {k: v for k, v in vars(args).items() if k != "out"}
    notes = ("Images/s: recover = batch x iterations / s (teacher forward + input backward + Adam, BN hooks); "
             "relabel = views / s (render + teacher forward); train = images / s (student forward + KD loss + "
             "backward + AdamW). Medians over interleaved repetitions (first discarded), p20-p80 spread; ratio = "
             f"median / eager median of the same shape and stage. ResNet-18 width {args.width}, fp32, CPU "
             f"threads {torch.get_num_threads()}.")
    kw = {"out_dir": args.out} if args.out else {}
    paths = write_results("stages", config, {"samples": samples, "stats": stats, "ratio_vs_eager": ratios},
                          ["shape", "stage", "variant", "images/s (median)", "p20-p80", "x eager"], rows,
                          notes=notes, **kw)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
