"""CPU time of one unit of every stage of the GUARD-variants evidence table on Fashion-MNIST (ConvNet, 28 px, one
channel, one thread; configs/fashion-mnist/study-guard-variants.toml), to size its budgets
(docs/methods/guard-variants.md).

    OMP_NUM_THREADS=1 PYTHONPATH=. python -m bench.variants_cost [--data data/fashion-mnist] [--width 128] [--reps 2]

Units, each the library function the stage runs: `expert step` = experts.expert_step on 256 real images with DSA
(objective none, and guard with the preset's experts.objective); `mtt step` / `tesla step` = one unrolled synthetic
step of matching.mtt_grads / tesla_grads on the 100 images of IPC 10 (a call of 10 steps, divided by 10); `dm
iteration` = dm.dm_step (10 classes x 256 real images through a fresh network, IPC 10); `dc real` / `guard(dc)
real` = dc.real_gradients of 256 real images (passes of dc.chunk); `student step` = one SGD step on 100 images with
DSA; `pgd step` = one input-gradient step of 500 test images (evaluation: PGD-100 = 100 of them per eps). Time:
process CPU seconds, the median of `reps` repetitions after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import write_results
from guard_fast.data.presets import DATASETS
from guard_fast.distill import dc, dm
from guard_fast.distill.experts import ExpertsConfig, expert_objective, expert_step
from guard_fast.distill.matching import FlatNet, build_augment, mtt_grads, plan_steps, tesla_grads
from guard_fast.models import ModelConfig, model_from_config
from guard_fast.regularizers.objectives import ObjectiveConfig
from guard_fast.runtime.distributed import DistInfo


def cpu_median(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/fashion-mnist")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--beta", type=float, default=0.1, help="GUARD experts' beta (the preset's experts.objective)")
    p.add_argument("--h", type=float, default=3.0)
    p.add_argument("--name", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    spec = DATASETS["fashion-mnist"]
    train = torch.load(Path(args.data) / "tensors.pt", weights_only=True)["train"]
    real_u8 = [train["pixels"][train["labels"] == c] for c in range(10)]  # uint8 (N_c, 1, 28, 28)
    x256 = real_u8[0][:256].float() / 255
    y256 = torch.zeros(256, dtype=torch.long)
    mcfg = ModelConfig(arch="convnet", width=args.width)
    torch.manual_seed(0)
    model = model_from_config(mcfg, spec)
    units: dict[str, float] = {}

    aug = build_augment("dsa", model.mean, model.std)
    for name, obj in (("none", ObjectiveConfig(name="none")),
                      ("guard", ObjectiveConfig(name="guard", beta=args.beta, h=args.h))):
        objective = expert_objective(ExpertsConfig(objective=obj))
        opt = torch.optim.SGD(model.body.parameters(), lr=0.01)

        def step(objective=objective, opt=opt) -> None:
            expert_step(model, objective, opt, aug(model.normalize(x256), 0), y256)

        units[f"expert step ({name})"] = cpu_median(step, args.reps)

    flat = FlatNet(model.body)
    u = model.normalize(torch.cat([r[:10] for r in real_u8]).float() / 255)  # (100, 1, 28, 28) IPC 10
    labels = torch.arange(10).repeat_interleave(10)
    start = flat.flat().detach()
    target = start + 0.01 * torch.randn(start.shape, generator=torch.Generator().manual_seed(0))
    steps = plan_steps(len(labels), len(labels), 10, torch.Generator().manual_seed(0), 0)
    lr = torch.tensor(0.01)
    for name, grads in (("mtt", mtt_grads), ("tesla", tesla_grads)):
        units[f"{name} step"] = cpu_median(lambda grads=grads: grads(flat, u, labels, lr, start, target, steps, aug),
                                           args.reps) / len(steps)

    dcfg = dm.DMConfig(ipc=10, model=mcfg)
    ud = u.clone().requires_grad_(True)
    ud.grad = torch.zeros_like(ud)
    dopt = torch.optim.SGD([ud], lr=1.0, momentum=0.5)
    info = DistInfo(0, 1, 0, cpu)
    units["dm iteration"] = cpu_median(
        lambda: dm.dm_step(dcfg, info, dm.fresh_network(dcfg, spec, 0, cpu, torch.float32), ud, dopt, real_u8, 0),
        args.reps)

    params = list(model.parameters())
    for name, guard in (("dc real", False), ("guard(dc) real", True)):
        ccfg = dc.DCConfig(guard=guard)
        units[f"{name} 256"] = cpu_median(lambda ccfg=ccfg: dc.real_gradients(ccfg, model, params, x256, y256),
                                            args.reps)

    sopt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def student_step() -> None:
        loss = F.cross_entropy(model.body(aug(u, 0)), labels)
        sopt.zero_grad()
        loss.backward()
        sopt.step()
    units["student step 100"] = cpu_median(student_step, args.reps)

    x500 = real_u8[1][:500].float().div(255).requires_grad_(True)
    y500 = torch.ones(500, dtype=torch.long)
    units["pgd step 500"] = cpu_median(lambda: torch.autograd.grad(F.cross_entropy(model(x500), y500), x500),
                                       args.reps)
    rows = [[k, f"{v:.3f}"] for k, v in units.items()]
    write_results(args.name or f"variants-cost-fashion-mnist-w{args.width}", vars(args), {"median_cpu_s": units},
                  ["unit", "CPU s (median)"], rows)
    for r in rows:
        print(*r, sep="\t")
    return units


if __name__ == "__main__":
    main()
