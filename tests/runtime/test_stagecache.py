"""Stage caching: skip when unchanged, rerun dependents, resume an interrupted stage, --force."""

from __future__ import annotations

import json

import pytest

from guard_fast.runtime.stagecache import StageRunner


def _pipeline(root, calls, force=(), cfg_a=1, crash_b=False):
    runner = StageRunner(total=3, force=set(force), log=lambda s: None)

    def stage(name, crash=False):
        def fn(folder, resume):
            calls.append((name, resume))
            (folder / "part").write_text("x")
            if crash:
                raise KeyboardInterrupt  # a kill mid-stage
            (folder / "out.txt").write_text(name)
            return {"out": "out.txt"}
        return fn

    a = runner.run("a", root / "a", {"v": cfg_a}, [], stage("a"))
    b = runner.run("b", root / "b", {"v": 2}, [a], stage("b", crash_b))
    c = runner.run("c", root / "c", {"v": 3}, [b], stage("c"))
    return a, b, c


def test_rerun_skips_everything(tmp_path):
    calls = []
    _pipeline(tmp_path, calls)
    assert calls == [("a", False), ("b", False), ("c", False)]
    calls.clear()
    a, b, c = _pipeline(tmp_path, calls)
    assert calls == [] and a.skipped and b.skipped and c.skipped
    assert json.loads((tmp_path / "c" / "stage.json").read_text())["outputs"] == {"out": "out.txt"}


def test_a_skipped_stage_reports_the_time_it_took_when_it_ran(tmp_path):
    """A cached rerun's report keeps each stage's cost (it had written 0 s over the carried record)."""
    first = _pipeline(tmp_path, [])
    record = json.loads((tmp_path / "b" / "stage.json").read_text())
    record["seconds"] = 123.45  # as if b had taken that long
    (tmp_path / "b" / "stage.json").write_text(json.dumps(record))
    again = _pipeline(tmp_path, [])
    assert all(r.skipped for r in again)
    assert again[1].seconds == 123.45 and again[2].seconds == json.loads(
        (tmp_path / "c" / "stage.json").read_text())["seconds"]
    assert [r.skipped for r in first] == [False, False, False]


def test_deleted_output_reruns_it_and_dependents_only(tmp_path):
    calls = []
    _pipeline(tmp_path, calls)
    calls.clear()
    (tmp_path / "b" / "out.txt").unlink()
    _pipeline(tmp_path, calls)
    assert calls == [("b", False), ("c", False)]


def test_config_change_and_force(tmp_path):
    calls = []
    _pipeline(tmp_path, calls)
    calls.clear()
    _pipeline(tmp_path, calls, cfg_a=5)
    assert [c[0] for c in calls] == ["a", "b", "c"]
    calls.clear()
    _pipeline(tmp_path, calls, cfg_a=5, force={"c"})
    assert calls == [("c", False)]


def test_interrupted_stage_resumes(tmp_path):
    calls = []
    with pytest.raises(KeyboardInterrupt):
        _pipeline(tmp_path, calls, crash_b=True)
    assert not (tmp_path / "b" / "stage.json").exists() and (tmp_path / "b" / "part").exists()
    calls.clear()
    _pipeline(tmp_path, calls)
    assert calls == [("b", True), ("c", False)]  # a cached; b picks up its partial work


def test_a_resumed_stage_reports_its_time_over_every_sitting(tmp_path, monkeypatch):
    """Sitting 1 runs stage b for 30 s (a fake clock) and is interrupted; sitting 2 resumes it for 12 s: stage.json
    says 42 s, not 12. A stage that starts clean does not inherit an older sitting's time."""
    import guard_fast.runtime.stagecache as sc

    clock = {"now": 1000.0}
    monkeypatch.setattr(sc.time, "time", lambda: clock["now"])
    runner = StageRunner(total=1, log=lambda s: None)

    def fn(spend, crash):
        def run(folder, resume):
            clock["now"] += spend
            if crash:
                raise KeyboardInterrupt
            return {}
        return run

    with pytest.raises(KeyboardInterrupt):
        runner.run("b", tmp_path / "b", {"v": 1}, [], fn(30.0, True))
    assert json.loads((tmp_path / "b" / "stage.prior").read_text()) == {"seconds": 30.0}
    rec = StageRunner(total=1, log=lambda s: None).run("b", tmp_path / "b", {"v": 1}, [], fn(12.0, False))
    assert rec.seconds == pytest.approx(42.0)
    assert json.loads((tmp_path / "b" / "stage.json").read_text())["seconds"] == 42.0
    with pytest.raises(KeyboardInterrupt):
        runner.run("c", tmp_path / "c", {"v": 1}, [], fn(30.0, True))
    fresh = StageRunner(total=1, log=lambda s: None).run("c", tmp_path / "c", {"v": 2}, [], fn(5.0, False))
    assert fresh.seconds == pytest.approx(5.0)  # another config: it started clean
