"""Figures beyond the tables, drawn from a finished study: the hook for Fig. 2 (curvature distributions).

`FIGURES[name](context) -> list of (caption, PNG path relative to results_dir)`, where `context` is a
`guard_fast.study.run.FigureContext` (the config, the results folder, and per cell and seed the pipeline folder
holding each student's train/ and the teacher's squeeze/ output). The curvature stage registers
`FIGURES["curvature"]` here when it lands; `figures = ["curvature"]` in the study config then draws it into
report.md. Unknown names are refused at config time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

FIGURES: dict[str, Callable[[Any], list[tuple[str, Path]]]] = {}


@dataclass
class FigureContext:
    config: Any
    """the StudyConfig"""
    results_dir: Path
    """where the figure's PNG goes (return its path relative to this folder)"""
    cells: dict[str, dict[int, list[dict]]]
    """cell id '<settings>/<label> IPC k' -> seed -> rows; the pipeline folder of (seed, settings) is
    runs_dir/seed<s>/<settings>, holding the method's stages (teachers/<objective>, <method>/ipc<k>/train, ...)"""
