"""`MODELS`: architecture name -> factory of a body on normalized inputs."""

from __future__ import annotations

from typing import Callable

from torch import nn

from guard_fast.models.convnet import ConvNet
from guard_fast.models.resnet import ResNet18

# arch -> factory(num_classes, width, image_size, channels) of a body on normalized inputs; plain dict, no plugin
# magic.
MODELS: dict[str, Callable[[int, int, int, int], nn.Module]] = {
    "resnet18": lambda num_classes, width, image_size, channels=3: ResNet18(num_classes, width, "imagenet", channels),
    "resnet18-tiny": lambda num_classes, width, image_size, channels=3: ResNet18(num_classes, width, "small", channels),
    # Same network as resnet18-tiny; the name follows the 32 px literature so presets read naturally.
    "resnet18-cifar": lambda num_classes, width, image_size, channels=3: ResNet18(num_classes, width, "small",
                                                                                  channels),
    # DC / MTT / TESLA's ConvNet (their papers use width 128): depth 3 at 32 px, 4 at 64 px, 5 at 128 px.
    "convnet": lambda num_classes, width, image_size, channels=3: ConvNet(num_classes, width, 3, image_size,
                                                                            channels),
    "convnet-d4": lambda num_classes, width, image_size, channels=3: ConvNet(num_classes, width, 4, image_size,
                                                                            channels),
    "convnet-d5": lambda num_classes, width, image_size, channels=3: ConvNet(num_classes, width, 5, image_size,
                                                                            channels),
}
