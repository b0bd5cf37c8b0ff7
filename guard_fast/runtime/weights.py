"""Weights files: the plain module under training wrappers, and its state dict saved weights_only-loadable.

Infrastructure below the models (the shared training loop saves a network without knowing what it is);
guard_fast.models re-exports both and adds the strict loader that knows the Classifier's layout."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from guard_fast.runtime.io import atomic_torch_save


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DeepSpeed / DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def save_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """Plain, weights_only-loadable state dict of the unwrapped model (atomic write)."""
    state = {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}
    return atomic_torch_save(path, state)
