"""What a study carries of an unfinished job: enough of its folder for a new checkout to resume where it stopped.

The finished-job carry (carry.py) keeps a job's small files once the whole job is done. Some jobs are longer than a
sitting (issue 29's preset: about 13 CPU h per seed in one pipeline call), and runs_dir is lost after each sitting,
so without this no such job could ever finish. While jobs run, each running job's folder is copied to
`<carry>/partial/<job>/` every `every_s` seconds and when the study stops (a gate, an error, an interrupt):
- every file of a finished stage except its `checkpoints/` (its outputs are what the later stages read);
- every file of an unfinished stage, with only the checkpoint its `checkpoints/latest.json` names (the tag first,
  latest.json after it), and its single-file states (DC's, MTT's `state.pt`) as they are;
- never locks or hidden files (a writer's temp files).
Files are copied only when their size or mtime changed (an expert trajectory of a few MB is copied once); record
files (`stage.json`, `latest.json`) after the files they vouch for, stale files removed after that, and
`partial.json` (the job key, bytes) last. A copy that would exceed `max_mb` is not made (one warning line).

A new checkout copies a partial job back into runs_dir when its key matches the job and runs_dir has no folder for
it; the pipeline's stage cache then skips the finished stages and resumes the unfinished one from its checkpoint
(tests/study/test_carry_partial.py: the resumed job's outputs equal an uninterrupted run's). A finished job's
partial copy is deleted, since carry.py's copy replaces it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from guard_fast.runtime.io import atomic_json
from guard_fast.runtime.periodic import Periodic
from guard_fast.runtime.stagecache import KEY_FILE, STAGE_FILE

PARTIAL, RECORD = "partial", "partial.json"
CKPT, LATEST = "checkpoints", "latest.json"
COMMIT_FILES = {STAGE_FILE, LATEST}


def _stage_dirs(root: Path) -> set[Path]:
    """Folders under `root` that hold a stage (KEY_FILE is written when a stage starts)."""
    return {p.parent for p in root.rglob(KEY_FILE)}


def wanted_files(root: Path) -> list[Path]:
    """The files of job folder `root` a resume needs, relative to it, record files last (see the module doc)."""
    finished = {d for d in _stage_dirs(root) if (d / STAGE_FILE).is_file()}
    out: list[Path] = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or p.is_symlink() or any(part.startswith(".") for part in rel.parts):
            continue
        if rel.suffix in (".lock", ".tmp"):
            continue
        if CKPT in rel.parts[:-1]:
            ckpt = root.joinpath(*rel.parts[: rel.parts.index(CKPT) + 1])
            if ckpt.parent in finished or not _in_latest(ckpt, rel.relative_to(ckpt.relative_to(root))):
                continue
        out.append(rel)
    return sorted(out, key=lambda r: (r.name in COMMIT_FILES, str(r)))


def _in_latest(ckpt: Path, rel: Path) -> bool:
    """Whether `rel` (relative to a checkpoints/ folder) is latest.json or inside the tag it names."""
    if rel == Path(LATEST):
        return True
    try:
        tag = json.loads((ckpt / LATEST).read_text())["tag"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return rel.parts[0] == tag


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:  # gone since it was listed (a pruned checkpoint)
        return None


def _same(src: Path, dst: Path) -> bool:
    try:
        a, b = src.stat(), dst.stat()
    except OSError:
        return False
    return a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns


def _copy(src: Path, dst: Path) -> None:
    """Atomic copy keeping the mtime (what _same compares)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def save(runs_dir: Path, carry: Path, job: str, key: dict[str, Any], max_mb: float) -> int | None:
    """Bring <carry>/partial/<job>/ up to date with runs_dir/<job>; the bytes it holds, or None when skipped (no
    folder yet, or over max_mb)."""
    src, dst = runs_dir / job, carry / PARTIAL / job
    if not src.is_dir():
        return None
    sizes = {rel: n for rel in wanted_files(src) if (n := _size(src / rel)) is not None}
    files, size = list(sizes), sum(sizes.values())
    if size > max_mb * 2**20:
        print(f"warning: {src} holds {size / 2**20:.1f} MB to resume from, over carry_partial_mb = {max_mb:g}: "
              "not carried (raise it to carry this job unfinished)", flush=True)
        return None
    for rel in files:
        if not _same(src / rel, dst / rel):
            try:
                _copy(src / rel, dst / rel)
            except FileNotFoundError:  # replaced or pruned while listed (an old checkpoint): the next round has it
                continue
    keep = set(files) | {Path(RECORD)}
    for p in sorted(dst.rglob("*"), reverse=True):
        rel = p.relative_to(dst)
        if p.is_file() and rel not in keep:
            p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    atomic_json(dst / RECORD, {"key": key, "bytes": size})
    return size


def restore(runs_dir: Path, carry: Path, job: str, key: dict[str, Any]) -> bool:
    """Copy a partial job back into runs_dir when its key matches and runs_dir has no folder for it (a new
    checkout); True if it did."""
    src, dst = carry / PARTIAL / job, runs_dir / job
    try:
        record = json.loads((src / RECORD).read_text())
    except (OSError, ValueError):
        return False
    if record.get("key") != key or dst.exists():
        return False
    for rel in wanted_files(src):
        if rel != Path(RECORD):
            _copy(src / rel, dst / rel)
    return True


def drop(carry: Path, job: str) -> None:
    """A job finished: its partial copy is no longer needed."""
    shutil.rmtree(carry / PARTIAL / job, ignore_errors=True)


class Saver(Periodic):
    """Keeps every running job's partial copy up to date every `every_s` seconds on a daemon thread, and once more
    on exit (interrupts included); `finished(job)` drops a job's copy and stops carrying it."""

    def __init__(self, runs_dir: Path, carry: Path, keys: dict[str, dict[str, Any]], every_s: float, max_mb: float):
        self.runs_dir, self.carry, self.keys, self.max_mb = runs_dir, carry, dict(keys), max_mb
        super().__init__(self._save_all, every_s, "study-carry-partial")

    def _save_all(self) -> None:
        for job, key in self.keys.items():
            save(self.runs_dir, self.carry, job, key, self.max_mb)

    def finished(self, job: str) -> None:
        with self.lock:
            self.keys.pop(job, None)
            drop(self.carry, job)
