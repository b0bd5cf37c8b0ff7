"""What every run folder gets at start: resolved config, git SHA, package versions, device; metrics as JSON lines."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from guard_fast.runtime import config as config_mod
from guard_fast.runtime.distributed import topology
from guard_fast.runtime.errors import GuardFastError
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
    """git SHA, versions, rank 0's hardware, and the job's layout (world size, every rank's host: cluster)."""
    return {"git_sha": git_sha(), "versions": versions(), "hardware": device_description(device),
            "cluster": topology() or {"world_size": 1, "nodes": 1, "ranks": []},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


RECORD = ("config.toml", "config.json", "environment.json", "metrics.jsonl", "result.json", "checkpoints")
"""what a started run leaves in its folder (plus the stage's products, e.g. teacher.pt)"""


def check_output_dir(path: Path) -> None:
    """One-line errors for an output folder that cannot be one: a file, under a file, or not writable."""
    if path.exists() and not path.is_dir():
        raise GuardFastError(f"output.dir = {path} is a file, not a folder; choose another output.dir")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise GuardFastError(f"output.dir = {path}: {parent} is a file, not a folder; choose another output.dir")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GuardFastError(f"output.dir = {path}: {parent} is not writable; choose another output.dir")


class RunDir:
    """A run folder. Nothing is written until `start()`, called once the run's inputs are checked and it is known
    to start: rank 0 then writes config.toml/config.json/environment.json, and appends metrics.jsonl later.

    `resume`: None = the stage reuses finished work itself (recover, relabel, evaluate, pipeline caches); False = a
    fresh run, which must own its folder: another run's record or checkpoints there is an error naming the flags,
    unless `overwrite` (then `start()` removes that run's record and `products` first); True = continue the run
    already in the folder (its record is rewritten at start, its metrics cut back to the resumed step)."""

    def __init__(self, path: str | Path, cfg: Any = None, *, is_main: bool = True, device=None,
                 resume: bool | None = None, overwrite: bool = False, products: tuple[str, ...] = ()):
        self.path, self.cfg, self.device = Path(path), cfg, device
        self.is_main, self.resume, self.overwrite, self.products = is_main, resume, overwrite, products
        check_output_dir(self.path)
        if resume is False and not overwrite and (found := self.foreign()):
            raise GuardFastError(f"output.dir = {self.path} holds another run ({', '.join(found)}); pass --resume "
                                 "to continue it, a new --output.dir, or --output.overwrite=true to replace it")

    def foreign(self) -> list[str]:
        """Names of another run's record or products in the folder (an empty checkpoints/ does not count)."""
        found = []
        for name in (*RECORD, *self.products):
            p = self.path / name
            if p.is_file() or (p.is_dir() and any(p.iterdir())):
                found.append(name)
        return found

    def start(self) -> "RunDir":
        """The run is starting: (overwrite) clear the old run, drop stale temp files, write the record."""
        if not self.is_main:
            return self
        if self.resume is False and self.overwrite:
            for name in self.foreign():
                p = self.path / name
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        for tmp in (*self.path.glob(".*.tmp"), *self.path.glob("checkpoints/.*.tmp")):
            tmp.unlink(missing_ok=True)  # left by a killed atomic write; this run owns the folder
        if self.cfg is not None:
            atomic_text(self.path / "config.toml", config_mod.to_toml(self.cfg))
            atomic_json(self.path / "config.json", config_mod.to_dict(self.cfg))
        atomic_json(self.path / "environment.json", environment(self.device))
        return self

    def resumed_at(self, step: int, file: str = "metrics.jsonl") -> None:
        """Drop metric lines past `step` (logged after the checkpoint a resumed run restarts from; they are logged
        again) and any line a kill cut short."""
        path = self.path / file
        if not self.is_main or not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict) or rec.get("step", 0) <= step:
                kept.append(line + "\n")
        atomic_text(path, "".join(kept))

    def log(self, record: dict[str, Any], file: str = "metrics.jsonl") -> None:
        if self.is_main:
            append_jsonl(self.path / file, {"time": round(time.time(), 3), **record})
