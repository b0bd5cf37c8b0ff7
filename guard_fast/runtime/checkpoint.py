"""Crash-safe DeepSpeed checkpoints: a checkpoint counts only once complete. DeepSpeed writes a tag folder on every
rank, then rank 0 atomically rewrites `latest.json` to name it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from guard_fast.runtime import distributed as D
from guard_fast.runtime.errors import GuardFastError
from guard_fast.runtime.io import atomic_json


class Checkpointer:
    """Checkpoints under `folder/<tag>/` (DeepSpeed's model, optimizer, scheduler state; ZeRO shards per rank) plus
    `rng_rank<r>.pt`; `latest.json` names the newest complete one. Keeps the `keep` newest."""

    def __init__(self, folder: str | Path, engine, keep: int = 2):
        self.folder, self.engine, self.keep = Path(folder), engine, keep

    def save(self, step: int, state: dict[str, Any]) -> None:
        if (self.latest() or {}).get("step") == step:
            # Already saved (e.g. a step-interval save that is also an epoch end): rewriting the files latest.json
            # points to would leave no complete checkpoint if the process died mid-write.
            return
        tag = f"step{step:09d}"
        self.engine.save_checkpoint(str(self.folder), tag=tag, client_state={"guard_fast": state},
                                    save_latest=False)
        torch.save({"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   self.folder / tag / f"rng_rank{D.rank()}.pt")
        D.barrier()  # every rank has written its part
        if D.rank() == 0:
            atomic_json(self.folder / "latest.json", {"tag": tag, "step": step})
            tags = sorted(p.name for p in self.folder.glob("step*") if p.is_dir())
            for old in tags[: max(0, len(tags) - self.keep)]:
                shutil.rmtree(self.folder / old, ignore_errors=True)
        D.barrier()

    def latest(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.folder / "latest.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def load(self) -> tuple[int, dict[str, Any]] | None:
        """Restore the newest complete checkpoint into the engine; (step, client state) or None if there is none."""
        latest = self.latest()
        if latest is None:
            return None
        tag = latest["tag"]
        path, client = self.engine.load_checkpoint(str(self.folder), tag=tag, load_module_strict=True)
        if path is None:
            raise GuardFastError(f"checkpoint {self.folder / tag} could not be loaded (incomplete or corrupt)")
        rng = torch.load(self.folder / tag / f"rng_rank{D.rank()}.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
        return latest["step"], client["guard_fast"]
