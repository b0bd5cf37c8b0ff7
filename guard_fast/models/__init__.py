"""Networks that take [0,1] images (normalization is their first layer), one registry, and the wrapping order.

`MODELS[arch](num_classes, width, image_size, channels)` builds a body on normalized inputs (channels = len(mean));
`build_model` wraps it in a `Classifier` and optionally loads a checkpoint strictly; `model_from_config` does that
from a stage's `model` section and the resolved dataset; `prepare_model` applies channels_last and torch.compile in
that order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from torch import nn

from guard_fast.models.classifier import Classifier, load_checkpoint, save_checkpoint, unwrap
from guard_fast.models.config import ModelConfig
from guard_fast.models.registry import MODELS
from guard_fast.runtime.errors import GuardFastError

if TYPE_CHECKING:
    from guard_fast.data.presets import DatasetSpec

def build_model(arch: str, num_classes: int, mean: Sequence[float], std: Sequence[float], width: int = 64,
                checkpoint: str = "", image_size: int = 32) -> Classifier:
    if arch not in MODELS:
        raise GuardFastError(f"unknown model {arch!r}; valid: {', '.join(sorted(MODELS))}")
    model = Classifier(MODELS[arch](num_classes, width, image_size, len(mean)), mean, std)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model


def model_from_config(cfg: ModelConfig, spec: DatasetSpec, checkpoint: str | None = None) -> Classifier:
    """The stage's network for the resolved dataset; `checkpoint` (default: cfg.checkpoint) is loaded strictly."""
    return build_model(cfg.arch, spec.num_classes, spec.mean, spec.std, cfg.width,
                       cfg.checkpoint if checkpoint is None else checkpoint, spec.image_size)


def prepare_model(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """channels_last, then compile (compile must see the final memory format); DeepSpeed wraps the result.

    channels_last is applied to the body's *inputs* (Classifier.normalize), not to the weights: convolutions run in
    channels_last when either operand is (cudnn's and oneDNN's suggest_memory_format), so activations and their
    gradients stay channels_last; and DeepSpeed cannot take channels_last parameters (its initial broadcast views
    each parameter as bytes, which needs stride(-1) == 1, and ZeRO replaces parameters by contiguous views of its flat
    buffers anyway)."""
    if cfg.channels_last:
        unwrap(model).channels_last = True
    if cfg.compile:
        # The body, in place (same module object and state-dict keys): the objectives and recover call model.body(u)
        # directly, so compiling the Classifier's forward would leave their passes eager.
        unwrap(model).body.compile(backend=cfg.compile_backend)
    return model


__all__ = ["MODELS", "Classifier", "ModelConfig", "build_model", "load_checkpoint", "model_from_config",
           "prepare_model", "save_checkpoint", "unwrap"]
