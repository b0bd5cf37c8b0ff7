"""CPU time of DC / DSA distillation on Fashion-MNIST (ConvNet-128, 28 px, 1 channel, one thread), per part of an
outer iteration, in passes of `chunk` images and in one pass, and the extrapolation to a whole set at DC's protocol.

    OMP_NUM_THREADS=1 PYTHONPATH=. python -m bench.dc_cost [--data data/fashion-mnist] [--chunk 16] [--reps 3]

Parts (guard_fast/distill/dc.py, the functions the stage runs): `real` = real_gradients of one class's batch_real =
256 real images (one per class and image step); `syn k` = CE of a class's k synthetic images, its parameter
gradients with create_graph, the matching distance and its backward to the images (one per class and image step);
`inner b` = one inner-loop SGD step on b synthetic images (train_network, batch_train 256). A set at IPC k costs
iterations x outer x 10 x (real + syn k) + iterations x (outer - 1) x inner x (steps of one epoch), DC's loops
(utils.py:275-293). Time: process CPU seconds (one thread), the median of `reps` interleaved repetitions after a
warm-up; a loaded machine inflates all of them alike.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import summarize, write_results
from guard_fast.data.presets import DATASETS
from guard_fast.distill.dc import DCConfig, fresh_network, real_gradients, train_network
from guard_fast.distill.dc_config import LOOPS
from guard_fast.distill.gradmatch import match_distance

IPCS = (1, 10, 50)


def cpu_time(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/fashion-mnist", help="a prepared Fashion-MNIST folder (tensors.pt)")
    p.add_argument("--chunk", type=int, default=16, help="images per pass of the chunked variant")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--iterations", type=int, default=1000, help="outer iterations of a set (DC: 1000)")
    p.add_argument("--name", default="dc-cost-fashion-mnist")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    spec = DATASETS["fashion-mnist"]
    train = torch.load(Path(args.data) / "tensors.pt", weights_only=True)["train"]
    x_real = train["pixels"][train["labels"] == 0][:256].float() / 255  # one class's real batch, [0,1] pixels
    y_real = torch.zeros(len(x_real), dtype=torch.long)
    chunks = {"one pass": 100_000, f"passes of {args.chunk}": args.chunk}
    net = fresh_network(DCConfig(), spec, 0, torch.device("cpu"), torch.float32)
    params = list(net.parameters())
    gw_real = real_gradients(DCConfig(chunk=args.chunk), net, params, x_real, y_real)
    gen = torch.Generator().manual_seed(0)

    def real(chunk: int):
        return lambda: real_gradients(DCConfig(chunk=chunk), net, params, x_real, y_real)

    def syn(k: int):
        u = torch.randn((k, 1, 28, 28), generator=gen).requires_grad_(True)

        def run() -> None:
            loss = F.cross_entropy(net.body(u), torch.zeros(k, dtype=torch.long))
            gw_syn = torch.autograd.grad(loss, params, create_graph=True)
            match_distance(list(gw_syn), gw_real).backward()
        return run

    def inner(n: int, chunk: int):  # one epoch of the inner loop on n synthetic images (ceil(n / 256) steps)
        u = torch.randn((n, 1, 28, 28), generator=gen)
        labels = torch.arange(10).repeat_interleave(n // 10)
        cfg = DCConfig(ipc=n // 10, space="normalized", chunk=chunk)
        return lambda: train_network(cfg, net, u, labels, 0, 0, 1)

    parts = {f"real 256 ({c})": real(v) for c, v in chunks.items()}
    parts |= {f"syn {k}": syn(k) for k in IPCS}
    parts |= {f"inner epoch {10 * k} ({c})": inner(10 * k, v) for k in IPCS[1:] for c, v in chunks.items()}
    for fn in parts.values():
        fn()  # warm-up
    samples: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(args.reps):
        for name, fn in parts.items():
            samples[name].append(cpu_time(fn))
    med = {k: summarize(v)["median"] for k, v in samples.items()}
    rows, sets = [], {}
    for c in chunks:
        for k in IPCS:
            outer, inner_epochs = LOOPS[k]
            match = args.iterations * outer * 10 * (med[f"real 256 ({c})"] + med[f"syn {k}"])
            epoch = med.get(f"inner epoch {10 * k} ({c})", 0.0)  # IPC 1: one image step, no inner loop
            train_s = args.iterations * (outer - 1) * inner_epochs * epoch
            sets[f"ipc{k} ({c})"] = {"matching_s": match, "inner_s": train_s, "set_h": (match + train_s) / 3600}
            rows.append([f"IPC {k}", c, f"{match / 3600:.2f}", f"{train_s / 3600:.2f}",
                         f"{(match + train_s) / 3600:.2f}"])
    part_rows = [[k, f"{v:.4f}"] for k, v in med.items()]
    notes = "Parts (CPU s, median):\n\n" + "\n".join(f"- {k}: {v}" for k, v in part_rows)
    write_results(args.name, vars(args), {"parts_s": samples, "median_s": med, "sets": sets},
                  ["set", "passes", "matching CPU h", "inner loop CPU h", "one set CPU h"], rows, notes=notes)
    for r in part_rows:
        print(*r, sep="\t")
    for r in rows:
        print(*r, sep="\t")
    return sets


if __name__ == "__main__":
    main()
