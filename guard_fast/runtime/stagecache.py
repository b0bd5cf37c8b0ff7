"""Cached, resumable pipeline stages.

A stage's key hashes its resolved config and the completion ids of the stages it reads from. A finished stage
writes `stage.json` (key, completion id, outputs) last and atomically, so:
- same key and outputs present -> skipped;
- upstream rerun -> new completion id -> every stage that depends on it reruns;
- output deleted, config changed or `--force STAGE` -> that stage reruns (from scratch);
- killed mid-stage (folder without stage.json, same key) -> rerun with resume=True, the stage's own resume logic
  picks up its checkpoints / finished chunks; the time it ran before it stopped (`stage.prior`, written as it
  stops) is added, so stage.json's `seconds` is its wall time over every sitting.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from guard_fast.runtime import distributed as D
from guard_fast.runtime.io import atomic_json

STAGE_FILE = "stage.json"
KEY_FILE = "stage.key"
"""written when a stage starts: the key an interrupted run of it resumes under"""
PRIOR_FILE = "stage.prior"
"""wall seconds an interrupted stage had run before (written when it stops, added when it resumes); a SIGKILL
loses that sitting's time"""


def stage_key(stage: str, config: dict[str, Any], inputs: list[str]) -> str:
    blob = json.dumps({"stage": stage, "config": config, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class StageRecord:
    name: str
    folder: Path
    key: str
    completion_id: str
    outputs: dict[str, str] = field(default_factory=dict)
    """output name -> path relative to the stage folder"""
    skipped: bool = False
    seconds: float = 0.0
    """wall time of the run that made the outputs (for a skipped stage: when it ran, read from stage.json)"""

    def path(self, output: str) -> Path:
        return self.folder / self.outputs[output]


def _read(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / STAGE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


class StageRunner:
    """Runs stages in order, skipping the cached ones; prints one line per stage with elapsed time and ETA."""

    def __init__(self, total: int, force: set[str] | None = None, is_main: bool = True, log=print):
        self.total, self.force, self.is_main, self.log = total, set(force or ()), is_main, log
        self.done = 0
        self.start = time.time()
        self.ran_seconds: list[float] = []
        self.records: list[StageRecord] = []

    def _eta(self) -> str:
        left = self.total - self.done
        if not self.ran_seconds or left <= 0:
            return "?" if left > 0 else "0 s"
        return f"{sum(self.ran_seconds) / len(self.ran_seconds) * left:.0f} s"

    def run(self, name: str, folder: Path, config: dict[str, Any], upstream: list[StageRecord],
            fn: Callable[[Path, bool], dict[str, str]], kind: str | None = None) -> StageRecord:
        """`fn(folder, resume) -> {output name: relative path}` runs the stage (on every rank); `kind` is the stage
        type matched against --force (defaults to `name`)."""
        folder = Path(folder)
        key = stage_key(kind or name, config, [u.completion_id for u in upstream])
        have = _read(folder)
        cached = (have is not None and have.get("key") == key and (kind or name) not in self.force
                  and all((folder / p).exists() for p in have.get("outputs", {}).values()))
        D.barrier()  # every rank decided from the same files before anyone writes
        self.done += 1
        prefix = f"[{self.done}/{self.total}] {name}"
        if cached:
            rec = StageRecord(name, folder, key, have["completion_id"], have["outputs"], skipped=True,
                              seconds=float(have.get("seconds", 0.0)))  # the time it took when it ran
            self.log(f"{prefix}: cached (key {key}), skipped")
            self.records.append(rec)
            return rec
        # Resume only an interrupted run of the same config; anything else starts clean.
        resume = folder.exists() and have is None and _read_key(folder) == key and (kind or name) not in self.force
        if not resume and self.is_main and folder.exists():
            shutil.rmtree(folder)
        D.barrier()
        if self.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_json(folder / KEY_FILE, {"key": key})
        D.barrier()
        self.log(f"{prefix}: {'resuming' if resume else 'running'} (elapsed {time.time() - self.start:.0f} s, "
                 f"ETA {self._eta()})")
        t0, before = time.time(), _prior_seconds(folder) if resume else 0.0
        try:
            outputs = fn(folder, resume)
        except BaseException:  # interrupted, failed or stopped (SIGTERM in a study worker): keep its time so far
            if self.is_main:
                atomic_json(folder / PRIOR_FILE, {"seconds": round(before + time.time() - t0, 2)})
            raise
        seconds = before + time.time() - t0  # over every sitting of a resumed stage
        completion = D.broadcast_object(uuid.uuid4().hex)
        rec = StageRecord(name, folder, key, completion, outputs, seconds=seconds)
        if self.is_main:
            atomic_json(folder / STAGE_FILE, {"stage": kind or name, "key": key, "completion_id": completion,
                                              "outputs": outputs, "seconds": round(seconds, 2),
                                              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        D.barrier()
        self.ran_seconds.append(seconds)
        self.log(f"{prefix}: done in {seconds:.1f} s (elapsed {time.time() - self.start:.0f} s, ETA {self._eta()})")
        self.records.append(rec)
        return rec


def _prior_seconds(folder: Path) -> float:
    try:
        return float(json.loads((folder / PRIOR_FILE).read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def _read_key(folder: Path) -> str | None:
    try:
        return json.loads((folder / KEY_FILE).read_text())["key"]
    except (OSError, json.JSONDecodeError, KeyError):
        return None
