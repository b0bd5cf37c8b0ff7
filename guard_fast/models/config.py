"""The `model` config section (every stage that builds a network has one)."""

from __future__ import annotations

from dataclasses import dataclass

from guard_fast.models.registry import MODELS
from guard_fast.runtime.errors import ConfigError

COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass
class ModelConfig:
    arch: str = "resnet18-cifar"
    """network: resnet18 (ImageNet stem, 224 px), resnet18-tiny (3x3 stem, 64 px), resnet18-cifar (3x3 stem, 32 px),
    convnet / convnet-d4 / convnet-d5 (DC/MTT/TESLA's ConvNet of depth 3/4/5 for 32/64/128 px)"""
    width: int = 64
    """channels of the first stage (64 is ResNet-18; ConvNet's papers use 128; tests use 4-8)"""
    checkpoint: str = ""
    """state dict to load strictly before the stage starts (empty = fresh initialization)"""
    channels_last: bool = False
    """use the channels_last memory format (faster convolutions on CUDA)"""
    compile: bool = False
    """wrap the model in torch.compile (first-order paths only: compile cannot do double backward)"""
    compile_backend: str = "inductor"
    """torch.compile backend: inductor (generated kernels: the speed-up), aot_eager (the same traced forward and
    backward graphs run by PyTorch's own operators, no code generation: for debugging and for checking the wiring
    quickly), eager (dynamo tracing only)"""

    def validate(self) -> None:
        if self.arch not in MODELS:
            raise ConfigError(f"model.arch = {self.arch!r}: valid values are {', '.join(sorted(MODELS))}")
        if self.width < 1:
            raise ConfigError(f"model.width = {self.width}: must be >= 1")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ConfigError(f"model.compile_backend = {self.compile_backend!r}: valid values are "
                              f"{', '.join(COMPILE_BACKENDS)}")
