"""Crash-safe DeepSpeed checkpoints: a checkpoint counts only once complete. DeepSpeed writes a tag folder on every
rank, then rank 0 marks it complete (`<tag>/complete.json`) and atomically rewrites `latest.json` to name it.

Per-rank state: DeepSpeed saves rank 0's module, so BatchNorm running statistics (which differ per rank: each rank
normalizes its own batches, and GUARD's eval-mode forwards read them) and the RNG streams go to `<tag>/rank<r>.pt`
from every rank. complete.json and latest.json record the world size and the global batch; a run resumes only on the
same ones (`check_resumable`; docs/cluster.md says why another world size is refused rather than re-sharded).

Every file is read back with `weights_only=True` (`safe_load`): a run folder is user-supplied input, and DeepSpeed's
own loader unpickles arbitrary objects. A garbled `latest.json` falls back to the newest complete checkpoint (said on
stderr); a truncated or tampered file is refused with one line naming it.
"""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from guard_fast.runtime import distributed as D
from guard_fast.runtime.errors import CheckpointError, GuardFastError
from guard_fast.runtime.io import atomic_json
from guard_fast.runtime.runfolder import inside

COMPLETE = "complete.json"


def _deepspeed_globals() -> list[Any]:
    """The plain-data DeepSpeed classes its ZeRO optimizer states hold (allowlisted; nothing else is)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location: Any = None) -> Any:
    """torch.load(weights_only=True); a truncated file or one holding code raises CheckpointError naming it."""
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: refused, it holds objects other than tensors and plain data "
                              "(loaded with weights_only=True)") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (incomplete checkpoint)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt ({str(e).splitlines()[0][:160]})") from None


def _valid(entry: Any) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("tag"), str) and isinstance(entry.get("step"), int)


class Checkpointer:
    """Checkpoints under `folder/<tag>/` (DeepSpeed's model, optimizer, scheduler state; ZeRO shards per rank) plus
    `rank<r>.pt` (RNG, buffers); `latest.json` names the newest complete one. Keeps the `keep` newest."""

    def __init__(self, folder: str | Path, engine, keep: int = 2):
        self.folder, self.engine, self.keep = Path(folder), engine, keep
        # DeepSpeed reads every checkpoint file through its checkpoint engine's load (weights_only=False)
        engine.checkpoint_engine.load = safe_load
        self.layout = {"world_size": D.world_size(), "global_batch": engine.train_batch_size(),
                       "micro_batch": engine.train_micro_batch_size_per_gpu(),
                       "grad_accum": engine.gradient_accumulation_steps()}
        """how this run is laid out over ranks; recorded with every checkpoint"""

    def rank_state(self) -> dict[str, Any]:
        """This rank's own state: RNG streams and the module's buffers (BatchNorm running statistics)."""
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "buffers": {k: b.detach().clone() for k, b in self.engine.module.named_buffers()}}

    def restore_rank_state(self, path: Path) -> None:
        state = safe_load(path, map_location="cpu")
        buffers = dict(self.engine.module.named_buffers())
        if not isinstance(state, dict) or set(state.get("buffers", {})) != set(buffers):
            raise CheckpointError(f"{path}: its buffers do not match this model's (another model config?)")
        with torch.no_grad():
            for k, b in buffers.items():
                b.copy_(state["buffers"][k])
        torch.set_rng_state(state["torch"])
        if state["cuda"]:
            torch.cuda.set_rng_state_all(state["cuda"])

    def save(self, step: int, state: dict[str, Any]) -> None:
        if (self.latest() or {}).get("step") == step:
            # Already saved (e.g. a step-interval save that is also an epoch end): rewriting the files latest.json
            # points to would leave no complete checkpoint if the process died mid-write.
            return
        tag = f"step{step:09d}"
        try:
            self.engine.save_checkpoint(str(self.folder), tag=tag, client_state={"guard_fast": state},
                                        save_latest=False)
            torch.save(self.rank_state(), self.folder / tag / f"rank{D.rank()}.pt")
        except OSError as e:  # disk full, quota, permissions: latest.json still names the previous checkpoint
            shutil.rmtree(self.folder / tag, ignore_errors=True)
            last = self.latest()
            raise CheckpointError(f"checkpoint {self.folder / tag} not written ({e.strerror or e}); "
                                  f"{self.folder / 'latest.json'} still names "
                                  f"{last['tag'] if last else 'no checkpoint'}") from None
        D.barrier()  # every rank has written its part
        if D.rank() == 0:
            entry = {"tag": tag, "step": step, **self.layout}
            atomic_json(self.folder / tag / COMPLETE, entry)
            atomic_json(self.folder / "latest.json", entry)
            tags = sorted(p.name for p in self.folder.glob("step*") if p.is_dir())
            for old in tags[: max(0, len(tags) - self.keep)]:
                shutil.rmtree(self.folder / old, ignore_errors=True)
        D.barrier()

    def latest(self) -> dict[str, Any] | None:
        try:
            entry = json.loads((self.folder / "latest.json").read_text())
        except (OSError, ValueError):
            return None
        return entry if _valid(entry) else None

    def newest_complete(self) -> dict[str, Any] | None:
        """The highest-step tag folder holding a readable completion marker."""
        for tag in sorted((p for p in self.folder.glob("step*") if p.is_dir()), reverse=True):
            try:
                entry = json.loads((tag / COMPLETE).read_text())
            except (OSError, ValueError):
                continue
            if _valid(entry) and entry["tag"] == tag.name:
                return entry
        return None

    def resume_point(self) -> dict[str, Any] | None:
        """What --resume continues from: latest.json, or (garbled latest.json) the newest complete checkpoint."""
        path = self.folder / "latest.json"
        if not path.exists():
            return None
        latest = self.latest()
        if latest is not None and inside(self.folder, latest["tag"], f"{path}: tag").is_dir():
            return latest
        fallback = self.newest_complete()
        if fallback is None:
            raise CheckpointError(f"{path} is unreadable or names a missing checkpoint, and {self.folder} holds no "
                                  "complete checkpoint to fall back to; start again with --output.overwrite=true "
                                  "or a new output.dir")
        if D.rank() == 0:
            print(f"warning: {path} is unreadable or names a missing checkpoint; resuming from the newest complete "
                  f"checkpoint {fallback['tag']} (step {fallback['step']})", file=sys.stderr)
        return fallback

    def check_resumable(self, point: dict[str, Any]) -> dict[str, Any]:
        """`point` if it was written with this run's world size and global batch, else one line saying why not."""
        if point.get("world_size") is None:
            raise CheckpointError(f"checkpoint {self.folder / point['tag']} does not record its world size (written "
                                  "by an older guard_fast); start again with --output.overwrite=true")
        theirs = {k: point.get(k) for k in self.layout}
        if theirs["world_size"] != self.layout["world_size"] or theirs["global_batch"] != self.layout["global_batch"]:
            raise CheckpointError(
                f"checkpoint {self.folder / point['tag']} was written by {theirs['world_size']} rank(s) with a global "
                f"batch of {theirs['global_batch']}; this run has {self.layout['world_size']} rank(s) and a global "
                f"batch of {self.layout['global_batch']}: resume with the same nodes x processes per node and batch "
                "settings, or start a new output.dir (docs/cluster.md)")
        return point

    def resumable_point(self) -> dict[str, Any] | None:
        """Rank 0's decision for --resume: the resume point, checked against this run's layout (None = fresh)."""
        point = self.resume_point()
        return None if point is None else self.check_resumable(point)

    def check_files(self, point: dict[str, Any]) -> None:
        """This rank's own files of the checkpoint exist (before any rank starts a collective load)."""
        path = self.folder / point["tag"] / f"rank{D.rank()}.pt"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (incomplete checkpoint, or this rank cannot see the run folder)")

    def load(self, point: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]] | None:
        """Restore checkpoint `point` (default: the resume point) into the engine and this rank's state;
        (step, client state), or None if there is none."""
        latest = self.resume_point() if point is None else point
        if latest is None:
            return None
        tag = latest["tag"]
        try:
            path, client = self.engine.load_checkpoint(str(self.folder), tag=tag, load_module_strict=True)
        except GuardFastError:
            raise
        except Exception as e:  # shape/key mismatch, missing shard, DeepSpeed assertion
            raise CheckpointError(f"checkpoint {self.folder / tag} could not be loaded: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
        if path is None or not isinstance((client or {}).get("guard_fast"), dict):
            raise CheckpointError(f"checkpoint {self.folder / tag} could not be loaded (incomplete or corrupt)")
        self.restore_rank_state(self.folder / tag / f"rank{D.rank()}.pt")
        return latest["step"], client["guard_fast"]
