"""Time per DC outer iteration and peak memory: DC vs GUARD(DC) vs DC on PGD-attacked real batches (the authors'
`Attack` method), side by side in one process.

    PYTHONPATH=. python -m bench.dc_step [--width 128] [--ipc 10] [--outer 2] [--inner 5] [--reps 3] [--name NAME]

The three methods run `guard_fast.distill.dc.outer_iteration` on the same random 10-class real set (32 px, in memory,
no disk), the same fresh network per repetition and the same synthetic images; repetitions are interleaved (a
contended machine slows all three alike) after one discarded warm-up each. Time: wall clock (CUDA: synchronized).
Peak memory: bench.step.memory_step (CUDA max_memory_allocated; CPU profiler allocator events above the live bytes).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from bench.common import summarize, write_results
from bench.step import memory_step
from guard_fast.data.presets import DATASETS
from guard_fast.distill.dc import DCConfig, fresh_network, outer_iteration
from guard_fast.runtime.distributed import DistInfo, pick_device

METHODS = {"DC": {}, "GUARD(DC)": {"guard": True}, "DC + PGD-10 real": {"attack": "pgd"}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--outer", type=int, default=2, help="outer_loop (image steps per iteration)")
    p.add_argument("--inner", type=int, default=5, help="inner_loop (network epochs between image steps)")
    p.add_argument("--batch-real", type=int, default=256)
    p.add_argument("--per-class", type=int, default=300, help="real images per class in memory")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--name", default="dc-step")
    args = p.parse_args(argv)
    device = pick_device()
    info = DistInfo(0, 1, 0, device)
    spec = DATASETS["imagefolder"].__class__(**{**DATASETS["digits"].__dict__, "num_classes": 10, "image_size": 32})
    g = torch.Generator().manual_seed(0)
    real = [torch.rand((args.per_class, 3, 32, 32), generator=g).to(device) for _ in range(10)]
    base = DCConfig(ipc=args.ipc, outer_loop=args.outer, inner_loop=args.inner, batch_real=args.batch_real)
    base.model.width = args.width
    cfgs = {k: _replace(base, v) for k, v in METHODS.items()}
    probe = fresh_network(base, spec, 0, device, torch.float32)
    u0 = probe.normalize(torch.cat([r[:args.ipc] for r in real]))

    def one(name: str, it: int) -> None:
        u = u0.clone().requires_grad_(True)
        u.grad = torch.zeros_like(u)
        opt = torch.optim.SGD([u], lr=0.1, momentum=0.5)
        net = fresh_network(cfgs[name], spec, it, device, torch.float32)
        outer_iteration(cfgs[name], info, net, u, opt, real, it)

    samples: dict[str, list[float]] = {k: [] for k in METHODS}
    for name in METHODS:
        one(name, 0)  # warm-up, discarded
    for rep in range(1, args.reps + 1):
        for name in METHODS:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            one(name, rep)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples[name].append(time.perf_counter() - t)
    static = sum(t.numel() * t.element_size() for t in real) + u0.numel() * u0.element_size()
    memory = {name: memory_step(lambda name=name: one(name, 0), device, static) for name in METHODS}
    dc_median = summarize(samples["DC"])["median"]
    rows, results = [], {}
    for name in METHODS:
        s = summarize(samples[name])
        ratios = summarize([a / b for a, b in zip(samples[name], samples["DC"], strict=True)])
        results[name] = {"seconds_per_iteration": s, "time_ratio_vs_dc": ratios, "samples_s": samples[name],
                         "memory": memory[name]}
        rows.append([name, s["median"], f"{s['p20']:.3g}-{s['p80']:.3g}", ratios["median"],
                     memory[name]["peak_mib"], memory[name]["peak_mib"] / memory["DC"]["peak_mib"]])
    notes = (f"One outer iteration = outer_loop {args.outer} image steps over 10 classes (batch_real "
             f"{args.batch_real}) + {args.outer - 1} x {args.inner} network epochs on {10 * args.ipc} synthetic "
             f"images; ConvNet width {args.width}, 32 px. GUARD(DC): lam 100, h 0.6; PGD: 10 steps, eps 8/255, "
             f"alpha 2/255, random start. Median (p20-p80) of {args.reps} interleaved repetitions after a discarded "
             f"warm-up; time ratio = median of per-repetition ratios to DC. DC median {dc_median:.3g} s.")
    write_results(args.name, vars(args), results, ["method", "s / outer iteration", "p20-p80", "time vs DC",
                                                   "peak MiB", "memory vs DC"], rows, notes=notes, device=device)
    return results


def _replace(cfg: DCConfig, values: dict) -> DCConfig:
    out = copy.deepcopy(cfg)
    for k, v in values.items():
        setattr(out, k, v)
    return out


if __name__ == "__main__":
    main()
