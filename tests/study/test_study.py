"""The study harness on a tiny config: every cell and seed produced, statistics = an independent numpy/scipy
computation on the stored per-seed numbers, verdict logic, a rerun skips everything, a killed study resumes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from tests.conftest import PYTHON, REPO, subprocess_env

SEEDS = [0, 1, 2]


def tiny_study(data: Path, runs: Path, results: Path, readme: Path) -> list[str]:
    p = "--pipeline."
    return [f"{p}data.path={data}", f"{p}data.image_size=16", f"{p}data.batch_size=32", f"{p}data.workers=0",
            f"{p}data.eval_batch_size=40", f"{p}output.progress=false",
            f"{p}squeeze.model.width=4", f"{p}squeeze.optim.epochs=1", f"{p}squeeze.val_batches=1",
            f"{p}recover.iterations=3", f"{p}recover.batch_size=20", f"{p}recover.jitter=1",
            f"{p}train.model.width=4", f"{p}train.optim.epochs=2", f"{p}train.views.batch_size=10",
            f"{p}train.val_batches=1", f"{p}evaluate.num_images=0", f"{p}evaluate.attack.names=[\"pgd100\",\"cw\"]",
            f"{p}evaluate.attack.eps=[\"1/255\",\"8/255\"]", f"{p}evaluate.attack.pgd_steps=2",
            f"{p}evaluate.attack.cw_steps=2",
            f"--seeds={SEEDS}", f"--runs_dir={runs}", f"--results_dir={results}", f"--readme={readme}",
            "--table12.title=T12", "--table12.rows=[\"sre2l:teacher=guard | @guard\",\"sre2l:teacher=none\"]",
            "--table12.ipc=[1]", "--table12.pairs=[\"GUARD vs SRe2L\"]",
            "--table3.title=T3", "--table3.rows=[\"sre2l:teacher=guard | @guard\","
            "\"sre2l:teacher=grad-norm:label=GN | --squeeze.objective.grad_norm_beta=0.1\"]",
            "--table3.ipc=[1]", "--table3.pairs=[\"GUARD vs GN\"]",
            "--selection.ipc=1", "--selection.val_fraction=0.25", "--selection.eps=1/255",
            "--selection.guard=[\"squeeze.objective.beta=0.01,0.1\"]",
            "--plan.pairs=[\"GUARD vs SRe2L\"]", "--plan.ipc=1", "--plan.eps=8/255", f"--plan.seeds={len(SEEDS)}",
            "--plan.stopping_rule=all seeds, no interim look"]


@pytest.fixture(scope="module")
def study_data(digits_subset) -> Path:
    """10 classes x 8 train / 4 val images (selection split: 6 train / 2 held out per class)."""
    return digits_subset(8, 4)


def study(args: list[str], wait: bool = True):
    cmd = [PYTHON, str(REPO / "launchers/study.py"), *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=subprocess_env(), cwd=REPO)
    r = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    return r


def make_readme(path: Path, name: str) -> Path:
    path.write_text(f"# x\n\n<!-- {name}:begin -->\nold\n<!-- {name}:end -->\n\nafter\n")
    return path


@pytest.fixture(scope="module")
def finished(study_data, tmp_path_factory) -> tuple[list[str], Path, Path]:
    root = tmp_path_factory.mktemp("study")
    readme = make_readme(root / "README.md", "res")
    args = tiny_study(study_data, root / "runs", root / "res", readme)
    study(args)
    return args, root / "runs", root / "res"


def results(res: Path) -> dict:
    return json.loads((res / "results.json").read_text())


@pytest.mark.subprocess
def test_every_cell_and_seed_is_produced(finished):
    _, runs, res = finished
    r = results(res)
    assert r["missing"] == []
    for table, labels in (("table12", ["GUARD IPC 1", "SRe2L IPC 1"]), ("table3", ["GN IPC 1", "GUARD IPC 1"])):
        assert sorted(r["tables"][table]["rows"]) == labels
        for row in r["tables"][table]["rows"].values():
            assert sorted(r["cells"][row["cell"]]) == [str(s) for s in SEEDS]  # JSON keys
            for eps in ("1/255", "8/255"):
                assert row["stats"][eps]["pgd100"]["n"] == len(SEEDS)
    # GUARD is one cell shared by both tables (one teacher per seed), the selected beta is in its settings
    sel = r["selection"]["guard"]
    assert len(sel["candidates"]) == 2 and sel["best"] in [c["overrides"] for c in sel["candidates"]]
    cell = r["tables"]["table12"]["rows"]["GUARD IPC 1"]["cell"]
    assert cell == r["tables"]["table3"]["rows"]["GUARD IPC 1"]["cell"]
    assert sel["best"][0].split("=")[1] in cell
    # selection ran on the split of the training images, never on val
    manifest = json.loads((runs / "data/selection/manifest.json").read_text())
    assert (manifest["train"], manifest["val"]) == (60, 20) and manifest["want"]["source"].endswith("train")
    report = (res / "report.md").read_text()
    for name in ("table12-ipc1.png", "table3-ipc1.png"):
        assert (res / name).stat().st_size > 0 and name in report
    assert "14/255 here" in report and "supports" in report and "Hyperparameter selection" in report
    readme = (res.parent / "README.md").read_text()
    assert "old" not in readme and "after" in readme and "res/report.md" in readme and "| GUARD IPC 1 |" in readme


def value(row: dict, c: dict, eps: float) -> float:
    """The per-seed number comparison `c` is about: an accuracy, or a drop rate (clean - robust) / clean."""
    if c["claim"] != "drop":
        return row[(eps, c["column"])]
    clean = row[(eps, "clean")]
    return (clean - row[(eps, c["column"])]) / clean


@pytest.mark.subprocess
def test_statistics_equal_an_independent_computation(finished):
    _, _, res = finished
    r = results(res)
    per_seed = {cid: {int(s): {(row["eps"], k): v for row in rows for k, v in row.items() if k not in ("label", "eps")}
                      for s, rows in seeds.items()} for cid, seeds in r["cells"].items()}
    for table in ("table12", "table3"):
        for row in r["tables"][table]["rows"].values():
            cells = per_seed[row["cell"]]
            for eps_label, e in row["stats"].items():
                eps = {"1/255": 1 / 255, "8/255": 8 / 255}[eps_label]
                for col in ("clean", "pgd100", "cw"):
                    vals = np.array([cells[s][(eps, col)] for s in SEEDS])
                    assert e[col]["mean"] == pytest.approx(vals.mean(), abs=1e-12)
                    assert e[col]["std"] == pytest.approx(vals.std(ddof=1), abs=1e-12)
    comps = [c for c in r["comparisons"] if c["pair"] == "GUARD vs SRe2L (table12)"]
    assert {c["claim"] for c in comps} == {"clean", "robust", "drop"}
    cells = r["tables"]["table12"]["rows"]
    g, b = per_seed[cells["GUARD IPC 1"]["cell"]], per_seed[cells["SRe2L IPC 1"]["cell"]]
    for c in comps:
        eps = {None: 1 / 255, "1/255": 1 / 255, "8/255": 8 / 255}[c["eps"]]

        t, base = (np.array([value(cell[s], c, eps) for s in SEEDS]) for cell in (g, b))
        assert c["diffs"] == pytest.approx(list(t - base), abs=1e-12)
        if np.std(t - base) > 0:
            ci = sps.ttest_rel(t, base).confidence_interval(0.95)
            assert (c["lo"], c["hi"]) == pytest.approx((ci.low, ci.high), abs=1e-9)


@pytest.mark.subprocess
def test_rerun_is_all_cached_and_report_only_runs_nothing(finished):
    args, runs, res = finished
    before = results(res)
    r = study(args)
    assert ": running" not in r.stdout and ": resuming" not in r.stdout and ": cached" in r.stdout
    after = results(res)
    assert after["cells"] == before["cells"] and after["cell_stats"] == before["cell_stats"]
    r = study([*args, "--report_only"])
    assert ": cached" not in r.stdout and results(res)["cell_stats"] == before["cell_stats"]


@pytest.mark.subprocess
def test_killed_study_resumes_and_skips_finished_cells(study_data, finished, tmp_path):
    """Killed while its 2 workers run cell stages: the workers exit with it (no stage finishes afterwards), and the
    rerun skips every stage finished before the kill and ends with the uninterrupted study's numbers."""
    args, _, res_full = finished
    runs, res = tmp_path / "runs", tmp_path / "res"
    args = tiny_study(study_data, runs, res, make_readme(tmp_path / "README.md", "res"))
    proc = study(args, wait=False)

    def finished_stages() -> dict[str, str]:
        return {p.parent.relative_to(runs).as_posix(): json.loads(p.read_text())["completion_id"]
                for p in runs.rglob("stage.json")}

    deadline = time.time() + 600
    while not any(p.startswith("seed") for p in finished_stages()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the study finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1.5)  # orphaned workers notice within 0.5 s
    done = finished_stages()
    time.sleep(3)
    assert finished_stages() == done  # no worker outlived the study
    assert any(p.startswith("seed") for p in done) and any(p.startswith("selection/") for p in done)
    r = study(args)
    assert ": running" in r.stdout or ": resuming" in r.stdout  # the rest of the study did run
    after = finished_stages()
    assert {p: after[p] for p in done} == done  # every stage finished before the kill was skipped, not rerun
    assert len(after) > len(done)
    assert results(res)["cells"] == results(res_full)["cells"]  # deterministic stages: same numbers


@pytest.mark.parametrize("lo, hi, direction, want", [
    (0.01, 0.2, +1, "supports"), (-0.2, -0.01, +1, "contradicts"), (-0.1, 0.1, +1, "cannot tell"),
    (-0.2, -0.01, -1, "supports"), (0.01, 0.2, -1, "contradicts"), (None, None, +1, "cannot tell"),
    (0.0, 0.1, +1, "cannot tell"),
])
def test_verdict_logic(lo, hi, direction, want):
    from guard_fast.study.stats import verdict

    assert verdict(lo, hi, direction) == want


def test_overall_verdict_and_paired_interval_on_synthetic_numbers():
    from guard_fast.study.stats import overall, paired, summarize

    assert overall(["supports", "supports", "cannot tell"]) == "supports"
    assert overall(["supports", "contradicts"]) == "cannot tell"
    assert overall(["contradicts", "cannot tell"]) == "contradicts"
    assert overall(["supports", "cannot tell", "cannot tell"]) == "cannot tell"
    assert overall([]) == "cannot tell"
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.6, 0.05, 5), rng.normal(0.5, 0.05, 5)
    p = paired(list(a), list(b))
    ci = sps.ttest_rel(a, b).confidence_interval(0.95)
    assert (p["lo"], p["hi"]) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert p["mean"] == pytest.approx(np.mean(a - b)) and p["n"] == 5
    s = summarize([1.0])
    assert s["std"] is None and paired([1.0], [0.5])["lo"] is None
    with pytest.raises(ValueError):
        paired([1.0, 2.0], [1.0])


def test_plan_shares_settings_and_groups_ipc(tmp_path):
    """Rows with the same settings share one pipeline folder; a knob's selected overrides become the row's settings;
    methods needing the same IPCs share one call; a row whose selection is missing is pending."""
    from guard_fast.runtime.config import load_config
    from guard_fast.study.config import StudyConfig
    from guard_fast.study.plan import plan_study

    cfg = load_config(StudyConfig, REPO / "configs/digits/study.toml")
    sel = {k: {"best": [c.strip() for c in getattr(cfg.selection, k)[0].split(",")[:1]]} for k in ("guard", "pgd_at")}
    sel = {k: {"best": ["--" + v["best"][0]]} for k, v in sel.items()}
    plan = plan_study(cfg, sel)
    guard = plan.cells[("table12", "GUARD", 10)]
    assert guard == plan.cells[("table5", "GUARD", 10)] and guard.startswith("beta-")
    assert plan.cells[("table12", "SRe2L", 10)] == "base/SRe2L IPC 10"
    assert plan.cells[("table5", "CDA", 1)] == "base/CDA IPC 1"
    base_calls = [c for c in plan.calls if c.slug == "base"]
    assert sorted(tuple(c.ipc) for c in base_calls) == [(1, 10), (1, 10, 50), (10, 50)]
    assert {m for c in base_calls for m in c.methods} == {"sre2l:teacher=none", "cda:teacher=none", "dc",
                                                          "dc:guard=true", "mtt", "tesla"}
    assert plan.cells[("table12", "TESLA", 50)] == "base/TESLA IPC 50"
    assert plan.cells[("table5", "GUARD(DC)", 1)] == "base/GUARD(DC) IPC 1"
    assert len({c.slug for c in plan.calls if any("grad-norm" in m for m in c.methods)}) == len(cfg.table3.rows) - 1
    assert load_config(StudyConfig, REPO / "configs/digits/study.toml").seeds == [0, 1, 2]
    pending = plan_study(cfg, {})
    assert any("GUARD" in p for p in pending.pending) and ("table12", "GUARD", 10) not in pending.cells


@pytest.mark.parametrize("override, message", [
    ("--table12.pairs=[\"GUARD vs KIP\"]", "both labels"),
    ("--table12.rows=[\"sre2l:teacher=none | squeeze.optim.lr=1\"]", "neither"),
    ("--selection.guard=[]", "selection.guard is empty"),
    ("--figures=[\"fig9\"]", "registered figures"),
    ("--seeds=[1,1]", "distinct"),
])
def test_bad_study_configs_are_refused(override, message):
    from guard_fast.runtime.config import load_config
    from guard_fast.runtime.errors import ConfigError
    from guard_fast.study.config import StudyConfig

    with pytest.raises(ConfigError, match=message):
        load_config(StudyConfig, REPO / "configs/digits/study.toml", [override])


def test_curvature_figure_pools_seeds_and_pairs_medians(tmp_path):
    """Fig. 2 from curvature stages on disk: only Table 1/2 students at its smallest IPC (and teachers) are drawn,
    images of all seeds pooled; GUARD vs SRe2L is the paired t-interval of per-seed medians (independent numpy/scipy
    computation), and an unfinished stage (no stage.json) is ignored."""
    from guard_fast.runtime.config import load_config
    from guard_fast.study.config import StudyConfig
    from guard_fast.study.figures import FigureContext, curvature_figure

    rng = np.random.default_rng(0)
    runs = tmp_path / "runs"
    cfg = load_config(StudyConfig, REPO / "configs/digits/study.toml", [f"--runs_dir={runs}", "--seeds=[0,1,2]"])
    values: dict[str, dict[int, np.ndarray]] = {}

    def stage(folder: Path, label: str, group: str, seed: int, scale: float, done: bool = True) -> None:
        v = rng.uniform(0.5, 1.5, size=9) * scale
        values.setdefault(label, {})[seed] = v
        folder.mkdir(parents=True)
        (folder / "curvature.json").write_text(json.dumps({"models": [{"label": label, "group": group, "records": [
            {"lambda_max": float(x), "fd_curvature": float(x), "cos_grad_top": 0.5, "position": i}
            for i, x in enumerate(v)]}]}))
        if done:
            (folder / "stage.json").write_text("{}")

    for seed in cfg.seeds:
        g, b = runs / f"seed{seed}" / "beta-0.01", runs / f"seed{seed}" / "base"
        stage(g / "sre2l-teacher-guard/ipc10/curvature", "GUARD IPC 10", "students", seed, 1.0)
        stage(b / "sre2l-teacher-none/ipc10/curvature", "SRe2L IPC 10", "students", seed, 2.0)
        stage(b / "sre2l-teacher-none/ipc50/curvature", "SRe2L IPC 50", "students", seed, 9.0)  # not IPC 10
        stage(b / "curvature/teacher-none", "none teacher", "teachers", seed, 3.0)
        stage(b / "mtt/ipc10/curvature", "MTT IPC 10", "students", seed, 5.0, done=False)
    table_cells = {("table12", "GUARD", 10): "beta-0.01/GUARD IPC 10", ("table12", "SRe2L", 10): "base/SRe2L IPC 10",
                   ("table12", "SRe2L", 50): "base/SRe2L IPC 50", ("table12", "MTT", 10): "base/MTT IPC 10"}
    cells = {cid: {0: []} for cid in table_cells.values()}
    out = tmp_path / "results"
    out.mkdir()
    figs = curvature_figure(FigureContext(cfg, out, cells, table_cells))
    assert [p for _, p in figs] == [Path("curvature.png")] and (out / "curvature.png").stat().st_size > 1000
    summary = json.loads((out / "curvature.json").read_text())
    assert {m["label"] for m in summary["models"]} == {"GUARD IPC 10", "SRe2L IPC 10", "none teacher"}
    guard = next(m for m in summary["models"] if m["label"] == "GUARD IPC 10")
    assert guard["pooled"]["n"] == 27
    assert guard["pooled"]["median"] == pytest.approx(np.median(np.concatenate(list(values["GUARD IPC 10"].values()))))
    (pair,) = summary["pairs"]
    d = np.array([np.median(values["GUARD IPC 10"][s]) - np.median(values["SRe2L IPC 10"][s]) for s in cfg.seeds])
    half = sps.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    assert pair["mean"] == pytest.approx(d.mean()) and pair["lo"] == pytest.approx(d.mean() - half)
    assert pair["verdict"] == ("supports" if d.mean() + half < 0 else "cannot tell")
    assert "GUARD IPC 10 vs SRe2L IPC 10" in (out / "curvature.md").read_text()
