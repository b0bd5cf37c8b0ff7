"""The study's plan: every (table, row, IPC) cell grouped by its settings into pipeline calls (one per seed), so
rows that share settings share their stages (GUARD's teacher is trained once per seed for Tables 1/2 and 5)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from guard_fast.methods import resolve
from guard_fast.runtime.errors import ConfigError
from guard_fast.study.config import StudyConfig, parse_row


@dataclass
class Call:
    """One pipeline invocation per seed: these methods at these IPCs, under these overrides."""

    settings: tuple[str, ...]
    methods: list[str]
    ipc: list[int]

    @property
    def slug(self) -> str:
        return settings_slug(self.settings)


@dataclass
class Plan:
    calls: list[Call] = field(default_factory=list)
    cells: dict[tuple[str, str, int], str] = field(default_factory=dict)
    """(table, row label, ipc) -> cell id '<settings slug>/<pipeline row label>' (shared across tables)"""
    pending: list[str] = field(default_factory=list)
    """rows that could not be planned (their selection has not run), for the report"""


def settings_slug(overrides: tuple[str, ...]) -> str:
    """Folder name of a set of overrides: 'base' when empty, else readable and short, with a hash when long."""
    if not overrides:
        return "base"
    text = "_".join(o.lstrip("-").replace("squeeze.objective.", "") for o in sorted(overrides))
    text = re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).replace("=", "-")
    if len(text) > 60:
        text = text[:48] + "-" + hashlib.sha256("|".join(sorted(overrides)).encode()).hexdigest()[:8]
    return text


def plan_study(cfg: StudyConfig, selected: dict[str, dict[str, Any]]) -> Plan:
    """Group every (table, row, ipc) cell by its settings into pipeline calls, the calls of earlier tables first; rows
    using a knob whose selection is missing are pending."""
    plan = Plan()
    wanted: dict[tuple[str, ...], dict[str, set[int]]] = {}  # settings -> method -> ipcs
    first: dict[tuple[tuple[str, ...], str], int] = {}  # (settings, method) -> index of the first table using it
    for rank, (table, t) in enumerate(cfg.tables().items()):
        for text in t.rows:
            row = parse_row(text)
            if any(k not in selected for k in row.knobs):
                plan.pending.append(f"{table}: {row.label} (selection of {', '.join(row.knobs)} not run yet)")
                continue
            settings = tuple(dict.fromkeys([*row.overrides, *(o for k in row.knobs for o in selected[k]["best"])]))
            wanted.setdefault(settings, {}).setdefault(row.method, set()).update(t.ipc)
            first.setdefault((settings, row.method), rank)
            for ipc in t.ipc:
                plan.cells[(table, row.label, ipc)] = f"{settings_slug(settings)}/{row.label} IPC {ipc}"
    for settings, methods in wanted.items():
        by_ipc: dict[tuple[int, ...], list[str]] = {}
        for method, ipcs in methods.items():
            by_ipc.setdefault(tuple(sorted(ipcs)), []).append(method)
        # the largest IPC set first, so the methods with the most cells share the first call
        for ipcs, ms in sorted(by_ipc.items(), key=lambda kv: (-len(kv[0]), kv[0])):
            plan.calls.append(Call(settings, ms, list(ipcs)))
    # the first table's calls first (Tables 1/2), so a study cut short has its main table complete
    plan.calls.sort(key=lambda c: min(first[(c.settings, m)] for m in c.methods))
    labels = [(c.slug, resolve(m)[0].display(resolve(m)[2])) for c in plan.calls for m in c.methods]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"two rows with the same settings have the same label: {labels}")
    return plan
