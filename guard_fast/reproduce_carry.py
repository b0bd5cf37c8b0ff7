"""What `guard-fast reproduce` carries across checkouts: each DC / DSA distillation of a cell, finished or not.

A distillation at the authors' protocol takes 11-12 CPU hours here, longer than one sitting on one machine, and the
cache folder (`--root`, runs/) is never committed. So while a reproduction runs, each distillation folder is copied
to `<report>-carry/<cell>/draw<d>/<method>/` (every `every_s` seconds, after each unit and at the end): a finished
one whole (its set is what the draw's other students train on), an unfinished one without `result.json` (its run
records and the newest `state.pt`, which the distiller saves every `ckpt_every` iterations). A new checkout copies a
carried folder back when it is further along than its own (finished beats unfinished, then the larger saved
iteration), so the distillation resumes from the carried iteration and gives the images of an uninterrupted run
(dc.py's resume contract), and a finished set is not distilled again. `carry.json` in each copy names the preset
and overrides it was made under; one made under others is refused, as carried units are (reproduce.restore_units).
IPC 1 / 10 sets are tens of KB / about 1 MB.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from guard_fast.runtime.checkpoint import safe_load
from guard_fast.runtime.errors import GuardFastError
from guard_fast.runtime.io import atomic_json
from guard_fast.runtime.periodic import Periodic

RECORD = "carry.json"
DONE, STATE = "result.json", "state.pt"


def carry_dir(report: Path) -> Path:
    """results/reproduce-fashion-mnist -> results/reproduce-fashion-mnist-carry"""
    return report.with_name(report.name + "-carry")


def progress(folder: Path) -> tuple[int, int] | None:
    """(1, 0) for a finished distillation, (0, saved iteration) for an unfinished one, None for nothing to resume."""
    if (folder / DONE).is_file():
        return (1, 0)
    if (folder / STATE).is_file():
        return (0, int(safe_load(folder / STATE, map_location="cpu")["iteration"]))
    return None


def _copy(src: Path, dst: Path, finished: bool, record: dict[str, Any] | None) -> None:
    """Replace `dst` by the files of `src` (hidden files and locks left out; result.json only if `finished`, read
    before copying, so a set whose distiller is still writing it is carried as unfinished)."""
    tmp, old = dst.with_name(dst.name + ".partial"), dst.with_name(dst.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts) or (rel.name == DONE and not finished):
            continue
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, tmp / rel)
    tmp.mkdir(parents=True, exist_ok=True)
    if record is not None:
        atomic_json(tmp / RECORD, record)
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def distillations(root: Path, names: tuple[str, ...]) -> list[Path]:
    """The distillation folders <cell>/draw<d>/<name>/ under `root` (not the students beside them)."""
    return sorted(p for p in root.glob("*/draw*/*") if p.is_dir() and p.name in names)


def save(root: Path, carry: Path, record: dict[str, Any], names: tuple[str, ...]) -> int:
    """Copy every distillation folder under `root` that is further along than its carried copy; the number
    copied."""
    copied = 0
    for folder in distillations(root, names):
        mine = progress(folder)
        if mine is None:
            continue
        dst = carry / folder.relative_to(root)
        theirs = progress(dst) if dst.is_dir() else None
        if theirs is None or mine > theirs:
            _copy(folder, dst, finished=mine[0] == 1, record=record)
            copied += 1
    return copied


def restore(root: Path, carry: Path, cells: list[str], record: dict[str, Any], names: tuple[str, ...]) -> int:
    """Copy back into `root` each carried distillation of `cells` that is further along than the local one; a
    carried folder made under another preset or other overrides is refused. The number restored."""
    restored = 0
    for dst in distillations(carry, names):
        rec_path = dst / RECORD
        if dst.parts[-3] not in cells or not rec_path.is_file():
            continue  # another cell, or an interrupted copy
        made = safe_json(rec_path)
        if (made.get("preset"), made.get("overrides")) != (record["preset"], record["overrides"]):
            raise GuardFastError(f"{rec_path}: distilled with preset {made.get('preset')} and overrides "
                                 f"{made.get('overrides')}; this run asks for {record['preset']} "
                                 f"{record['overrides']}: pass another --report (and --root)")
        local = root / dst.relative_to(carry)
        theirs, mine = progress(dst), progress(local) if local.is_dir() else None
        if theirs is not None and (mine is None or theirs > mine):
            _copy(dst, local, finished=theirs[0] == 1, record=None)
            (local / RECORD).unlink(missing_ok=True)
            restored += 1
    if restored:
        print(f"restored {restored} distillation(s) from {carry}", flush=True)
    return restored


def safe_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GuardFastError(f"{path}: unreadable ({type(e).__name__}); delete that folder to distil again") from None


class Saver(Periodic):
    """Calls save() every `every_s` seconds on a daemon thread while a reproduction runs (the distillers run in
    worker processes or in this process's main thread; their state files are replaced atomically)."""

    def __init__(self, root: Path, carry: Path, record: dict[str, Any], names: tuple[str, ...], every_s: float):
        super().__init__(lambda: save(root, carry, record, names), every_s, "reproduce-carry")
