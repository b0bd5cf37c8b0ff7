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
from torch import nn


class ConvNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 128, depth: int = 3, image_size: int = 32, channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c_in, side = channels, image_size
        for d in range(depth):
            pad = 3 if channels == 1 and d == 0 else 1
            layers += [nn.Conv2d(c_in, width, 3, padding=pad), nn.GroupNorm(width, width, affine=True),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]
            c_in, side = width, (side + 2 * pad - 2) // 2
        if side < 1:
            raise ValueError(f"ConvNet depth {depth} pools a {image_size} px input below 1 px")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * side * side, num_classes)

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # u: (B, channels, S, S) normalized
        return self.classifier(self.features(u).flatten(1))  # (B, num_classes)
