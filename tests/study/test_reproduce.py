"""The reproduction harness (issue 25 E): random-real sets, cached units, the report's statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from guard_fast import reproduce
from guard_fast.data.synthetic import load_synthetic
from guard_fast.pipeline import PipelineConfig
from guard_fast.reproduce import Cell, parse_cells, random_real_set, run_cells
from guard_fast.runtime.config import load_config
from guard_fast.runtime.errors import GuardFastError
from tests.conftest import REPO

PRESET = str(REPO / "configs" / "fashion-mnist" / "pipeline-dc.toml")


def test_random_real_set_is_ipc_train_images_per_class_seeded_by_draw(tiny_fmnist, tmp_path):
    train = torch.load(tiny_fmnist / "tensors.pt", weights_only=True)["train"]
    sets = [load_synthetic(random_real_set(tiny_fmnist, 2, d, tmp_path / f"d{d}"), 10) for d in (0, 1)]
    for s in sets:
        assert s.pixels.shape == (20, 1, 28, 28) and s.labels.bincount().tolist() == [2] * 10
        for px, item in zip(s.pixels, s.manifest["items"], strict=True):  # each image is the train image it names
            k = int(torch.nonzero(train["ids"] == item["train_id"])[0])
            assert torch.equal(px, train["pixels"][k]) and int(train["labels"][k]) == item["label"]
    assert not torch.equal(sets[0].pixels, sets[1].pixels)


def test_units_are_cached_and_the_report_is_their_statistics(tiny_fmnist, tmp_path, monkeypatch):
    over = [f"--data.path={tiny_fmnist}", "--train_hard.model.width=4", "--train_hard.optim.epochs=2"]
    out = run_cells(PRESET, over, tmp_path / "runs", [Cell("random-real", 1)], 2, 2, 1, tmp_path / "rep", "cmd")
    units = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").rglob("model*.json"))]
    accs = np.array([u["acc"] for u in units])
    row = out["cells"][0]
    assert len(units) == 4 and row["units_done"] == 4 and row["published"] == 51.4
    assert row["mean"] == pytest.approx(accs.mean()) and row["sd"] == pytest.approx(accs.std())  # np.std as DC
    assert row["gap"] == pytest.approx(accs.mean() - 51.4) and row["budget"].startswith("reduced: 2 draws x 2")
    assert (tmp_path / "rep.md").read_text().count("random-real-ipc1") == 1
    monkeypatch.setattr(reproduce, "run_unit", lambda *a: pytest.fail("a cached unit ran again"))
    assert run_cells(PRESET, over, tmp_path / "runs", [Cell("random-real", 1)], 2, 2, 1, tmp_path / "rep",
                     "cmd")["cells"][0]["mean"] == row["mean"]


def test_a_new_checkout_resumes_from_the_committed_report_and_other_cells_are_kept(tiny_fmnist, tmp_path,
                                                                                     monkeypatch):
    over = [f"--data.path={tiny_fmnist}", "--train_hard.model.width=4", "--train_hard.optim.epochs=1"]
    first = run_cells(PRESET, over, tmp_path / "a", [Cell("random-real", 1)], 1, 2, 1, tmp_path / "rep", "c1")
    assert [u["model"] for u in first["units"]] == [0, 1]
    ran = []
    real_unit = reproduce.run_unit
    monkeypatch.setattr(reproduce, "run_unit", lambda *a: ran.append(a[3:]) or real_unit(*a))
    # a fresh cache folder (new checkout): the two finished units come back from rep.json; only model 2 runs
    out = run_cells(PRESET, over, tmp_path / "b", [Cell("random-real", 1)], 1, 3, 1, tmp_path / "rep", "c2")
    assert ran == [(Cell("random-real", 1), 0, 2)] and out["cells"][0]["units_done"] == 3
    smaller = run_cells(PRESET, over, tmp_path / "b", [Cell("random-real", 1)], 1, 2, 1, tmp_path / "rep", "c2b")
    assert smaller["cells"][0]["units_done"] == 2 and len(smaller["units"]) == 3  # the row is the asked budget
    assert smaller["cells"][0]["mean"] == pytest.approx(np.mean([u["acc"] for u in first["units"]]))
    out = run_cells(PRESET, over, tmp_path / "b", [Cell("random-real", 1)], 1, 3, 1, tmp_path / "rep", "c2")
    assert [u["acc"] for u in out["units"][:2]] == [u["acc"] for u in first["units"]]
    # another cell alone: the IPC-1 row and its units stay in the report
    out = run_cells(PRESET, over, tmp_path / "b", [Cell("random-real", 2)], 1, 1, 1, tmp_path / "rep", "c3")
    assert [r["cell"] for r in out["cells"]] == ["random-real-ipc1", "random-real-ipc2"]
    assert len(out["units"]) == 4 and "c2" in (tmp_path / "rep.md").read_text()
    with pytest.raises(GuardFastError, match="cell random-real-ipc1 was run with"):  # one protocol per cell
        run_cells(PRESET, [*over[:2], "--train_hard.optim.epochs=2"], tmp_path / "c", [Cell("random-real", 1)], 1,
                  1, 1, tmp_path / "rep", "c4")


def test_a_dsa_cell_distils_with_dsa_and_trains_its_students_with_dsa(tiny_fmnist, tmp_path):
    over = [f"--data.path={tiny_fmnist}", "--dsa.iterations=2", "--dsa.batch_real=4", "--dsa.model.width=4",
            "--train_dsa.model.width=4", "--train_dsa.optim.epochs=2"]
    out = run_cells(PRESET, over, tmp_path / "runs", parse_cells("dsa:1"), 1, 2, 1, tmp_path / "rep", "cmd")
    set_dir = tmp_path / "runs" / "dsa-ipc1" / "draw0" / "dsa"
    made = json.loads((set_dir / "result.json").read_text())
    assert made["dsa"] and not made["guard"] and made["images"] == 10
    units = out["units"]
    assert [(u["cell"], u["set_method"], u["augment"], u["epochs"]) for u in units] == [
        ("dsa-ipc1", "DSA", "dsa", 2)] * 2
    assert units[0]["distill_cpu_s"] > 0 and units[1]["distill_cpu_s"] == 0  # distilled once, by model 0
    row = out["cells"][0]
    assert row["published"] == 70.6 and row["augment"] == "dsa" and "--dsa.iterations=2" in row["budget"]
    # the preset's DSA protocol is the authors' (README command for Fashion-MNIST, flip kept; 1000 epochs run as 1001)
    cfg = load_config(PipelineConfig, PRESET, [])
    assert (cfg.dsa.init, cfg.dsa.dsa_strategy, cfg.dsa.iterations, cfg.dsa.batch_real, cfg.dsa.lr_img) == (
        "real", "color_crop_cutout_flip_scale_rotate", 1000, 256, 0.1)
    assert (cfg.train_dsa.augment, cfg.train_dsa.optim.epochs, cfg.train_dsa.model.width) == ("dsa", 1001, 128)
    assert {(m, i): reproduce.PUBLISHED[(m, i)] for m, i in [("dsa", 1), ("dsa", 10), ("dsa", 50)]} == {
        ("dsa", 1): 70.6, ("dsa", 10): 84.6, ("dsa", 50): 88.7}


def test_bad_cells_and_process_counts_are_refused(tmp_path):
    assert parse_cells("random-real:1, dc:10, dsa:1") == [Cell("random-real", 1), Cell("dc", 10), Cell("dsa", 1)]
    with pytest.raises(GuardFastError, match="METHOD:IPC"):
        parse_cells("dm:1")
    with pytest.raises(GuardFastError, match="--procs 3"):
        run_cells(PRESET, [], tmp_path, [Cell("dc", 1)], 1, 1, 3, tmp_path / "r", "")


class _Cut(Exception):
    """The machine goes away mid-distillation."""


def test_a_distillation_is_carried_across_checkouts_and_resumes_where_it_stopped(tiny_fmnist, tmp_path,
                                                                                 monkeypatch):
    """runs/ is not committed: an interrupted DC distillation is carried (at its last checkpoint) to
    <report>-carry/, a new checkout resumes it from there and gets the uninterrupted run's images, and a later
    checkout trains more students on the carried finished set without distilling again."""
    from guard_fast.distill import dc as dc_module
    from guard_fast.reproduce_carry import carry_dir, progress

    over = [f"--data.path={tiny_fmnist}", "--dc.iterations=4", "--dc.batch_real=4", "--dc.model.width=4",
            "--dc.ckpt_every=1", "--train_hard.model.width=4", "--train_hard.optim.epochs=1"]
    cell = [Cell("dc", 1)]
    ref = run_cells(PRESET, over, tmp_path / "ref", cell, 1, 1, 1, tmp_path / "ref-rep", "c")
    want = torch.load(tmp_path / "ref/dc-ipc1/draw0/dc/images.pt", weights_only=True)["images"]

    real_step, ran = dc_module.outer_iteration, []

    def step(cfg, info, net, u, opt, real, it, stop_at=None):
        if it == stop_at:
            raise _Cut(f"cut at iteration {it}")
        ran.append(it)
        return real_step(cfg, info, net, u, opt, real, it)

    monkeypatch.setattr(dc_module, "outer_iteration", lambda *a: step(*a, stop_at=2))
    with pytest.raises(_Cut):  # checkout A: two iterations, then the machine goes away
        run_cells(PRESET, over, tmp_path / "a", cell, 1, 1, 1, tmp_path / "rep", "c")
    carried = carry_dir(tmp_path / "rep") / "dc-ipc1" / "draw0" / "dc"
    assert ran == [0, 1] and progress(carried) == (0, 2) and not (carried / "result.json").exists()
    assert json.loads((carried / "carry.json").read_text()) == {"preset": PRESET, "overrides": over}

    ran.clear()
    monkeypatch.setattr(dc_module, "outer_iteration", lambda *a: step(*a))
    out = run_cells(PRESET, over, tmp_path / "b", cell, 1, 1, 1, tmp_path / "rep", "c")  # checkout B: new runs/
    assert ran == [2, 3]  # resumed at the carried iteration
    got = torch.load(tmp_path / "b/dc-ipc1/draw0/dc/images.pt", weights_only=True)["images"]
    assert torch.equal(got, want) and out["units"][0]["acc"] == ref["units"][0]["acc"]
    assert progress(carried) == (1, 0) and (carried / "images.pt").is_file()
    # the unit counts the distillation's CPU over both sittings (what it saved at iteration 2, plus this one's)
    assert out["units"][0]["distill_cpu_s"] == json.loads((carried / "result.json").read_text())["cpu_s"] > 0

    monkeypatch.setattr(dc_module, "outer_iteration", lambda *a: pytest.fail("a carried finished set distilled"))
    out = run_cells(PRESET, over, tmp_path / "c", cell, 1, 2, 1, tmp_path / "rep", "c")  # checkout C: 2 models
    assert [u["model"] for u in out["units"]] == [0, 1] and out["units"][1]["distill_cpu_s"] == 0
    with pytest.raises(GuardFastError, match="carry.json: distilled with preset"):  # one protocol per carried set
        reproduce.carry.restore(tmp_path / "d", carry_dir(tmp_path / "rep"), ["dc-ipc1"],
                                {"preset": PRESET, "overrides": over[:-1]}, ("dc", "dsa"))


def test_the_carry_thread_keeps_up_with_a_running_distillation_and_leaves_students_out(tmp_path):
    """A machine can vanish without any exit handler running: the periodic copy alone has to carry the newest
    checkpoint (and never the students' folders, which hold weights)."""
    import time

    from guard_fast.reproduce_carry import Saver, progress

    root, carry = tmp_path / "runs", tmp_path / "carry"
    dc_dir, student = root / "dc-ipc1" / "draw0" / "dc", root / "dc-ipc1" / "draw0" / "model0"
    student.mkdir(parents=True)
    (student / "result.json").write_text("{}")
    dc_dir.mkdir(parents=True)

    def saved(it: int) -> None:
        torch.save({"key": "k", "iteration": it, "images": torch.zeros(1)}, dc_dir / "state.pt")

    def wait_for(want) -> bool:
        deadline = time.time() + 20
        while time.time() < deadline:
            done = carry / "dc-ipc1" / "draw0" / "dc"
            if done.is_dir() and progress(done) == want:
                return True
            time.sleep(0.02)
        return False

    saved(3)
    with Saver(root, carry, {"preset": "p", "overrides": []}, ("dc", "dsa"), every_s=0.05):
        assert wait_for((0, 3))
        saved(5)
        assert wait_for((0, 5))
    assert not (carry / "dc-ipc1" / "draw0" / "model0").exists()
