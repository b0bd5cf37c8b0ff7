"""ResNet-18 variants that take [0,1] images: normalization is the model's first layer.

`Classifier.body` is the network on normalized inputs u = (x - mean) / std; the GUARD regularizers perturb u, the
attacks perturb x. Module names match torchvision's resnet18, so its state dicts load into `resnet18`'s body.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from guard_fast.errors import GuardFastError
from guard_fast.io import atomic_torch_save


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18 on normalized inputs. stem='imagenet': 7x7/2 conv + max-pool (224 px); 'small': 3x3/1 conv, no pool
    (SRe2L's Tiny-ImageNet stem, also the usual CIFAR stem)."""

    def __init__(self, num_classes: int, width: int = 64, stem: str = "imagenet"):
        super().__init__()
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        widths = [width, 2 * width, 4 * width, 8 * width]
        c_in = width
        for i, (w, stride) in enumerate(zip(widths, (1, 2, 2, 2))):
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(c_in, w, stride), BasicBlock(w, w, 1)))
            c_in = w
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # u: (B, 3, H, W) normalized
        x = self.maxpool(self.relu(self.bn1(self.conv1(u))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (B, num_classes)


MODELS = {
    "resnet18": lambda num_classes, width: ResNet18(num_classes, width, stem="imagenet"),
    "resnet18-tiny": lambda num_classes, width: ResNet18(num_classes, width, stem="small"),
    # Same network as resnet18-tiny; the name follows the 32 px literature so presets read naturally.
    "resnet18-cifar": lambda num_classes, width: ResNet18(num_classes, width, stem="small"),
}


class Classifier(nn.Module):
    """[0,1] images -> logits: `body(normalize(x))`."""

    def __init__(self, body: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.body = body
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def denormalize(self, u: torch.Tensor) -> torch.Tensor:
        return u * self.std + self.mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))


def build_model(arch: str, num_classes: int, mean: Sequence[float], std: Sequence[float], width: int = 64,
                checkpoint: str = "") -> Classifier:
    if arch not in MODELS:
        raise GuardFastError(f"unknown model {arch!r}; valid: {', '.join(sorted(MODELS))}")
    model = Classifier(MODELS[arch](num_classes, width), mean, std)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DeepSpeed / DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


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


def save_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """Plain, weights_only-loadable state dict of the unwrapped model (atomic write)."""
    state = {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}
    return atomic_torch_save(path, state)
