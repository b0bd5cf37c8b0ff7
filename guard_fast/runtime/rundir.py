"""What every run folder gets at start: resolved config, git SHA, package versions, device; metrics as JSON lines."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from guard_fast.runtime import config as config_mod
from guard_fast.runtime.io import append_jsonl, atomic_json, atomic_text

PACKAGES = ("torch", "torchvision", "triton", "deepspeed", "ffcv", "numpy", "torchattacks")


def git_sha() -> str:
    """SHA of the checkout guard_fast runs from ('unknown' outside git), with '-dirty' for uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_description(device: torch.device | str | None = None) -> dict[str, Any]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info: dict[str, Any] = {"device": str(device), "platform": platform.platform(), "cpu": platform.processor()
                            or platform.machine(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    return info


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    return {"git_sha": git_sha(), "versions": versions(), "hardware": device_description(device),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class RunDir:
    """A run folder. Rank 0 writes config.toml/config.json/environment.json at start and appends metrics.jsonl."""

    def __init__(self, path: str | Path, cfg: Any = None, *, is_main: bool = True, device=None):
        self.path = Path(path)
        self.is_main = is_main
        if is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            if cfg is not None:
                atomic_text(self.path / "config.toml", config_mod.to_toml(cfg))
                atomic_json(self.path / "config.json", config_mod.to_dict(cfg))
            atomic_json(self.path / "environment.json", environment(device))

    def log(self, record: dict[str, Any], file: str = "metrics.jsonl") -> None:
        if self.is_main:
            append_jsonl(self.path / file, {"time": round(time.time(), 3), **record})
