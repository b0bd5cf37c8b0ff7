"""Crash-safe writes: every file lands complete or not at all (write to a temp file, fsync, rename)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from guard_fast.runtime.runfolder import check_write


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


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
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
