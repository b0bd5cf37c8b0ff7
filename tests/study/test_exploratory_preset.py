"""Issue 30's exploratory arms (configs/fashion-mnist/study-exploratory.toml): the study of record's stages unchanged,
GUARD at the study of record's selected settings (one teacher shared by GUARD and GUARD(CDA)), SRe2L+Adv and the
gradient-norm rows at the settings the file fixes, nothing selected."""

from __future__ import annotations

import json

import tomllib

from guard_fast.study.config import load_study, parse_row
from guard_fast.study.plan import plan_study
from tests.conftest import REPO

PRESET = REPO / "configs" / "fashion-mnist" / "study-exploratory.toml"
RECORD = REPO / "configs" / "fashion-mnist" / "study.toml"


def test_the_pipeline_is_the_study_of_records():
    mine, record = (tomllib.loads(p.read_text())["pipeline"] for p in (PRESET, RECORD))
    assert mine == record


def test_guard_is_the_selected_setting_and_its_teacher_is_shared_with_guard_cda():
    cfg = load_study(["--config", str(PRESET)])
    cfg.validate()
    cfg.require_plan()
    ledger = json.loads((REPO / "results/study-fashion-mnist/carry/cells.json").read_text())
    best = tuple(ledger["selection"]["guard"]["best"])  # ('--squeeze.objective.beta=0.1', '--squeeze.objective.h=3')
    guard_rows = [parse_row(r) for t in cfg.tables().values() for r in t.rows if "teacher=guard" in r]
    assert guard_rows and {r.overrides for r in guard_rows} == {best}
    assert not any(getattr(cfg.selection, k) for k in ("guard", "pgd_at", "grad_norm"))
    plan = plan_study(cfg, {})
    calls = {c.slug: c.methods for c in plan.calls}
    assert sorted(calls["base"]) == ["cda:teacher=none", "sre2l:teacher=none"]  # the plain teacher (runs first)
    guard_call = [m for m in calls.values() if "sre2l:teacher=guard" in m]
    assert guard_call == [["sre2l:teacher=guard", "cda:teacher=guard"]]  # one call: one GUARD teacher per seed
    labels = {parse_row(r).label for t in cfg.tables().values() for r in t.rows}
    assert labels == {"GUARD", "SRe2L", "SRe2L+Adv", "grad-norm 1e-3", "grad-norm 1e-2", "grad-norm 0.1", "CDA",
                      "GUARD(CDA)"}
    assert len(plan.cells) == 9 and cfg.seeds == [0, 1, 2] and cfg.plan.seeds == 3


def test_the_adversarial_teacher_attacks_at_the_primary_eps():
    cfg = load_study(["--config", str(PRESET)])
    (adv,) = [parse_row(r) for r in cfg.table12.rows if "pgd-at" in r]
    got = dict(o.lstrip("-").split("=") for o in adv.overrides)
    assert got == {"squeeze.objective.eps": "4/255", "squeeze.objective.alpha": "1/255", "squeeze.objective.steps": "5"}
    assert abs(cfg.plan.eps - 4 / 255) < 1e-12
