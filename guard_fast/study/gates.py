"""Stage gates: the calibration each stage must reach before its numbers may enter the study (issue 30).

Declared in the study config (`[gates]`), measured from the finished stages on disk, printed in the report:
- `teacher_min`: a plain teacher's (squeeze objective `none`) accuracy on the test split, from its result.json
  (the squeeze stage's final validation over the whole split);
- `guard_teacher_max_drop`: a GUARD teacher's test accuracy is at most this far below the plain teacher of the
  same seed;
- `recovered_min`: the teacher classifies this fraction of the images recovered from it (top-1 on the stored 8-bit
  set, no crop; the teacher and data settings are the recover stage's own config.json), measured here and cached
  by the set's content hash;
- `kd_min`: the clean accuracy of the `kd_row` student (KD on a relabelled real subset: the recipe check).

A measured value below its threshold stops the study with one line naming the gate, the stage, the measured value
and the threshold (`GateError`). A gate whose stage has not finished is simply not measured yet.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from guard_fast.runtime.errors import GuardFastError
from guard_fast.runtime.io import atomic_json
from guard_fast.runtime.stagecache import STAGE_FILE

RULES = {
    "teacher_min": "plain teacher's test accuracy >= threshold",
    "guard_teacher_max_drop": "plain teacher's minus GUARD teacher's test accuracy (same seed) <= threshold",
    "recovered_min": "teacher's top-1 on its own recovered images >= threshold",
    "kd_min": "KD recipe check: clean accuracy of the kd_row student >= threshold",
}
CACHE = "gates-cache.json"


class GateError(GuardFastError):
    """A stage below its gate: the study stops (exit code 3)."""

    exit_code = 3


def _finished(folder: Path) -> bool:
    return (folder / STAGE_FILE).is_file()


def teacher_accuracy(folder: Path) -> float | None:
    """Test accuracy that a finished squeeze stage recorded (None if unfinished or never validated)."""
    if not _finished(folder):
        return None
    val = json.loads((folder / "result.json").read_text()).get("val") or {}
    return val.get("clean")


@torch.no_grad()
def recovered_accuracy(folder: Path, cache: dict[str, Any]) -> float | None:
    """Top-1 of the recover stage's own teacher (its config.json: model settings and checkpoint, data) on the
    stage's images, in eval mode; `cache` maps the folder to {content_hash, accuracy} so each set is measured once."""
    from guard_fast.data.presets import resolve_dataset
    from guard_fast.data.synthetic import load_synthetic
    from guard_fast.models import ModelConfig, model_from_config
    from guard_fast.runtime.config import DataConfig, from_dict

    if not _finished(folder):
        return None
    manifest = json.loads((folder / "manifest.json").read_text())
    hit = cache.get(str(folder))
    if hit and hit["content_hash"] == manifest["content_hash"]:
        return hit["accuracy"]
    stage = json.loads((folder / "config.json").read_text())
    spec = resolve_dataset(from_dict(DataConfig, stage["data"]))
    model = model_from_config(from_dict(ModelConfig, stage["model"]), spec).eval()
    images = load_synthetic(folder, spec.num_classes)
    x = images.train_pixels(quantize=True)[:, : spec.input_shape[0]]  # (N, C, S, S) in [0, 1]
    correct = sum(int((model(x[i:i + 256]).argmax(1) == images.labels[i:i + 256]).sum())
                  for i in range(0, len(x), 256))
    acc = correct / len(x)
    cache[str(folder)] = {"content_hash": manifest["content_hash"], "accuracy": acc}
    return acc


def _result(gate: str, where: str, measured: float | None, threshold: float, ok: bool | None) -> dict[str, Any]:
    return {"gate": gate, "where": where, "measured": measured, "threshold": threshold, "ok": ok}


def measure_roots(gates: Any, roots: list[tuple[int, Path]], runs_dir: Path) -> list[dict[str, Any]]:
    """Every teacher / recover gate over the finished stages of these pipeline folders ((seed, folder) pairs)."""
    cache_path = runs_dir / CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    out: list[dict[str, Any]] = []
    plain: dict[int, float] = {}
    for seed, root in roots:
        acc = teacher_accuracy(root / "teachers" / "none")
        if acc is not None:
            plain.setdefault(seed, acc)
            if gates.teacher_min:
                out.append(_result("teacher_min", _rel(root / "teachers/none", runs_dir), acc, gates.teacher_min,
                                   acc >= gates.teacher_min))
    for seed, root in roots:
        acc = teacher_accuracy(root / "teachers" / "guard")
        if gates.guard_teacher_max_drop and acc is not None and seed in plain:
            drop = plain[seed] - acc
            out.append(_result("guard_teacher_max_drop", _rel(root / "teachers/guard", runs_dir), drop,
                               gates.guard_teacher_max_drop, drop <= gates.guard_teacher_max_drop))
        if gates.recovered_min:
            for folder in sorted(root.glob("*/ipc*/recover")):
                acc = recovered_accuracy(folder, cache)
                if acc is not None:
                    out.append(_result("recovered_min", _rel(folder, runs_dir), acc, gates.recovered_min,
                                       acc >= gates.recovered_min))
    if cache:
        atomic_json(cache_path, cache)
    return out


def measure_kd(gates: Any, kd_cells: dict[int, float]) -> list[dict[str, Any]]:
    """The KD recipe check from the kd_row student's clean accuracy per seed."""
    if not gates.kd_row or not gates.kd_min:
        return []
    return [_result("kd_min", f"{gates.kd_row}, seed {s}", acc, gates.kd_min, acc >= gates.kd_min)
            for s, acc in sorted(kd_cells.items())]


def failure_line(results: list[dict[str, Any]]) -> str | None:
    """One line for the first failed gate, or None when every measured gate holds."""
    bad = next((r for r in results if r["ok"] is False), None)
    if bad is None:
        return None
    cmp = "<=" if bad["gate"] == "guard_teacher_max_drop" else ">="
    return (f"gate {bad['gate']} failed at {bad['where']}: measured {bad['measured']:.4f}, required {cmp} "
            f"{bad['threshold']:.4f} ({RULES[bad['gate']]}); the study stops here")


def check(results: list[dict[str, Any]]) -> None:
    line = failure_line(results)
    if line:
        raise GateError(line)


def summary(results: list[dict[str, Any]], gates: Any) -> list[dict[str, Any]]:
    """Per declared gate: threshold, stages measured, the worst value, pass/fail (None: not measured yet)."""
    out = []
    for name, rule in RULES.items():
        threshold = getattr(gates, name)
        if not threshold or (name == "kd_min" and not gates.kd_row):
            continue
        rs = [r for r in results if r["gate"] == name]
        worst = None
        if rs:
            pick = max if name == "guard_teacher_max_drop" else min
            worst = pick(r["measured"] for r in rs)
        out.append({"gate": name, "rule": rule, "threshold": threshold, "stages": len(rs), "worst": worst,
                    "ok": None if not rs else all(r["ok"] for r in rs)})
    return out


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def interim_reporter(cfg: Any, gates: Callable[[], list[dict[str, Any]]],
                     report: Callable[[], dict[str, Any]], clock: Callable[[], float] = time.monotonic
                     ) -> Callable[[], str | None]:
    """The study's after_job (cfg: its StudyConfig): the gates over what is on disk after every job (their failed
    line, or None); the full report (charts included, seconds on a CPU) only when forced, when one failed, or when
    report_every_s has passed since the last."""
    last = [clock()]

    def after_job(force: bool = False) -> str | None:
        line = failure_line(gates())
        if force or line or clock() - last[0] >= cfg.report_every_s:
            report()
            last[0] = clock()
        return line

    return after_job
