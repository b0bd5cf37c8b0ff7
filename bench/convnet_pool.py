"""ConvNet's average pooling on a CPU, side by side: nn.AvgPool2d(2, 2) against AvgPool2x2 (a depthwise 2x2
convolution with weights 1/4, guard_fast/models/convnet.py), in the parts of a DC outer iteration that bench.dc_cost
times (ConvNet-128, Fashion-MNIST 28 px, one thread), and the largest difference of their results.

    OMP_NUM_THREADS=1 PYTHONPATH=. python -m bench.convnet_pool [--data data/fashion-mnist] [--reps 5]

The same network (same weights) runs both ways, alternating within each repetition; process CPU seconds, medians
after a warm-up. `real 256` = one class's real-batch gradient in passes of 16 (dc.real_gradients); `syn 10` = the
synthetic side of IPC 10 with create_graph, the matching distance and its backward to the images.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import summarize, write_results
from guard_fast.data.presets import DATASETS
from guard_fast.distill.dc import DCConfig, fresh_network, real_gradients
from guard_fast.distill.gradmatch import match_distance
from guard_fast.models.convnet import AvgPool2x2

POOLS = {"nn.AvgPool2d": lambda: nn.AvgPool2d(2, 2), "AvgPool2x2": AvgPool2x2}


def set_pooling(net: nn.Module, make) -> None:
    """Replace every pooling module of the ConvNet's features in place."""
    feats = net.body.features
    for i, m in enumerate(feats):
        if isinstance(m, nn.AvgPool2d):
            feats[i] = make()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/fashion-mnist", help="a prepared Fashion-MNIST folder (tensors.pt)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--name", default="convnet-pool-cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    train = torch.load(Path(args.data) / "tensors.pt", weights_only=True)["train"]
    x_real = train["pixels"][train["labels"] == 0][:256].float() / 255  # (256, 1, 28, 28) in [0,1]
    y_real = torch.zeros(len(x_real), dtype=torch.long)
    net = fresh_network(DCConfig(), DATASETS["fashion-mnist"], 0, torch.device("cpu"), torch.float32)
    params = list(net.parameters())
    u = torch.randn((10, 1, 28, 28), generator=torch.Generator().manual_seed(0)).requires_grad_(True)

    def real() -> list[torch.Tensor]:
        return real_gradients(DCConfig(chunk=16), net, params, x_real, y_real)

    def syn() -> torch.Tensor:
        gw_syn = torch.autograd.grad(F.cross_entropy(net.body(u), torch.zeros(10, dtype=torch.long)), params,
                                     create_graph=True)
        (g,) = torch.autograd.grad(match_distance(list(gw_syn), gw_real), u)
        return g

    gw_real = real()
    parts = {"real 256": real, "syn 10": syn}
    samples = {(pool, part): [] for pool in POOLS for part in parts}
    outputs = {}
    for rep in range(args.reps + 1):  # rep 0: warm-up, discarded
        for pool, make in POOLS.items():
            set_pooling(net, make)
            for part, fn in parts.items():
                t = time.process_time()
                outputs[pool, part] = fn()
                if rep:
                    samples[pool, part].append(time.process_time() - t)

    def rel_diff(a, b) -> float:
        a, b = (a if isinstance(a, list) else [a]), (b if isinstance(b, list) else [b])
        return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b, strict=True))

    med = {k: summarize(v)["median"] for k, v in samples.items()}
    base, fast = POOLS
    rows = [[part, f"{med[base, part]:.3f}", f"{med[fast, part]:.3f}", f"{med[base, part] / med[fast, part]:.2f}x",
             f"{rel_diff(outputs[fast, part], outputs[base, part]):.1e}"] for part in parts]
    write_results(args.name, vars(args), {"samples_s": {f"{a} / {b}": v for (a, b), v in samples.items()}},
                  ["part (CPU s, median)", base, fast, "speed-up", "max relative difference"], rows)
    for r in rows:
        print(*r, sep="\t")
    return med


if __name__ == "__main__":
    main()
