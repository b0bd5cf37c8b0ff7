"""The GUARD-variants evidence preset (issue 29 item 4; configs/fashion-mnist/study-guard-variants.toml): its rows,
pairs and plan, one student protocol and one evaluation for every row, and a study with nothing to select copies no
selection split. Issue 30's secondary arm (configs/fashion-mnist/study-dc-guard.toml): GUARD(DC) vs DC under both
student protocols, each method's two protocols training on one distilled set. The exploratory GUARD(DSA) arm
(configs/fashion-mnist/study-dsa-guard.toml): the DC arm's budget and evaluation with DSA's strategy and student."""

from __future__ import annotations

import pytest

from guard_fast.runtime.distributed import DistInfo
from guard_fast.study import run as study_run
from guard_fast.study.config import load_study, parse_row
from guard_fast.study.plan import plan_study
from tests.conftest import REPO

PRESET = str(REPO / "configs" / "fashion-mnist" / "study-guard-variants.toml")
DC_PRESET = str(REPO / "configs" / "fashion-mnist" / "study-dc-guard.toml")
DSA_PRESET = str(REPO / "configs" / "fashion-mnist" / "study-dsa-guard.toml")


def test_the_preset_pairs_each_method_with_its_guard_variant_beside_dm():
    cfg = load_study(["--config", PRESET])
    cfg.validate()
    cfg.require_plan()  # the main run may start: the plan is registered
    labels = [parse_row(r).label for r in cfg.table5.rows]
    assert labels == ["MTT", "GUARD(MTT)", "TESLA", "GUARD(TESLA)", "DM"]  # DC: study-dc-guard.toml (below)
    assert cfg.table5.pairs == cfg.plan.pairs == ["GUARD(MTT) vs MTT", "GUARD(TESLA) vs TESLA"]
    assert cfg.table5.ipc == [10] and cfg.seeds == [0, 1, 2] and cfg.plan.table == "table5"
    assert not cfg.table12.rows and not cfg.table3.rows and not any(
        getattr(cfg.selection, k) for k in ("guard", "pgd_at", "grad_norm"))
    p = cfg.pipeline
    # one student protocol for every row: MTT / TESLA train from train_hard, DM from train_dsa
    for key in ("augment", "dsa_space", "batch_size", "quantize"):
        assert getattr(p.train_hard, key) == getattr(p.train_dsa, key), key
    assert p.train_hard.model == p.train_dsa.model and p.train_hard.optim == p.train_dsa.optim
    assert p.train_hard.augment == "dsa" and p.train_hard.optim.epochs == 1000
    # every distillation network and expert is the students' ConvNet; GUARD's settings fixed in the file
    assert {p.experts.model.width, p.dm.model.width, p.train_hard.model.width} == {64}
    assert (p.experts.objective.beta, p.experts.objective.h) == (0.1, 3.0)
    assert p.evaluate.attack.names == ["pgd100"] and p.evaluate.num_images == 1000
    assert any(abs(e - cfg.plan.eps) < 1e-12 for e in p.evaluate.attack.eps)


def test_the_quick_preset_is_one_seed_of_tiny_networks():
    cfg = load_study(["--config", PRESET, "--quick"])
    cfg.validate()
    assert cfg.seeds == [0] and cfg.pilot and "quick" in cfg.runs_dir
    assert cfg.pipeline.experts.model.width == cfg.pipeline.train_hard.model.width == 4


def test_a_study_with_nothing_to_select_copies_no_selection_split(tmp_path, monkeypatch):
    cfg = load_study(["--config", PRESET, f"--runs_dir={tmp_path / 'runs'}", f"--results_dir={tmp_path / 'res'}"])
    planned = []
    monkeypatch.setattr(study_run, "prepare_selection_data", lambda *a: pytest.fail("copied a selection split"))
    monkeypatch.setattr(study_run, "run_cells", lambda c, i, plan, after: planned.append(plan))
    monkeypatch.setattr(study_run, "run_cost", lambda *a: None)
    monkeypatch.setattr(study_run, "write_study_report", lambda *a: {"gates": []})
    study_run.run_study(cfg, DistInfo(0, 1, 0, "cpu"))
    assert planned and planned[0].cells == plan_study(cfg, {}).cells and len(planned[0].cells) == 5
    assert not (tmp_path / "runs" / "data").exists()


def test_the_dc_arm_pairs_guard_dc_with_dc_under_both_protocols_on_one_set_per_method(tmp_path):
    from guard_fast.pipeline import plan_pipeline

    cfg = load_study(["--config", DC_PRESET])
    cfg.validate()
    cfg.require_plan()
    labels = [parse_row(r).label for r in cfg.table5.rows]
    assert labels == ["DC", "GUARD(DC)", "DC authors' protocol", "GUARD(DC) authors' protocol"]
    assert cfg.table5.pairs == cfg.plan.pairs == ["GUARD(DC) vs DC",
                                                  "GUARD(DC) authors' protocol vs DC authors' protocol"]
    assert cfg.seeds == [0, 1, 2, 3, 4] and cfg.plan.seeds == 5 and cfg.table5.ipc == [10]
    plan = plan_study(cfg, {})
    assert len(plan.calls) == 1 and len(plan.cells) == 4  # one pipeline call per seed: the sets are shared
    pc = study_run.pipeline_config(cfg, plan.calls[0].settings, tmp_path / "seed0", 0, plan.calls[0].methods, [10])
    distill, epochs = {}, {}
    for label, _ipc, stages in plan_pipeline(pc, tmp_path / "seed0"):
        by = {s.kind: s for s in stages}
        distill[label], epochs[label] = by["dc"].folder, by["train-hard"].config.optim.epochs
    assert distill["DC"] == distill["DC authors' protocol"] != distill["GUARD(DC)"] == distill[
        "GUARD(DC) authors' protocol"]
    # matched: DC's Epoch 300 for both; authors: main_CURE.py's 301 for DC and 1001 for GUARD(DC)
    assert epochs == {"DC": 301, "GUARD(DC)": 301, "DC authors' protocol": 301, "GUARD(DC) authors' protocol": 1001}
    p = pc
    assert p.train_hard.augment == "none" and {p.dc.model.width, p.train_hard.model.width} == {64}
    assert (p.dc.lam, p.dc.h, p.dc.iterations, p.dc.init, p.dc.space) == (100.0, 0.6, 50, "real", "normalized")
    assert p.evaluate.attack.names == ["pgd100"] and any(abs(e - cfg.plan.eps) < 1e-12 for e in p.evaluate.attack.eps)


def test_the_dsa_arm_is_the_dc_arms_budget_with_dsas_augmentation_and_student(tmp_path):
    import tomllib

    from guard_fast.pipeline import plan_pipeline

    cfg = load_study(["--config", DSA_PRESET])
    cfg.validate()
    cfg.require_plan()
    assert [parse_row(r).label for r in cfg.table5.rows] == ["DSA", "GUARD(DSA)"]
    assert cfg.table5.pairs == cfg.plan.pairs == ["GUARD(DSA) vs DSA"] and cfg.seeds == [0, 1, 2] == list(
        range(cfg.plan.seeds))
    plan = plan_study(cfg, {})
    assert len(plan.calls) == 1 and len(plan.cells) == 2
    pc = study_run.pipeline_config(cfg, plan.calls[0].settings, tmp_path / "seed0", 0, plan.calls[0].methods, [10])
    stages = {label: {s.kind: s for s in st} for label, _ipc, st in plan_pipeline(pc, tmp_path / "seed0")}
    dsa, guard = (stages[k]["dsa"].config for k in ("DSA", "GUARD(DSA)"))
    assert (dsa.guard, guard.guard, dsa.dsa, guard.dsa) == (False, True, True, True)
    a, b = (stages[k]["train-hard"].config for k in ("DSA", "GUARD(DSA)"))  # one student protocol
    for key in ("optim", "model", "augment", "dsa_strategy", "dsa_space", "batch_size", "quantize"):
        assert getattr(a, key) == getattr(b, key), key
    dc = load_study(["--config", DC_PRESET]).pipeline
    for key in ("iterations", "batch_real", "space", "init", "lam", "h"):  # the DC arm's budget and GUARD settings
        assert getattr(guard, key) == getattr(dc.dc, key), key
    assert guard.model == dc.dc.model and pc.evaluate == dc.evaluate
    authors = tomllib.loads((REPO / "configs" / "fashion-mnist" / "pipeline-dc.toml").read_text())
    student = stages["DSA"]["train-hard"].config
    assert guard.dsa_strategy == student.dsa_strategy == authors["dsa"]["dsa_strategy"]
    assert (student.augment, student.optim.epochs, student.model.width) == ("dsa", 1001, 64)


def test_the_dsa_quick_preset_is_one_seed_of_tiny_networks():
    cfg = load_study(["--config", DSA_PRESET, "--quick"])
    cfg.validate()
    assert cfg.seeds == [0] and cfg.pilot and "quick" in cfg.runs_dir and "quick" in cfg.results_dir
    assert cfg.pipeline.dsa.model.width == cfg.pipeline.train_dsa.model.width == 4
