"""The study runner of issue 30: the main run needs the pre-registered plan and records its hash, gates stop the
study with one line, and parallel workers give the sequential runner's results."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from bench.study_runner import tiny_study
from tests.conftest import ONE, PYTHON, REPO, subprocess_env

PRESET = REPO / "configs/digits/study.toml"


def study(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([PYTHON, str(REPO / "launchers/study.py"), *args], capture_output=True, text=True,
                       env=subprocess_env(), cwd=REPO, timeout=900)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    return r


# --- pre-registration ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("--plan.pairs=[]", "plan.pairs"), ("--plan.eps=0", "plan.eps"), ("--plan.stopping_rule=", "plan.stopping_rule"),
    ("--plan.seeds=5", "exactly the pre-registered n"),
])
def test_main_run_refuses_an_incomplete_plan_before_running_anything(tmp_path, override, message):
    from guard_fast.runtime.errors import ConfigError
    from guard_fast.study.config import load_study
    from guard_fast.study.run import run_study

    cfg = load_study(["--config", str(PRESET), f"--runs_dir={tmp_path / 'runs'}", override])
    with pytest.raises(ConfigError, match=message):
        run_study(cfg, ONE)
    assert not (tmp_path / "runs").exists()  # refused before the selection split or any stage


@pytest.mark.parametrize("override, message", [
    ("--plan.pairs=[\"GUARD vs CDA\"]", "not a pair"), ("--plan.attack=square2", "attack.names"),
    ("--plan.eps=3/255", "attack.eps"), ("--plan.ipc=7", "runs ipc"), ("--gates.teacher_min=88", "fraction"),
    ("--workers=0", "workers"),
])
def test_plan_and_gates_that_name_nothing_are_refused(override, message):
    from guard_fast.runtime.config import load_config
    from guard_fast.runtime.errors import ConfigError
    from guard_fast.study.config import StudyConfig

    with pytest.raises(ConfigError, match=message):
        load_config(StudyConfig, PRESET, [override])


def test_plan_hash_is_registered_once_and_a_later_change_shows(tmp_path):
    from guard_fast.study.config import load_study
    from guard_fast.study.run import plan_hash, plan_record

    cfg = load_study(["--config", str(PRESET), f"--runs_dir={tmp_path}"])
    assert plan_record(cfg, register=False)["registered"] is None  # nothing written before the main run
    first = plan_record(cfg, register=True)
    assert first["registered"] == first["sha256"] == plan_hash(cfg) and not first["changed"]
    edited = load_study(["--config", str(PRESET), f"--runs_dir={tmp_path}", "--plan.mdd=0.03"])
    again = plan_record(edited, register=True)  # a second start does not overwrite the registration
    assert again["changed"] and again["registered"] == first["sha256"] != again["sha256"]
    assert json.loads((tmp_path / "plan.json").read_text())["plan"]["mdd"] == 0.02
    # fields outside [plan] do not change the hash
    assert plan_hash(load_study(["--config", str(PRESET), "--workers=1"])) == first["sha256"]


# --- gates ---------------------------------------------------------------------------------------------------------

def test_gate_measurements_and_the_failure_line(tmp_path):
    """Teacher accuracies come from the squeeze result.json of finished stages only; GUARD's drop is against the
    same seed's plain teacher; the failure line names gate, stage, measured value and threshold."""
    from guard_fast.study import gates as G
    from guard_fast.study.config import GatesConfig

    def teacher(root: Path, objective: str, acc: float, done: bool = True) -> None:
        f = root / "teachers" / objective
        f.mkdir(parents=True)
        (f / "result.json").write_text(json.dumps({"val": {"clean": acc}}))
        if done:
            (f / "stage.json").write_text("{}")

    teacher(tmp_path / "seed0/base", "none", 0.90)
    teacher(tmp_path / "seed0/beta-0.1", "guard", 0.87)
    teacher(tmp_path / "seed1/base", "none", 0.95)
    teacher(tmp_path / "seed1/beta-0.1", "guard", 0.10, done=False)  # unfinished: not measured
    roots = [(s, tmp_path / f"seed{s}" / slug) for s in (0, 1) for slug in ("base", "beta-0.1")]
    gates = GatesConfig(teacher_min=0.88, guard_teacher_max_drop=0.02)
    res = G.measure_roots(gates, roots, tmp_path)
    assert [(r["gate"], r["where"], round(r["measured"], 6), r["ok"]) for r in res] == [
        ("teacher_min", "seed0/base/teachers/none", 0.90, True),
        ("teacher_min", "seed1/base/teachers/none", 0.95, True),
        ("guard_teacher_max_drop", "seed0/beta-0.1/teachers/guard", 0.03, False)]
    assert G.failure_line(res) == ("gate guard_teacher_max_drop failed at seed0/beta-0.1/teachers/guard: measured "
                                   "0.0300, required <= 0.0200 (plain teacher's minus GUARD teacher's test accuracy "
                                   "(same seed) <= threshold); the study stops here")
    with pytest.raises(G.GateError, match="guard_teacher_max_drop"):
        G.check(res)
    summary = {g["gate"]: g for g in G.summary(res, gates)}
    assert summary["teacher_min"]["worst"] == 0.90 and summary["teacher_min"]["ok"] is True
    assert summary["guard_teacher_max_drop"]["ok"] is False and "recovered_min" not in summary  # off: not listed
    assert G.failure_line(G.measure_roots(GatesConfig(teacher_min=0.88), roots, tmp_path)) is None


def test_recovered_gate_is_the_teachers_top1_on_its_images(teacher, digits_dir, tmp_path):
    """recovered_accuracy = an independent forward of the teacher over the stored PNGs (one real val image per
    class written as a 'recovered' set), cached by the set's content hash."""
    import torch

    from guard_fast.data import build_loader
    from guard_fast.data.synthetic import write_synthetic
    from guard_fast.models import ModelConfig, build_model
    from guard_fast.runtime.config import DataConfig, to_dict
    from guard_fast.study.gates import recovered_accuracy

    data = DataConfig(dataset="digits", path=str(digits_dir), image_size=16, batch_size=100, workers=0)
    batches = list(build_loader(data, "val", rank=0, world=1, device=torch.device("cpu")))
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])  # the whole split
    keep = torch.cat([torch.nonzero(y == c)[:1] for c in range(10)]).flatten()
    x, y = x[keep], y[keep]
    folder = tmp_path / "recover"
    items = [{"label": int(c), "ipc_index": 0} for c in y]
    pixels = (x * 255).round().clamp(0, 255).to(torch.uint8)
    write_synthetic(folder, pixels, items, [str(c) for c in range(10)], {"ipc": 1, "teacher": str(teacher)})
    (folder / "stage.json").write_text("{}")
    (folder / "config.json").write_text(json.dumps({"data": to_dict(data), "model": to_dict(
        ModelConfig(arch="resnet18-cifar", width=4, checkpoint=str(teacher)))}))
    model = build_model("resnet18-cifar", 10, (0.3095,) * 3, (0.3489,) * 3, width=4, checkpoint=str(teacher)).eval()
    with torch.no_grad():
        want = (model(pixels.float() / 255).argmax(1) == y).sum().item() / len(y)
    cache: dict = {}
    got = recovered_accuracy(folder, cache)
    assert got == pytest.approx(want, abs=1e-9) and cache[str(folder)]["accuracy"] == got
    cache[str(folder)]["accuracy"] = -1.0  # a cache hit is used as is ...
    assert recovered_accuracy(folder, cache) == -1.0
    cache[str(folder)]["content_hash"] = "other"  # ... unless the set changed
    assert recovered_accuracy(folder, cache) == pytest.approx(want)


@pytest.mark.subprocess
def test_impossible_gate_stops_the_smoke_preset_with_one_line(digits_subset, tmp_path):
    """The digits smoke preset with teacher_min = 1.0: the study exits (code 3) after the plain teachers, naming
    the gate, the stage, the measured value and the threshold in one line; no student is evaluated; the report
    shows the failed gate."""
    data = digits_subset(8, 4)
    r = study(["--config", str(PRESET), "--quick", f"--pipeline.data.path={data}", "--pipeline.data.workers=0",
               f"--runs_dir={tmp_path / 'runs'}", f"--results_dir={tmp_path / 'res'}", "--readme=", "--cost.config=",
               "--selection.guard=[\"squeeze.objective.beta=0.03\"]", "--table5.rows=[]", "--table5.pairs=[]",
               "--pipeline.data.batch_size=16", "--gates.teacher_min=1.0"], check=False)
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "gate teacher_min failed at seed" in errors[0] and "/base/teachers/none: measured 0." in errors[0]
    assert "required >= 1.0000" in errors[0]
    runs = tmp_path / "runs"
    assert not [p for p in runs.glob("seed*/**/evaluate/stage.json")]  # stopped before any row
    assert [p for p in runs.glob("seed*/base/teachers/none/stage.json")]
    assert "**FAIL**" in (tmp_path / "res/report.md").read_text()


# --- parallel runner -----------------------------------------------------------------------------------------------

def job_intervals(runs: Path) -> list[tuple[float, float]]:
    """(start, end) epoch seconds of each pipeline call (seed folder), from its stages' stage.json."""
    out = []
    for job in sorted(runs.glob("seed*/*")):
        spans = []
        for f in job.rglob("stage.json"):
            rec = json.loads(f.read_text())
            end = time.mktime(time.strptime(rec["finished"][:19], "%Y-%m-%dT%H:%M:%S"))
            spans.append((end - rec["seconds"], end))
        if spans:
            out.append((min(s for s, _ in spans), max(e for _, e in spans)))
    return out


@pytest.mark.subprocess
def test_parallel_workers_give_the_sequential_results(digits_subset, tmp_path):
    data = digits_subset(8, 4)
    cells, intervals = {}, {}
    for workers in (1, 2):
        folder = tmp_path / f"w{workers}"
        args = [*tiny_study(data, folder / "runs", folder / "res", seeds=2), "--pipeline.dist.cpu_threads=1",
                "--pipeline.train.optim.epochs=2", "--pipeline.recover.iterations=3", f"--workers={workers}"]
        study(args)
        cells[workers] = json.loads((folder / "res/results.json").read_text())["cells"]
        intervals[workers] = job_intervals(folder / "runs")
    assert cells[1] == cells[2] and len(cells[1]) == 2 and all(len(c) == 2 for c in cells[1].values())
    overlaps = [min(a[1], b[1]) - max(a[0], b[0]) for i, a in enumerate(intervals[2]) for b in intervals[2][i + 1:]]
    assert max(overlaps) > 1.0, intervals[2]  # two calls did run at the same time
    r = study(args)  # a rerun with workers: everything cached, same numbers
    assert ": running" not in r.stdout and ": cached" in r.stdout
    assert json.loads((tmp_path / "w2/res/results.json").read_text())["cells"] == cells[2]


def test_kd_recipe_gate_reads_the_named_rows_clean_accuracy(tmp_path):
    from guard_fast.study.config import load_study
    from guard_fast.study.plan import Plan
    from guard_fast.study.run import measure_gates

    cfg = load_study(["--config", str(PRESET), f"--runs_dir={tmp_path}", "--gates.kd_row=SRe2L", "--gates.kd_min=0.4",
                      "--gates.teacher_min=0"])
    plan = Plan(cells={("table12", "SRe2L", 10): "base/SRe2L IPC 10", ("table12", "GUARD", 10): "beta/GUARD IPC 10"})
    cells = {"base/SRe2L IPC 10": {0: [{"eps": 1 / 255, "clean": 0.5}], 1: [{"eps": 1 / 255, "clean": 0.3}]},
             "beta/GUARD IPC 10": {0: [{"eps": 1 / 255, "clean": 0.1}]}}
    res = measure_gates(cfg, plan, cells)
    assert [(r["gate"], r["where"], r["measured"], r["ok"]) for r in res] == [
        ("kd_min", "SRe2L, seed 0", 0.5, True), ("kd_min", "SRe2L, seed 1", 0.3, False)]
    cfg.gates.kd_row = ""
    assert measure_gates(cfg, plan, cells) == []  # no row named: the gate is off


def test_pilot_needs_no_plan_and_writes_beside_the_main_report(tmp_path, monkeypatch):
    """--pilot takes the first plan.pilot_seeds seeds into results_dir/pilot and gets past the plan check (stopped
    here at the first step after it, the selection split)."""
    from guard_fast.study import run as R
    from guard_fast.study.config import load_study

    cfg = load_study(["--config", str(PRESET), f"--runs_dir={tmp_path}", f"--results_dir={tmp_path / 'res'}",
                      "--plan.pairs=[]", "--seeds=[4,5,6,7]", "--plan.pilot_seeds=2", "--pilot"])
    pilot = R.pilot_config(cfg)
    assert pilot.seeds == [4, 5] and pilot.results_dir == str(tmp_path / "res" / "pilot") and pilot.readme == ""

    class Reached(Exception):
        pass

    def stop(*_):
        raise Reached

    monkeypatch.setattr(R, "prepare_selection_data", stop)
    with pytest.raises(Reached):
        R.run_study(cfg, ONE)
    assert not (tmp_path / "plan.json").exists()  # a pilot registers nothing


def _made_up_study(tmp_path, extra=(), with_results=None):
    """The digits preset reduced to GUARD vs SRe2L at IPC 10, with made-up per-seed numbers for `with_results` seeds
    (default: every seed): GUARD gains N(3, 1) points of PGD-100 at each eps. Returns (cfg, plan, cells, base, gain)."""
    import numpy as np

    from guard_fast.study.config import load_study
    from guard_fast.study.plan import Plan

    cfg = load_study(["--config", str(PRESET), f"--runs_dir={tmp_path}", f"--results_dir={tmp_path / 'res'}",
                      "--readme=", "--figures=[]", "--table3.rows=[]", "--table3.pairs=[]", "--table5.rows=[]",
                      "--table5.pairs=[]", "--table12.rows=[\"sre2l:teacher=guard | @guard\",\"sre2l:teacher=none\"]",
                      "--table12.pairs=[\"GUARD vs SRe2L\"]", "--table12.ipc=[10]", *extra])
    seeds = cfg.seeds if with_results is None else cfg.seeds[:with_results]
    rng = np.random.default_rng(3)
    eps = [1 / 255, 2 / 255, 4 / 255, 8 / 255]
    base = {s: rng.uniform(0.3, 0.5, 4) for s in seeds}
    gain = {s: rng.normal(0.03, 0.01, 4) for s in seeds}

    def rows(guard: bool) -> dict[int, list[dict]]:
        return {s: [{"label": "x", "eps": e, "clean": 0.8 + (0.005 * s if guard else 0.0),
                     "pgd100": base[s][i] + (gain[s][i] if guard else 0.0)} for i, e in enumerate(eps)]
                for s in seeds}

    plan = Plan(cells={("table12", "GUARD", 10): "beta/GUARD IPC 10", ("table12", "SRe2L", 10): "base/SRe2L IPC 10"})
    return cfg, plan, {"beta/GUARD IPC 10": rows(True), "base/SRe2L IPC 10": rows(False)}, base, gain


REGISTRATION = {"sha256": "abc", "registered": "abc", "registered_plan": None, "changed": False}


def test_report_opens_with_verdicts_and_headline_and_recomputes_the_primary_test(tmp_path):
    """write_study_report on made-up per-seed numbers: section order (verdicts, headline figure, settings, plan,
    gates, pilot, power, secondary), and the primary comparison = scipy's paired t-test, Holm over a family of
    one, TOST / non-inferiority from the same differences."""
    import numpy as np
    from scipy import stats as sps

    from guard_fast.study import stats as S
    from guard_fast.study.report import write_study_report

    cfg, plan, cells, base, gain = _made_up_study(tmp_path)
    gates = [{"gate": "teacher_min", "where": "seed0/base/teachers/none", "measured": 0.9, "threshold": 0.5,
              "ok": True}]
    res = write_study_report(cfg, plan, cells, {}, None, gates, REGISTRATION)
    report = (tmp_path / "res/report.md").read_text()
    heads = [ln for ln in report.splitlines() if ln.startswith("## ")]
    assert heads[:7] == ["## Verdicts", "## Settings", "## Pre-registered plan", "## Stage gates", "## Pilot",
                         "## Power analysis", "## Secondary comparisons: the paper's claims"]
    assert report.index("![headline") < report.index("## Settings") and (tmp_path / "res/headline.png").is_file()
    d = np.array([gain[s][2] for s in cfg.seeds])  # 4/255
    v = res["primary"]["pairs"]["GUARD vs SRe2L"]
    t = sps.ttest_1samp(d, 0.0)
    assert v["p"] == pytest.approx(t.pvalue, rel=1e-9) and v["p_holm"] == pytest.approx(t.pvalue, rel=1e-9)
    assert v["diffs"] == pytest.approx(list(d), abs=1e-12)
    ci = t.confidence_interval(0.95)
    assert (v["ci"]["lo"], v["ci"]["hi"]) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert v["mdd"] == pytest.approx(S.mdd(d.std(ddof=1), 3))
    assert v["verdict"] == ("supported" if t.pvalue < 0.05 and d.mean() > 0 else
                            "equivalent" if S.tost(list(d), 0.02)["equivalent"] else "underpowered")
    assert v["clean"]["verdict"] == "supported"  # GUARD's clean accuracy is never lower here
    assert f"| GUARD vs SRe2L | 3 | {100 * d.mean():+.2f}" in report and v["verdict"] in report
    assert "| teacher_min |" in report and "`abc`" in report
    pilot = {r["eps"]: r for r in res["pilot"]}
    assert pilot["4/255"]["sd"] == pytest.approx(d.std(ddof=1)) and pilot["4/255"]["n_needed"] == S.n_for_mdd(
        d.std(ddof=1), 0.02)


def test_no_verdict_before_every_registered_seed_is_in_and_the_readme_says_so(tmp_path):
    """The stopping rule: with 3 of 5 registered seeds the primary family gets no verdict (the report and the README
    block say pending); with all 5 the README block leads with the verdict, names the data and the test subset."""
    from guard_fast.study.report import write_study_report

    readme = tmp_path / "README.md"
    extra = ["--seeds=[0,1,2,3,4]", "--plan.seeds=5", f"--readme={readme}", "--pipeline.data.dataset=fashion-mnist",
             "--pipeline.evaluate.num_images=5000"]
    for n, verdict in ((3, False), (5, True)):
        readme.write_text("# x\n\n<!-- res:begin -->\nold\n<!-- res:end -->\n")
        cfg, plan, cells, _, _ = _made_up_study(tmp_path, extra, with_results=n)
        res = write_study_report(cfg, plan, cells, {}, None, [], REGISTRATION)
        report, block = (tmp_path / "res/report.md").read_text(), readme.read_text()
        assert bool(res["primary"]["pairs"]) is verdict
        pending = f"GUARD vs SRe2L: {n} of 5 registered paired seeds"
        assert (pending in report and pending in block and "no verdict until all are in" in block) is not verdict
        if verdict:
            v = res["primary"]["pairs"]["GUARD vs SRe2L"]
            assert v["n"] == 5 and f"5 paired seeds: {100 * v['mean']:+.2f} points" in block
            assert f"**{v['verdict']}**" in block and "| GUARD vs SRe2L | 5 |" in report
        assert "the fashion-mnist data **" in report and "digits data" not in report
        if not verdict:  # no interim look: neither the rows nor any claim's verdict, only the seeds in so far
            assert "| GUARD IPC" not in block and "data **" not in block and "withheld" in block
            assert "Seeds in so far: GUARD IPC 10 3/5, SRe2L IPC 10 3/5" in block
            continue
        assert "the fashion-mnist data" in block and "digits" not in block and "5000-image subset" in block


# --- carried across checkouts --------------------------------------------------------------------------------------

def test_carry_restores_only_a_matching_job_and_never_weights(tmp_path):
    from guard_fast.study import carry

    runs, kept = tmp_path / "runs", tmp_path / "carry"
    job = runs / "seed0" / "base"
    for rel, data in (("teachers/none/stage.json", b"{}"), ("teachers/none/teacher.pt", b"w"),
                      ("m/ipc1/recover/images/0.png", b"p"), ("m/ipc1/evaluate/evaluation.json", b"{}"),
                      ("teachers/none/checkpoints/latest.json", b"{}"), ("big.json", b"x" * (carry.MAX_BYTES + 1))):
        (job / rel).parent.mkdir(parents=True, exist_ok=True)
        (job / rel).write_bytes(data)
    key = {"fingerprint": "abc", "methods": ["m"], "ipc": [1]}
    carry.save(runs, kept, "seed0/base", key)
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*") if p.is_file()) == [
        "seed0/base/done.json", "seed0/base/m/ipc1/evaluate/evaluation.json", "seed0/base/teachers/none/stage.json"]
    fresh = tmp_path / "fresh"  # a new checkout
    assert not carry.restore(fresh, kept, "seed0/base", {**key, "ipc": [1, 10]})  # another job: run it
    assert not (fresh / "seed0/base").exists()
    assert carry.restore(fresh, kept, "seed0/base", key) and carry.restore(fresh, kept, "seed0/base", key)
    assert (fresh / "seed0/base/teachers/none/stage.json").is_file()
    assert not carry.restore(fresh, kept, "seed0/base", {**key, "fingerprint": "new"})  # the job changed:
    assert not (fresh / "seed0/base").exists()  # its carried stage records go, so no stage is trusted without weights
    assert not carry.restore(runs, kept, "seed0/base", key)  # a real run's folder: its own cache decides


@pytest.mark.subprocess
def test_a_new_checkout_resumes_the_study_from_its_carried_jobs(digits_subset, tmp_path):
    data = digits_subset(8, 4)
    args = [*tiny_study(data, tmp_path / "runs", tmp_path / "res", seeds=2), "--pipeline.dist.cpu_threads=1",
            "--pipeline.train.optim.epochs=2", "--pipeline.recover.iterations=3", "--workers=1"]
    study(args)
    first = json.loads((tmp_path / "res/results.json").read_text())["cells"]
    assert (tmp_path / "res/carry/seed0/base/done.json").is_file() and (tmp_path / "res/carry/cells.json").is_file()
    assert not [p for p in (tmp_path / "res/carry").rglob("*") if p.suffix in (".pt", ".png")]
    shutil.rmtree(tmp_path / "runs")  # runs_dir is never committed: a new checkout has none
    study([*args, "--report_only"])
    assert json.loads((tmp_path / "res/results.json").read_text())["cells"] == first
    shutil.rmtree(tmp_path / "runs")
    r = study(args)
    assert ": running" not in r.stdout and "restored from" in r.stdout, r.stdout[-3000:]
    assert json.loads((tmp_path / "res/results.json").read_text())["cells"] == first and first


def test_compute_spent_counts_the_stages_of_the_reports_own_seeds(tmp_path):
    """A pilot's report (its first seeds) had counted every stage under the cache folder, the main run's other seeds
    included (5.54 h became 13.59 h when the pilot report was regenerated after the main run)."""
    from guard_fast.study.report import stage_time

    cfg, *_ = _made_up_study(tmp_path, ["--seeds=[0,1]"])
    for rel, seconds in (("seed0/base/teachers/none", 10.0), ("seed1/base/a/ipc10/train", 20.0),
                         ("seed2/base/teachers/none", 400.0), ("seed11/base/x", 800.0),
                         ("selection/guard/c/seed0/teachers/guard", 5.0)):
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "stage.json").write_text(json.dumps({"seconds": seconds}))
    assert stage_time(cfg) == (35.0, 3)
