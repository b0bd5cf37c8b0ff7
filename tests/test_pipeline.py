"""End-to-end pipeline on a tiny config: every attack column for every method, caching, partial reruns, kill+resume."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO, subprocess_env

COLUMNS = ("Clean", "PGD100", "Square", "AutoAttack", "CW", "MIM")


def tiny(data: Path, out: Path) -> list[str]:
    return [f"--data.path={data}", "--data.image_size=16", "--data.batch_size=32", "--data.workers=0",
            "--data.eval_batch_size=20", f"--output.dir={out}", "--output.progress=false", "--output.ckpt_every=2",
            "--methods=sre2l:teacher=guard,sre2l:teacher=none", "--ipc=2",
            "--squeeze.model.width=4", "--squeeze.optim.epochs=1", "--squeeze.optim.lr=0.05", "--squeeze.val_batches=1",
            "--squeeze.objective.beta=0.01",
            "--recover.iterations=6", "--recover.batch_size=20", "--recover.lr=0.1", "--recover.jitter=1",
            "--train.model.width=4", "--train.optim.epochs=3", "--train.views.batch_size=10", "--train.val_batches=1",
            "--evaluate.num_images=20", "--evaluate.attack.eps=1/255", "--evaluate.attack.pgd_steps=2",
            "--evaluate.attack.square_queries=5", "--evaluate.attack.aa_steps=2",
            "--evaluate.attack.aa_square_queries=5", "--evaluate.attack.cw_steps=2", "--evaluate.attack.mim_steps=2"]


@pytest.fixture(scope="module")
def small_digits(digits_subset) -> Path:
    """10 classes x 16 train / 4 val images."""
    return digits_subset(16, 4)


def pipeline(data: Path, out: Path, *extra: str, wait: bool = True):
    cmd = [PYTHON, str(REPO / "launchers/pipeline.py"), *tiny(data, out), *extra]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=subprocess_env(), cwd=REPO)
    r = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def stages(out: Path) -> dict[str, bool]:
    """stage name -> cached? for the last run."""
    return {s["stage"]: s["cached"] for s in json.loads((out / "results.json").read_text())["stages"]}


def accuracies(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["rows"]


@pytest.fixture(scope="module")
def full_run(small_digits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipe") / "full"
    pipeline(small_digits, out)
    return out


@pytest.mark.subprocess
def test_report_has_every_attack_for_every_method(full_run):
    report = (full_run / "report.md").read_text()
    table = next(ln for ln in report.splitlines() if ln.startswith("| Checkpoint | Clean"))
    assert all(c in table for c in COLUMNS)
    rows = accuracies(full_run)
    assert {r["label"] for r in rows} == {"GUARD IPC 2", "SRe2L IPC 2"}
    for r in rows:
        assert {"clean", "pgd100", "square", "autoattack", "cw", "mim"} <= r.keys()
        assert all(0 <= r[k] <= r["clean"] for k in ("pgd100", "autoattack", "mim"))
        assert f"| {r['label']} | {100 * r['clean']:.2f} |" in report
    for name in ("robustness.png", "sre2l-teacher-guard/ipc2/recover/grid.png",
                 "sre2l-teacher-none/ipc2/recover/grid.png"):
        assert (full_run / name).stat().st_size > 0 and name in report
    assert len(stages(full_run)) == 10 and not any(stages(full_run).values())


@pytest.mark.subprocess
def test_rerun_skips_and_deleting_an_output_reruns_downstream(small_digits, full_run):
    before = accuracies(full_run)
    pipeline(small_digits, full_run)
    assert all(stages(full_run).values()), stages(full_run)
    (full_run / "sre2l-teacher-none/ipc2/relabel/labels.json").unlink()
    pipeline(small_digits, full_run)
    ran = sorted(k for k, cached in stages(full_run).items() if not cached)
    assert ran == [f"sre2l-teacher-none/ipc2/{s}" for s in ("evaluate", "relabel", "train")]
    assert accuracies(full_run) == before  # deterministic stages reproduce the same numbers
    pipeline(small_digits, full_run, "--force=evaluate")
    assert sorted(k for k, c in stages(full_run).items() if not c) == ["sre2l-teacher-guard/ipc2/evaluate",
                                                                              "sre2l-teacher-none/ipc2/evaluate"]


@pytest.mark.subprocess
def test_killed_pipeline_resumes_to_the_same_report(small_digits, full_run, tmp_path):
    out = tmp_path / "killed"
    proc = pipeline(small_digits, out, wait=False)
    marker = out / "sre2l-teacher-guard/ipc2/train/checkpoints/latest.json"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the pipeline finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists()
    r = pipeline(small_digits, out)
    assert "sre2l-teacher-guard/ipc2/train: resuming" in r.stdout
    assert accuracies(out) == accuracies(full_run)


@pytest.mark.parametrize("name", ["digits/demo.toml", "imagenette/pipeline.toml", "tiny-imagenet/pipeline.toml",
                                  "imagenet-1k/pipeline.toml"])
def test_pipeline_presets_load(name):
    from guard_fast.pipeline import PipelineConfig
    from guard_fast.runtime.config import load_config

    cfg = load_config(PipelineConfig, REPO / "configs" / name)
    assert cfg.methods == ["sre2l:teacher=guard", "sre2l:teacher=none"]
    if name != "digits/demo.toml":  # the paper's settings (docs/spec.md sections 2-5)
        assert cfg.ipc == [10, 50, 100] and cfg.recover.iterations == 2000 and cfg.train.optim.epochs == 300
        assert (cfg.train.optim.name, cfg.train.optim.lr, cfg.train.temperature) == ("adamw", 1e-3, 20.0)
        assert cfg.evaluate.attack.pgd_steps == 100 and cfg.evaluate.attack.square_queries == 5000
        assert (cfg.recover.r_bn, cfg.recover.lr) == ((1.0, 0.1) if "tiny" in name else (0.01, 0.25))


@pytest.mark.subprocess
def test_bad_pipeline_config_is_one_line():
    r = subprocess.run([PYTHON, "-m", "launchers.cli", "pipeline", "--methods=sre2l:teacher=guard,cure"],
                       capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=300)
    assert r.returncode == 2 and "methods" in r.stderr and "Traceback" not in r.stderr


def test_method_registry_plans_shared_teachers_and_labels(tmp_path):
    """sre2l and cda with the same teacher share its squeeze folder; cda turns recover's curriculum on; labels come
    from the method; the evaluate stage attacks the method's own student."""
    from guard_fast.pipeline import PipelineConfig, plan_pipeline
    from guard_fast.runtime.config import load_config

    cfg = load_config(PipelineConfig, None, ["--methods=sre2l:teacher=guard,cda:teacher=guard:curriculum=linear,"
                                             "cda:teacher=none:label=Mine", "--ipc=1,3"])
    chains = plan_pipeline(cfg, tmp_path)
    assert [(label, ipc) for label, ipc, _ in chains] == [("GUARD", 1), ("GUARD", 3), ("GUARD(CDA)", 1),
                                                          ("GUARD(CDA)", 3), ("Mine", 1), ("Mine", 3)]
    by = {(label, ipc): {s.kind: s for s in stages} for label, ipc, stages in chains}
    assert by[("GUARD", 1)]["squeeze"].folder == by[("GUARD(CDA)", 3)]["squeeze"].folder == tmp_path / "teachers/guard"
    assert by[("Mine", 1)]["squeeze"].config.objective.name == "none"
    assert by[("GUARD", 1)]["recover"].config.curriculum == "off"
    assert by[("GUARD(CDA)", 3)]["recover"].config.curriculum == "linear"
    assert by[("GUARD(CDA)", 3)]["recover"].config.ipc == 3
    ev = by[("GUARD", 3)]["evaluate"]
    assert ev.config.checkpoints == [str(tmp_path / "sre2l-teacher-guard/ipc3/train/student.pt")]
    assert ev.config.labels == ["GUARD IPC 3"] and ev.inputs == [by[("GUARD", 3)]["train"].folder]
    # train.views.batch_size (default 100) is capped at the set's size, the same for relabel and train
    views = {k: (by[k]["train"].config.views.batch_size, by[k]["relabel"].config.views.batch_size) for k in by}
    assert views[("GUARD", 1)] == (10, 10) and views[("Mine", 3)] == (30, 30)
    big = plan_pipeline(load_config(PipelineConfig, None, ["--methods=sre2l", "--ipc=20"]), tmp_path)
    assert big[0][2][-2].config.views.batch_size == 100  # 200 images: unchanged


@pytest.mark.parametrize("methods, message", [
    ("guard", "the method is 'sre2l:teacher=guard'"),
    ("sre2l:teacher=fancy", "valid values"),
    ("sre2l:color=red", "no option 'color'"),
    ("sre2l:teacher", "options look like"),
    ("sre2l,sre2l", "listed twice"),
])
def test_bad_methods_are_refused(methods, message):
    from guard_fast.pipeline import PipelineConfig
    from guard_fast.runtime.config import load_config
    from guard_fast.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(PipelineConfig, None, [f"--methods={methods}"])
