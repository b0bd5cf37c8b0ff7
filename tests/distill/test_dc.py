"""DC and GUARD(DC): matching distance and GUARD real loss equal literal formulas (float64), 1 vs 2 ranks give the
same images, resume equals an uninterrupted run, bad input is a one-line error."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from guard_fast.distill.gradmatch import guard_real_loss, match_distance
from guard_fast.runtime.config import load_config
from tests.conftest import ONE, PYTHON, REPO, copy_subset, subprocess_env


def test_match_distance_is_the_literal_formula():
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3, 3, 3), (4,), (5, 6), (5,), (2, 3, 4)]
    syn = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    real = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    want = 0.0
    for a, b in zip(syn, real, strict=True):
        if a.dim() == 1:
            continue  # biases / norm scales: ignored as in DC's distance_wb
        for o in range(a.shape[0]):
            ra, rb = a[o].reshape(-1).tolist(), b[o].reshape(-1).tolist()
            dot = sum(p * q for p, q in zip(ra, rb, strict=True))
            na, nb = sum(p * p for p in ra) ** 0.5, sum(q * q for q in rb) ** 0.5
            want += 1 - dot / (na * nb + 1e-6)
    assert match_distance(syn, real).item() == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert match_distance(real, real).item() == pytest.approx(sum(1e-6 / (float(r[o].norm()) ** 2 + 1e-6)
                                                                  for r in real if r.dim() > 1
                                                                  for o in range(r.shape[0])), abs=1e-12)


@pytest.fixture
def convnet():
    from guard_fast.models import build_model

    torch.manual_seed(0)
    return build_model("convnet", 3, (0.3, 0.4, 0.5), (0.2, 0.25, 0.3), width=4, image_size=8).double()


def literal_guard_loss(model, x, y, lam, h):
    """CE + lam/B sum_i ||d/dx_i [CE_i(x_i + z_i) - CE_i(x_i)] / B||, z_i = h sign(g_i)/||sign(g_i)||, each
    per-image gradient computed on its own (the model has no cross-sample coupling)."""
    b = len(x)
    ce = sum(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]) for i in range(b)) / b
    reg = 0
    for i in range(b):
        xi = x[i:i + 1].detach().requires_grad_(True)
        (gi,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i:i + 1]) / b, xi)
        s = torch.sign(gi)
        zi = h * (s + 1e-7) / (s.norm() + 1e-7)
        (gp,) = torch.autograd.grad(F.cross_entropy(model(xi + zi), y[i:i + 1]) / b, xi, create_graph=True)
        (gc,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i:i + 1]) / b, xi, create_graph=True)
        reg = reg + (gp - gc).norm()
    return ce + lam * reg / b


def test_guard_real_loss_gradient_is_the_literal_formula(convnet):
    g = torch.Generator().manual_seed(1)
    x = torch.rand((5, 3, 8, 8), generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    params = list(convnet.parameters())
    loss, reg = guard_real_loss(convnet, x, y, lam=100.0, h=0.6)
    want = literal_guard_loss(convnet, x, y, 100.0, 0.6)
    assert loss.item() == pytest.approx(want.item(), rel=1e-10)
    assert reg.item() > 0
    got_g = torch.autograd.grad(loss, params)
    want_g = torch.autograd.grad(want, params)
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    ce_only = torch.autograd.grad(guard_real_loss(convnet, x, y, 100.0, 0.6, guard=False)[0], params)
    assert any(not torch.allclose(a, b) for a, b in zip(got_g, ce_only, strict=True))  # R changes the matched grad


def dc_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"--data.path={data}", "--data.image_size=8", "--data.workers=0", "--output.progress=false",
            "--model.width=4", "--ipc=2", "--outer_loop=2", "--inner_loop=2", "--iterations=3", "--batch_real=6",
            "--batch_train=8", "--guard=true", "--float64=true", "--output.log_every=1", f"--output.dir={out}",
            *extra]


@pytest.fixture(scope="module")
def small_digits(digits_subset) -> Path:
    return digits_subset(8, 2)


def dc(data, out, *extra):
    from guard_fast.distill.dc import DCConfig, run_dc

    return run_dc(load_config(DCConfig, None, dc_args(data, out, *extra)), ONE)


def images(out: Path) -> torch.Tensor:
    return torch.load(out / "images.pt", weights_only=True)["images"]


@pytest.fixture(scope="module")
def full_run(small_digits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dc-full")
    result = dc(small_digits, out, "--ckpt_every=1")
    assert result["images"] == 20 and result["guard"]
    return out


def test_output_is_a_synthetic_set(full_run):
    from guard_fast.data.synthetic import load_synthetic

    s = load_synthetic(full_run, 10)
    assert s.pixels.shape == (20, 3, 8, 8) and s.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert (full_run / "grid.png").stat().st_size > 0 and s.manifest["method"] == "GUARD(DC)"
    # space = pixel (main_CURE.py): the optimized tensors are pixels, stored unclamped as the float set
    assert s.manifest["space"] == "pixel" and s.manifest["init"] == "noise" and not s.manifest["clamp"]
    assert torch.equal(s.floats, images(full_run).float()) and s.floats.min() < 0 and s.floats.max() > 1


def test_resume_equals_uninterrupted(small_digits, full_run, tmp_path):
    out = tmp_path / "cut"
    assert dc(small_digits, out, "--ckpt_every=1", "--stop_after=2") == {"stopped_at_iteration": 2}
    assert not (out / "images.pt").exists()
    dc(small_digits, out, "--ckpt_every=1")
    assert torch.equal(images(out), images(full_run))


@pytest.mark.multirank
@pytest.mark.subprocess
def test_two_ranks_give_the_same_images(small_digits, full_run, tmp_path):
    """float64: 2 gloo ranks (5 classes each) reproduce the 1-process images to 1e-10."""
    out = tmp_path / "two"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29583",
           str(REPO / "launchers/dc.py"), *dc_args(small_digits, out, "--ckpt_every=1")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    torch.testing.assert_close(images(out), images(full_run), rtol=0, atol=1e-10)


def one_error(args: list[str]) -> str:
    r = subprocess.run([PYTHON, "-m", "launchers.cli", "dc", *args], capture_output=True, text=True,
                       env=subprocess_env(), cwd=REPO, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
    return lines[0]


@pytest.mark.subprocess
def test_bad_inputs_are_one_line_errors(small_digits, tmp_path):
    assert "ipc = 9 exceeds the 8 train images of class '0'" in one_error(dc_args(small_digits, tmp_path / "a",
                                                                                   "--ipc=9", "--init=real"))
    assert "space = 'zca'" in one_error(dc_args(small_digits, tmp_path / "a", "--space=zca"))
    empty = copy_subset(small_digits, tmp_path / "empty", {"train": 8, "val": 2})
    for p in (empty / "train" / "3").iterdir():
        p.unlink()
    assert "train/3: empty class folder" in one_error(dc_args(empty, tmp_path / "b"))
    (empty / "train" / "3").rmdir()  # a missing class
    assert "9 class folders" in one_error(dc_args(empty, tmp_path / "b"))
    assert "loop table" in one_error(dc_args(small_digits, tmp_path / "c", "--ipc=3", "--outer_loop=0"))
    assert "BatchNorm" in one_error(dc_args(small_digits, tmp_path / "d", "--model.arch=resnet18-cifar"))


def test_method_registry_plans_dc_then_train_hard(tmp_path):
    from guard_fast.pipeline import PipelineConfig, plan_pipeline

    cfg = load_config(PipelineConfig, REPO / "configs/digits/pipeline-dc.toml", ["--methods=dc,dc:guard=true"])
    chains = plan_pipeline(cfg, tmp_path)
    assert [(label, ipc) for label, ipc, _ in chains] == [("DC", 1), ("DC", 10), ("GUARD(DC)", 1), ("GUARD(DC)", 10)]
    for label, ipc, stages in chains:
        assert [s.kind for s in stages] == ["dc", "train-hard", "evaluate"]
        dc, hard, ev = stages
        assert dc.config.ipc == ipc and dc.config.guard == (label == "GUARD(DC)")
        assert hard.config.images == str(dc.folder) and hard.inputs == [dc.folder]
        assert ev.config.model.arch == "convnet" and ev.config.checkpoints == [str(hard.folder / "student.pt")]
    assert len({s.folder for _, _, st in chains for s in st}) == 12  # nothing shared between DC and GUARD(DC)


@pytest.mark.parametrize("ipc", [1, 10, 50])
def test_paper_scale_presets(ipc):
    """Table 5 presets are main_CURE.py's setting (pixel space, noise, no clamp, float students, its MIM step), both
    protocols; the VICO preset is DC's own paper code (normalized space)."""
    from guard_fast.pipeline import PipelineConfig

    cfg = load_config(PipelineConfig, REPO / f"configs/cifar10/pipeline-dc-ipc{ipc}.toml")
    assert cfg.ipc == [ipc] and cfg.dc.iterations == 1000 and cfg.dc.model.width == 128
    assert (cfg.dc.space, cfg.dc.init, cfg.dc.clamp, cfg.train_hard.quantize) == ("pixel", "noise", False, False)
    assert (cfg.evaluate.attack.mim_alpha_frac, cfg.evaluate.attack.mim_grad_norm) == (0.25, "batch")
    assert cfg.methods == ["dc:protocol=authors", "dc:guard=true:protocol=authors", "dc", "dc:guard=true"]
    dc = load_config(type(cfg.dc), None, [f"--ipc={ipc}"])
    assert dc.loops() == {1: (1, 1), 10: (10, 50), 50: (50, 10)}[ipc]
    assert (cfg.train_hard.optim.schedule, cfg.train_hard.optim.epochs) == ("step", 301)
    vico = load_config(PipelineConfig, REPO / "configs/cifar10/pipeline-dc-vico-ipc10.toml")
    assert (vico.dc.space, vico.dc.init, vico.dc.clamp, vico.methods) == ("normalized", "noise", False, ["dc"])


def test_protocols_set_student_epochs_and_share_the_distilled_set(tmp_path):
    """protocol=authors: main_CURE.py's 301 (DC) / 1001 (GUARD(DC)) student epochs; matched: train_hard's for
    both. The two protocols of a method read one dc stage."""
    from guard_fast.pipeline import PipelineConfig, plan_pipeline

    methods = "dc:protocol=authors,dc:guard=true:protocol=authors,dc,dc:guard=true"
    cfg = load_config(PipelineConfig, None, [f"--methods={methods}", "--ipc=10", "--train_hard.optim.epochs=77"])
    chains = {label: {s.kind: s for s in stages} for label, _, stages in plan_pipeline(cfg, tmp_path)}
    epochs = {label: st["train-hard"].config.optim.epochs for label, st in chains.items()}
    assert epochs == {"DC authors' protocol": 301, "GUARD(DC) authors' protocol": 1001, "DC": 77, "GUARD(DC)": 77}
    dc = {label: st["dc"].folder for label, st in chains.items()}
    assert dc["DC"] == dc["DC authors' protocol"] == tmp_path / "dc/ipc10/dc"
    assert dc["GUARD(DC)"] == dc["GUARD(DC) authors' protocol"] == tmp_path / "dc-guard-true/ipc10/dc"
    assert chains["GUARD(DC)"]["dc"].config.guard and not chains["DC"]["dc"].config.guard
    assert len({st["train-hard"].folder for st in chains.values()}) == 4
