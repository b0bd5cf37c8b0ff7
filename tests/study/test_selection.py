"""Selection scored on the teachers (issue 30 item 2): on the prepared holdout split, over several seeds, the best
mean robust accuracy among candidates whose clean accuracy is within clean_within of the plain teacher's."""

from __future__ import annotations

import json
import shutil

import pytest

from bench.study_runner import tiny_study
from tests.conftest import ONE


@pytest.fixture
def holdout_digits(digits_subset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits_subset(16, 4), data)
    shutil.copytree(data / "val", data / "holdout")  # stands in for the prepared carve of train
    return data


def teacher_selection(data, tmp_path, *extra):
    from guard_fast.study.config import load_study

    return load_study([*tiny_study(data, tmp_path / "runs", tmp_path / "res", 1), "--workers=1",
                       "--selection.split=holdout", "--selection.val_images=20", "--selection.score=teacher",
                       "--selection.reference=sre2l:teacher=none", "--selection.seeds=[0,1]",
                       "--selection.guard=[\"squeeze.objective.beta=0.01,0.1\"]",
                       '--selection.overrides=["--squeeze.robust_eval_eps=[\\"8/255\\"]",'
                       '"--squeeze.robust_eval_steps=2","--squeeze.val_every=0"]', *extra])


def test_teacher_scored_selection_on_the_holdout_over_seeds(holdout_digits, tmp_path, monkeypatch):
    from guard_fast.study import run as R

    cfg = teacher_selection(holdout_digits, tmp_path, "--selection.clean_within=1.0")
    data = R.prepare_selection_data(cfg, ONE)
    assert (data / "train").resolve() == (holdout_digits / "train").resolve()
    val = sorted(p.relative_to(data / "val").as_posix() for p in (data / "val").rglob("*.png"))
    assert len(val) == 20 and all((holdout_digits / "holdout" / f).is_file() for f in val)  # 2 per class
    assert {f.split("/")[0] for f in val} == {p.name for p in (holdout_digits / "holdout").iterdir()}
    sel = R.run_selection(cfg, ONE, data, {"selection": {}})["guard"]
    runs = tmp_path / "runs" / "selection"
    assert not list(runs.rglob("recover")) and not list(runs.rglob("evaluate"))  # the teachers only
    teachers = sorted(runs.rglob("teachers/guard/result.json"))
    assert len(teachers) == 4 and len(list(runs.glob("reference/seed*/teachers/none/result.json"))) == 2
    for cand in sel["candidates"]:
        folder = (tmp_path / "runs" / cand["folder"]).parent  # selection/guard/<candidate>/seed<s>
        vals = [json.loads((folder / f"seed{s}/teachers/guard/result.json").read_text())["val"] for s in (0, 1)]
        assert cand["seeds"] == [0, 1] and cand["eligible"]
        assert cand["score"] == pytest.approx(sum(v["pgd@0.0313725"] for v in vals) / 2)
        assert cand["clean"] == pytest.approx(sum(v["clean"] for v in vals) / 2)
    assert sel["best"] == max(sel["candidates"], key=lambda c: (c["score"], c["clean"]))["overrides"]
    # eligibility: a candidate whose clean accuracy is more than clean_within below the reference's cannot win
    fake = {"0.01": (0.9, 0.5), "0.1": (0.2, 0.9)}  # beta -> (score, clean); the reference's clean is 0.9

    def score(sel_cfg, pc):
        beta = str(pc.squeeze.objective.beta) if "reference" not in pc.output.dir else None
        return fake[beta] if beta else (0.0, 0.9)

    monkeypatch.setattr(R, "run_score", score)
    cfg = teacher_selection(holdout_digits, tmp_path, "--selection.clean_within=0.02")
    again = R.run_selection(cfg, ONE, data, {"selection": {}})["guard"]
    assert [c["eligible"] for c in again["candidates"]] == [False, True]
    assert again["best"] == ["--squeeze.objective.beta=0.1"] and again["reference_clean"] == 0.9


def test_teacher_score_needs_a_reference_and_the_holdout(digits_subset, tmp_path):
    from guard_fast.runtime.errors import ConfigError
    from guard_fast.study import run as R
    from guard_fast.study.config import load_study

    with pytest.raises(ConfigError, match="selection.reference"):
        load_study([*tiny_study(tmp_path, tmp_path / "r", tmp_path / "s", 1), "--selection.score=teacher"])
    cfg = teacher_selection(digits_subset(16, 4), tmp_path)
    with pytest.raises(ConfigError, match="holdout is missing"):
        R.prepare_selection_data(cfg, ONE)
