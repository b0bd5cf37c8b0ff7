"""What the image distillers (dc, dm) share: seeded draws and the resumable state of the synthetic images.

The state file holds the images, their optimizer and the next iteration, under the run's images key: a rerun resumes
from it and reproduces the uninterrupted run; a state of another configuration is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from guard_fast.runtime import distributed as D
from guard_fast.runtime.checkpoint import safe_load
from guard_fast.runtime.distributed import DistInfo
from guard_fast.runtime.errors import GuardFastError, reading
from guard_fast.runtime.io import atomic_torch_save


def seeded(*parts: int) -> torch.Generator:
    """A CPU generator seeded from integers (iteration, class, ...): the same draws on every rank and every rerun."""
    seed = 0
    for p in parts:
        seed = seed * 1_000_003 + p
    return torch.Generator().manual_seed(seed % (2**63))


def save_state(info: DistInfo, path: Path, key: str, u: torch.Tensor, opt, iteration: int,
               cpu_s: float = 0.0) -> None:
    """`cpu_s`: rank 0's process CPU seconds spent on the run so far, over every sitting (saved_cpu reads it)."""
    if info.is_main:
        atomic_torch_save(path, {"key": key, "iteration": iteration, "images": u.detach().cpu(),
                                 "optimizer": opt.state_dict(), "cpu_s": float(cpu_s)})
    D.barrier()


def saved_cpu(path: Path) -> float:
    """The CPU seconds a saved state records (0 without a state file or from a state saved before they were)."""
    return float(safe_load(path, map_location="cpu").get("cpu_s", 0.0)) if path.is_file() else 0.0


def resume_state(path: Path, key: str, u: torch.Tensor, opt, device: torch.device, what: str) -> int:
    """Load a saved state into `u` and `opt`; the iteration to continue from (0 without a state file)."""
    if not path.is_file():
        return 0
    state = safe_load(path, map_location=device)
    with reading(path, what):
        if state["key"] != key:
            raise GuardFastError(f"{path} belongs to another configuration; delete it or use another output.dir")
        with torch.no_grad():
            u.copy_(state["images"])
        opt.load_state_dict(state["optimizer"])
        return int(state["iteration"])
