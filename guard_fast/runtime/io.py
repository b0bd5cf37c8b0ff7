"""Crash-safe writes: every file lands complete or not at all (write to a temp file, fsync, rename)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from guard_fast.runtime.errors import GuardFastError
from guard_fast.runtime.runfolder import check_write, current_stage


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call `write(fileobj)` on a temp file beside `path`, then atomically rename it into place. A path under an open
    run folder must resolve inside it (a symlinked subfolder cannot redirect the write: runtime/runfolder.py)."""
    path = Path(path)
    check_write(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_json(path: str | Path, obj: Any) -> Path:
    return atomic_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def non_finite(obj: Any) -> int:
    """How many NaN/inf values `obj` holds: floating tensors and Python floats, in nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return int((~torch.isfinite(obj)).sum()) if obj.is_floating_point() or obj.is_complex() else 0
    if isinstance(obj, float):
        return 0 if math.isfinite(obj) else 1
    if isinstance(obj, dict):
        return sum(non_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(non_finite(v) for v in obj)
    return 0


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    """Every torch artifact (weights, checkpoints of distillers, expert trajectories, image sets, soft labels) is
    written here, after a check: one NaN/inf value stops the stage with one line naming it and what is kept."""
    if bad := non_finite(obj):
        path = Path(path)
        kept = f"the previous {path.name} is kept" if path.exists() else f"{path.name} was not written"
        raise GuardFastError(f"{current_stage() or 'guard-fast'}: {path} would hold {bad} non-finite values "
                             "(NaN/inf: the run diverged; a learning rate or coefficient too large?); "
                             f"{kept}, and {path.parent} keeps the last good state written before")
    return atomic_write(path, lambda f: torch.save(obj, f))


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def saved_with_key(path: str | Path, key: str) -> bool:
    """True if `path` is a complete torch file whose "key" entry equals `key` (resumable stages skip such work;
    a missing, truncated or foreign file means: compute it again)."""
    if not Path(path).is_file():
        return False
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("key") == key
    except Exception:
        return False


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """One JSON object per line; a line is written whole with one write() call."""
    path = Path(path)
    check_write(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
