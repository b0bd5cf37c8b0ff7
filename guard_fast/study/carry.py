"""What a study carries across checkouts: the small files of every finished job, kept under results_dir/carry/.

`runs_dir` (teachers, images, students, checkpoints) is never committed, yet the study of record takes longer than
one sitting on one machine. So after each finished job (one pipeline call: a seed and a set of row settings, or a
selection candidate) its folder's small files (stage records, configs, results, evaluations: no weights, images or
checkpoints) are copied to `<carry>/<job>/` with `done.json` naming what the job was (its fingerprint, methods and
IPCs). A new checkout restores a carried job into runs_dir when that record matches the job it is about to run,
marks it `carried.json`, and does not run it: the report and the gates read the restored files. A carried folder
whose job changed is deleted before the job runs, so no stage record is ever trusted without its weights.
The study's own files (the selection ledger, the registered plan, the gates cache) are carried the same way.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from guard_fast.pipeline import PipelineConfig, key_dict
from guard_fast.runtime import distributed as D
from guard_fast.runtime.distributed import DistInfo
from guard_fast.runtime.io import atomic_json
from guard_fast.study import carry_partial as partial
from guard_fast.study.config import StudyConfig
from guard_fast.study.workers import Job

MAX_BYTES = 256 * 1024
SKIP_DIRS = {"checkpoints", "images", "crops"}
SKIP_SUFFIXES = {".pt", ".png", ".jpg", ".beton", ".npy", ".npz", ".lock", ".tmp"}
DONE, MARK = "done.json", "carried.json"
STUDY_FILES = ("cells.json", "plan.json", "gates-cache.json")


def small_files(folder: Path) -> list[Path]:
    """Files under `folder` worth carrying, relative to it (sorted)."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if (p.is_file() and not p.is_symlink() and p.suffix not in SKIP_SUFFIXES and not p.name.startswith(".")
                and not SKIP_DIRS & set(rel.parts[:-1]) and p.stat().st_size <= MAX_BYTES and p.name != MARK):
            out.append(rel)
    return out


def save(runs_dir: Path, carry: Path, job: str, key: dict[str, Any]) -> None:
    """Copy a finished job's small files to <carry>/<job>/ (replacing an older copy), then done.json: a copy
    without done.json is incomplete and never restored."""
    src, dst = runs_dir / job, carry / job
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel in small_files(src):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, tmp / rel)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    tmp.rename(dst)
    atomic_json(dst / DONE, key)


def carried_key(carry: Path, job: str) -> dict[str, Any] | None:
    try:
        return json.loads((carry / job / DONE).read_text())
    except (OSError, ValueError):
        return None


def restore(runs_dir: Path, carry: Path, job: str, key: dict[str, Any]) -> bool:
    """True when this job need not run: its carried copy matches `key` and is (now) in runs_dir. A job folder that a
    real run made is left alone (False: its own stage cache decides); a carried folder of another key is deleted."""
    folder = runs_dir / job
    carried = (folder / MARK).is_file()
    if carried_key(carry, job) != key:
        if carried:
            shutil.rmtree(folder)
        return False
    if carried:
        return True
    if folder.exists():
        return False
    for rel in small_files(carry / job):
        if rel.name != DONE:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(carry / job / rel, folder / rel)
    atomic_json(folder / MARK, key)
    return True


def save_study_files(runs_dir: Path, carry: Path) -> None:
    for name in STUDY_FILES:
        if (runs_dir / name).is_file():
            carry.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(runs_dir / name, carry / name)


def restore_study_files(runs_dir: Path, carry: Path) -> None:
    """The carried ledger, registered plan and gates cache, where runs_dir has none (a new checkout)."""
    for name in STUDY_FILES:
        if (carry / name).is_file() and not (runs_dir / name).exists():
            runs_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(carry / name, runs_dir / name)


# ------------------------------------------------------------------------------------------- the study's side
def fingerprint(pc: PipelineConfig) -> str:
    """What a pipeline call's numbers depend on besides methods/ipc/folder (a folder's results count only if it
    matches the current config)."""
    d = key_dict(pc)
    for k in ("methods", "ipc", "force"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def job_key(pc: PipelineConfig) -> dict[str, Any]:
    """What a carried job must match to be restored instead of run (guard_fast/study/carry.py)."""
    return {"fingerprint": fingerprint(pc), "methods": list(pc.methods), "ipc": list(pc.ipc)}


def carry_dir(cfg: StudyConfig) -> Path | None:
    if cfg.carry_dir == "off":
        return None
    return Path(cfg.carry_dir) if cfg.carry_dir else Path(cfg.results_dir) / "carry"


def jobs_to_run(cfg: StudyConfig, info: DistInfo, jobs: list[Job]) -> list[Job]:
    """The jobs that must run: one whose carried copy matches is restored into runs_dir instead (rank 0 decides)."""
    folder = carry_dir(cfg)
    if folder is None:
        return jobs
    keep = None
    if info.is_main:
        keep = [not restore(Path(cfg.runs_dir), folder, j.name, job_key(j.config)) for j in jobs]
        skipped = len(jobs) - sum(keep)
        if skipped:
            print(f"{skipped} finished job(s) restored from {folder} (not run again)", flush=True)
        resumed = [j.name for j, k in zip(jobs, keep, strict=True)
                   if k and partial.restore(Path(cfg.runs_dir), folder, j.name, job_key(j.config))]
        if resumed:
            print(f"{len(resumed)} unfinished job(s) restored from {folder / partial.PARTIAL} (resumed where they "
                  f"stopped): {', '.join(resumed)}", flush=True)
    keep = D.broadcast_object(keep)
    return [j for j, k in zip(jobs, keep, strict=True) if k]


def carry_job(cfg: StudyConfig, info: DistInfo, job: Job, saver: partial.Saver | None = None) -> None:
    """Rank 0: keep a finished job's small files (and the study's ledger, plan, gates cache) for a new checkout;
    its partial copy (if any) is dropped."""
    folder = carry_dir(cfg)
    if folder is not None and info.is_main:
        save(Path(cfg.runs_dir), folder, job.name, job_key(job.config))
        save_study_files(Path(cfg.runs_dir), folder)
        if saver is not None:
            saver.finished(job.name)
        else:
            partial.drop(folder, job.name)


def partial_saver(cfg: StudyConfig, info: DistInfo, jobs: list[Job]) -> partial.Saver | None:
    """Rank 0's Saver of the unfinished jobs' folders (carry_partial.py); None when nothing is carried."""
    folder = carry_dir(cfg)
    if folder is None or not info.is_main or cfg.carry_partial_mb == 0:
        return None
    return partial.Saver(Path(cfg.runs_dir), folder, {j.name: job_key(j.config) for j in jobs}, cfg.carry_every_s,
                         cfg.carry_partial_mb)
