"""The ConvNet of DC / DSA / MTT / TESLA (Zhao et al. 2021; Cazenavette et al. 2022), on normalized inputs.

depth x [conv 3x3 (width channels, bias) -> instance norm (GroupNorm with one group per channel, affine) -> ReLU ->
2x2 average pooling], then one linear classifier on the flattened features. Depth 3 for 32 px (CIFAR-10: 128 x 4 x 4
features), 4 for 64 px (Tiny-ImageNet), 5 for 128 px (ImageNet subsets in MTT/TESLA).

Single-channel inputs (MNIST, Fashion-MNIST) get padding 3 in the first convolution, as DC's code does for channel 1
(VICO-UoE/DatasetCondensation networks.py:99), so a 28 px image leaves the first conv at 32 px and the three blocks
end at 128 x 4 x 4 features, the CIFAR geometry (their networks.py:95-96 sizes the classifier that way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _quarter(x: torch.Tensor) -> torch.Tensor:
    """(C, 1, 2, 2) depthwise weights 1/4."""
    return x.new_full((x.shape[1], 1, 2, 2), 0.25)


class _Pool(torch.autograd.Function):
    """2x2 mean, stride 2, floor: a depthwise convolution; its backward is _Spread (so is every higher derivative)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H // 2, W // 2)
        ctx.odd = (x.shape[-2] % 2, x.shape[-1] % 2)
        return F.conv2d(x, _quarter(x), stride=2, groups=x.shape[1])

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return _Spread.apply(g, ctx.odd)


class _Spread(torch.autograd.Function):
    """The adjoint of _Pool: each value / 4 onto its 2x2 block (a zero row / column where the pooled side was odd),
    a depthwise transposed convolution; its backward is _Pool."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, odd: tuple[int, int]) -> torch.Tensor:  # (B, C, h, w) -> (B, C, 2h+., 2w+.)
        return F.conv_transpose2d(g, _quarter(g), stride=2, groups=g.shape[1], output_padding=odd)

    @staticmethod
    def backward(ctx, gg: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _Pool.apply(gg), None


class AvgPool2x2(nn.AvgPool2d):
    """2x2 average pooling with stride 2 (nn.AvgPool2d(2, 2)). For float32 on a CPU it runs as depthwise
    convolutions (the forward a 2x2 convolution with weights 1/4, the backward its transpose, each the other's
    derivative, so DC's and MTT's create_graph passes stay on the fast path): the same sums up to rounding order.
    PyTorch's CPU average pooling of NCHW tensors is memory-bound and slow: `python -m bench.convnet_pool`
    (docs/reproduction.md, Cost). Other devices and dtypes keep nn.AvgPool2d."""

    def __init__(self) -> None:
        super().__init__(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H // 2, W // 2)
        if x.device.type != "cpu" or x.dtype != torch.float32:
            return super().forward(x)
        return _Pool.apply(x)


class ConvNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 128, depth: int = 3, image_size: int = 32, channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c_in, side = channels, image_size
        for d in range(depth):
            pad = 3 if channels == 1 and d == 0 else 1
            layers += [nn.Conv2d(c_in, width, 3, padding=pad), nn.GroupNorm(width, width, affine=True),
                       nn.ReLU(inplace=True), AvgPool2x2()]
            c_in, side = width, (side + 2 * pad - 2) // 2
        if side < 1:
            raise ValueError(f"ConvNet depth {depth} pools a {image_size} px input below 1 px")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * side * side, num_classes)

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # u: (B, channels, S, S) normalized
        return self.classifier(self.features(u).flatten(1))  # (B, num_classes)
