"""The expert buffer on disk (MTT's replay buffer): one weights-only file per expert plus `buffer.json`.

`<dir>/experts/expert_<e>.pt` = {"key", "expert", "seed", "trajectory": (epochs + 1, P) float32 flat parameters after
0..epochs epochs (row 0 = initialization), "train_ce", "train_reg" (per-epoch means of the objective's terms),
"val_acc"}; `<dir>/buffer.json`, written last by rank 0, records what the experts were trained on (dataset, classes,
image size, network, flat parameter count, epochs) and with which objective (its name and every setting), so a
distillation run can refuse a buffer made for another dataset or model, or with another objective, with one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from guard_fast.runtime.errors import GuardFastError, reading

BUFFER = "buffer.json"


def expert_path(root: str | Path, e: int) -> Path:
    return Path(root) / "experts" / f"expert_{e:04d}.pt"


def buffer_objective(manifest: dict[str, Any]) -> str:
    """The objective the buffer's experts were trained with (a buffer from before the option: plain CE, `none`)."""
    return manifest.get("objective", {"name": "none"})["name"]


def read_buffer(root: str | Path, want: dict[str, Any], objective: str = "none") -> dict[str, Any]:
    """buffer.json of `root`, checked against `want` (dataset, num_classes, image_size, arch, width, num_params) and
    against the experts' training objective the run asks for (`objective`, a registry name)."""
    path = Path(root) / BUFFER
    if not path.is_file():
        raise GuardFastError(f"{path} not found: not a finished expert buffer (run guard-fast experts first)")
    with reading(path, "expert buffer record"):
        manifest = json.loads(path.read_text())
        manifest["key"], manifest["epochs"]  # noqa: B018 - the keys every reader needs
    diff = [f"{k} {manifest.get(k)!r} vs {v!r}" for k, v in want.items() if manifest.get(k) != v]
    if diff:
        raise GuardFastError(f"{path}: the expert buffer was made for another dataset or model ({'; '.join(diff)} "
                             "in this run); train experts for this configuration")
    made = buffer_objective(manifest)
    if made != objective:
        raise GuardFastError(f"{path}: the experts were trained with objective {made!r} but this run asks for experts "
                             f"trained with {objective!r} (expert_objective); use a buffer made with {objective!r} or "
                             f"set expert_objective = {made!r}")
    return manifest


def load_trajectory(root: str | Path, manifest: dict[str, Any], e: int) -> torch.Tensor:
    """Expert e's flat parameters after every epoch, (epochs + 1, P) float32 (memory-mapped)."""
    path = expert_path(root, e)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise GuardFastError(f"{path}: cannot load the expert ({type(err).__name__}: {err})") from None
    with reading(path, "expert file"):
        if blob.get("key") != manifest["key"]:
            raise GuardFastError(f"{path} belongs to another buffer than {Path(root) / BUFFER}; retrain the experts")
        return blob["trajectory"]
