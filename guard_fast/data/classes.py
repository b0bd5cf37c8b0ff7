"""Class names of a split, for both backends: the class folders of an ImageFolder, or the record a .beton carries
beside it (`<file>.beton.classes.json`, written by `guard-fast data to-ffcv`). Train and val must name the same
classes in the same order; comparing only counts would let a renamed folder shift every label silently."""

from __future__ import annotations

import json
from pathlib import Path

from guard_fast.runtime.errors import GuardFastError
from guard_fast.runtime.io import atomic_json


def record_path(beton: str | Path) -> Path:
    beton = Path(beton)
    return beton.with_name(beton.name + ".classes.json")


def write_beton_classes(beton: str | Path, classes: list[str]) -> None:
    atomic_json(record_path(beton), {"classes": list(classes)})


def beton_classes(beton: str | Path) -> list[str]:
    path = record_path(beton)
    try:
        classes = json.loads(path.read_text())["classes"]
    except (OSError, ValueError, KeyError, TypeError):
        raise GuardFastError(f"{beton}: no readable class-name record {path.name} beside it; write the .beton again "
                             "with guard-fast data to-ffcv") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise GuardFastError(f"{path}: 'classes' must be a list of names")
    return classes


def folder_classes(root: str | Path) -> list[str]:
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir())


def check_same_classes(train: list[str], val: list[str], train_path: Path, val_path: Path) -> None:
    """Label c means the same class in both splits, or an error naming the first difference."""
    if train == val:
        return
    diff = next((i for i, (a, b) in enumerate(zip(train, val, strict=False)) if a != b), min(len(train), len(val)))
    a = train[diff] if diff < len(train) else "(none)"
    b = val[diff] if diff < len(val) else "(none)"
    raise GuardFastError(f"{val_path}: its classes differ from {train_path} (label {diff} is {b!r} in val, {a!r} in "
                         f"train; {len(val)} vs {len(train)} classes); labels would not match, fix the folder names")
