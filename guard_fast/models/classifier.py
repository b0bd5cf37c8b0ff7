"""The [0,1]-image classifier wrapper and its strict, weights-only checkpoint format.

`Classifier.body` is the network on normalized inputs u = (x - mean) / std; the GUARD regularizers perturb u, the
attacks perturb x.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from guard_fast.runtime.errors import GuardFastError
from guard_fast.runtime.weights import save_checkpoint, unwrap  # noqa: F401 (re-exported)


class Classifier(nn.Module):
    """[0,1] images -> logits: `body(normalize(x))`. The channel count is len(mean): 3 (RGB) or 1 (grayscale); an
    input with another channel count is refused (no silent replication of grayscale to RGB or back)."""

    def __init__(self, body: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.body = body
        if len(mean) != len(std):
            raise GuardFastError(f"mean {tuple(mean)} and std {tuple(std)}: one value per channel each")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))  # (1, C, 1, 1)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.channels_last = False  # set by prepare_model; body inputs then use the channels_last memory format

    def input_format(self, u: torch.Tensor) -> torch.Tensor:
        """u in the memory format the body's convolutions should run in (a no-op copy-free view when it already is)."""
        return u.contiguous(memory_format=torch.channels_last) if self.channels_last else u

    @property
    def channels(self) -> int:
        return self.mean.shape[1]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:  # shapes only: no host-device sync
            raise GuardFastError(f"the model takes {self.mean.shape[1]}-channel images (B, {self.mean.shape[1]}, H, "
                                 f"W); got {tuple(x.shape)}: use the data preset made for this model")
        return self.input_format((x - self.mean) / self.std)

    def denormalize(self, u: torch.Tensor) -> torch.Tensor:
        return u * self.std + self.mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))


def _strip(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key.replace("._orig_mod.", ".")


def load_checkpoint(model: Classifier, path: str | Path) -> Classifier:
    """Load a state dict strictly (weights_only). Accepts our Classifier format or a bare torchvision ResNet-18
    state dict (loaded into the body, keeping this model's normalization). Any mismatch is an error."""
    path = Path(path)
    if not path.is_file():
        raise GuardFastError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, pickle of arbitrary objects, ...
        raise GuardFastError(f"{path}: cannot load as a weights-only state dict ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise GuardFastError(f"{path}: expected a state dict, found {type(state).__name__}")
    state = {_strip(k): v for k, v in state.items()}
    target: nn.Module = model
    if not any(k.startswith("body.") for k in state):
        target = model.body  # a bare network state dict (e.g. torchvision's resnet18)
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:2]}")
        raise GuardFastError(f"{path} does not match the model: " + "; ".join(parts))
    target.load_state_dict(state, strict=True)
    return model
