"""The real-subset control arm (`sre2l:images=real`, issue 30 item 4): seeded real train images of the right classes
and counts, relabelled and distilled by the same teacher as the SRe2L row, nameable by the KD recipe gate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from guard_fast.data.synthetic import load_synthetic
from guard_fast.distill.subset import SubsetConfig, run_subset
from guard_fast.runtime.config import load_config
from tests.conftest import ONE, REPO


def subset(data, out, seed: int, ipc: int = 2):
    cfg = load_config(SubsetConfig, None, ["--data.dataset=fashion-mnist", f"--data.path={data}",
                                           f"--output.dir={out}", f"--ipc={ipc}", f"--dist.seed={seed}"])
    run_subset(cfg, ONE)
    return load_synthetic(out, 10)


def test_subset_is_ipc_real_train_images_per_class_seeded_by_the_seed(tiny_fmnist, tmp_path):
    a, again, other = subset(tiny_fmnist, tmp_path / "a", 0), subset(tiny_fmnist, tmp_path / "b", 0), \
        subset(tiny_fmnist, tmp_path / "c", 1)
    assert a.pixels.shape == (20, 1, 28, 28) and a.labels.bincount().tolist() == [2] * 10
    sources = [it["source"] for it in a.manifest["items"]]
    assert len(set(sources)) == 20
    classes = a.manifest["classes"]
    for px, label, src in zip(a.pixels, a.labels, sources, strict=True):  # each image is the train image it names
        assert src.split("/")[0] == classes[int(label)]
        png = np.asarray(Image.open(tiny_fmnist / "train" / src))
        assert torch.equal(px[0], torch.from_numpy(png.copy()))
    assert torch.equal(a.pixels, again.pixels) and sources == [it["source"] for it in again.manifest["items"]]
    assert [it["source"] for it in other.manifest["items"]] != sources  # another seed, another draw


def test_a_class_with_too_few_images_is_one_line(tiny_fmnist, tmp_path):
    from guard_fast.runtime.errors import GuardFastError

    with pytest.raises(GuardFastError, match="fewer than ipc = 50"):
        subset(tiny_fmnist, tmp_path / "x", 0, ipc=50)


def test_real_arm_plans_the_sre2l_rows_teacher_and_no_recover(tmp_path):
    from guard_fast.pipeline import PipelineConfig, plan_pipeline

    cfg = load_config(PipelineConfig, None, ["--methods=sre2l:teacher=none,sre2l:images=real,"
                                             "sre2l:teacher=guard:images=real", "--ipc=3"])
    chains = {label: {s.kind: s for s in stages} for label, _, stages in plan_pipeline(cfg, tmp_path)}
    assert list(chains) == ["SRe2L", "Real subset", "Real subset(GUARD teacher)"]
    real, sre2l = chains["Real subset"], chains["SRe2L"]
    assert list(real) == ["squeeze", "subset", "relabel", "train", "evaluate"]
    assert real["squeeze"].folder == sre2l["squeeze"].folder == tmp_path / "teachers/none"
    assert chains["Real subset(GUARD teacher)"]["squeeze"].folder == tmp_path / "teachers/guard"
    teacher = str(tmp_path / "teachers/none/teacher.pt")
    assert real["relabel"].config.model.checkpoint == real["train"].config.teacher.checkpoint == teacher
    assert real["relabel"].config.images == real["train"].config.images == str(real["subset"].folder)
    assert real["subset"].config.ipc == 3 and real["subset"].inputs == []
    assert real["relabel"].inputs == [real["subset"].folder, sre2l["squeeze"].folder]


def test_real_arm_reuses_the_teacher_in_a_run(tiny_fmnist, tmp_path, monkeypatch):
    """One pipeline call with SRe2L and the real arm trains one teacher; a second call with the real arm alone finds
    that teacher cached, and its relabel reads the same checkpoint."""
    from guard_fast.methods import sre2l
    from guard_fast.pipeline import PipelineConfig, run_pipeline

    args = [f"--data.path={tiny_fmnist}", "--data.dataset=fashion-mnist", "--data.batch_size=20", "--data.workers=0",
            "--data.eval_batch_size=20", f"--output.dir={tmp_path}", "--output.progress=false", "--ipc=1",
            "--squeeze.model.width=4", "--squeeze.optim.epochs=1", "--squeeze.val_batches=1",
            "--recover.iterations=2", "--recover.batch_size=10", "--train.model.width=4", "--train.optim.epochs=2",
            "--train.views.batch_size=10", "--train.val_batches=1", "--evaluate.num_images=4",
            "--evaluate.attack.names=pgd100", "--evaluate.attack.eps=1/255", "--evaluate.attack.pgd_steps=1"]
    out = run_pipeline(load_config(PipelineConfig, None, [*args, "--methods=sre2l:teacher=none,sre2l:images=real"]),
                       ONE)
    ran = [s["stage"] for s in out["stages"] if not s["cached"]]
    assert ran.count("teachers/none") == 1 and "sre2l-images-real/ipc1/subset" in ran
    assert not any(s.startswith("sre2l-images-real") and s.endswith("recover") for s in ran)
    assert {r["label"] for r in out["rows"]} == {"SRe2L IPC 1", "Real subset IPC 1"}
    calls = []
    monkeypatch.setattr(sre2l, "run_squeeze", lambda *a: calls.append(a) or pytest.fail("teacher retrained"))
    again = run_pipeline(load_config(PipelineConfig, None, [*args, "--methods=sre2l:images=real"]), ONE)
    assert all(s["cached"] for s in again["stages"]) and not calls
    relabel = json.loads((tmp_path / "sre2l-images-real/ipc1/relabel/config.json").read_text())
    assert relabel["model"]["checkpoint"] == str(tmp_path / "teachers/none/teacher.pt")


def test_kd_row_gate_can_name_the_real_arm(tmp_path):
    from guard_fast.runtime.errors import ConfigError
    from guard_fast.study.config import load_study
    from guard_fast.study.plan import plan_study
    from guard_fast.study.run import measure_gates

    preset = str(REPO / "configs/digits/study.toml")
    rows = '--table12.rows=["sre2l:teacher=none","sre2l:images=real"]'
    cfg = load_study(["--config", preset, f"--runs_dir={tmp_path}", rows, "--table12.pairs=[]", "--plan.pairs=[]",
                      "--table5.rows=[]", "--table5.pairs=[]", "--table3.rows=[]", "--table3.pairs=[]",
                      "--gates.kd_row=Real subset", "--gates.kd_min=0.6", "--gates.teacher_min=0"])
    plan = plan_study(cfg, {})
    assert plan.cells[("table12", "Real subset", 10)] == "base/Real subset IPC 10"
    assert [c.methods for c in plan.calls] == [["sre2l:teacher=none", "sre2l:images=real"]]  # one call: one teacher
    cells = {"base/Real subset IPC 10": {0: [{"eps": 1 / 255, "clean": 0.7}], 1: [{"eps": 1 / 255, "clean": 0.5}]}}
    res = measure_gates(cfg, plan, cells)
    assert [(r["where"], r["ok"]) for r in res] == [("Real subset, seed 0", True), ("Real subset, seed 1", False)]
    with pytest.raises(ConfigError, match="gates.kd_row = 'Real'"):
        load_study(["--config", preset, rows, "--table12.pairs=[]", "--plan.pairs=[]", "--gates.kd_row=Real",
                    "--gates.kd_min=0.6"])
