"""DM (Zhao & Bilen, WACV 2023) against the authors' code: the loss and the image updates of the dm stage, on tiny
float64 tensors, equal an implementation of VICO-UoE/DatasetCondensation (53f63a6) main_DM.py written here from
reading it (ConvNet branch, :139-163 and :191-193); resume equals an uninterrupted run; unsupported networks are
refused; the method plans dm -> a DSA student, and a pipeline runs end to end."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import torch

import guard_fast.distill.dm as dm_stage
from guard_fast.distill.dm import DMConfig, dm_step
from guard_fast.models import build_model
from guard_fast.runtime.config import load_config
from guard_fast.runtime.errors import ConfigError
from tests.conftest import ONE, PYTHON, REPO, subprocess_env
from tests.distill.vico_dsa import diff_augment

MEAN, STD = (0.45, 0.40, 0.35), (0.20, 0.25, 0.30)
CLASSES, IPC, PER_CLASS, SIZE = 3, 2, 5, 8


def authors_dm(nets, image_syn, real_u, lr_img: float, draws: list | None):
    """main_DM.py, one `for it` pass per net (ConvNet branch): embed = net.embed (features flattened, networks.py:50-53;
    net.body.features here), the same DiffAugment draw on img_real and img_syn of a class (:155-158, one seed for
    both), output_real detached (:160), loss += sum((mean_real - mean_syn)^2) over classes (:163), SGD(lr_img,
    momentum 0.5) one step (:102, 191-193). Returns (images after every step, loss of every step)."""
    image_syn = image_syn.clone().requires_grad_(True)
    optimizer_img = torch.optim.SGD([image_syn], lr=lr_img, momentum=0.5)
    losses = []
    for net in nets:
        for p in net.parameters():  # :141-142
            p.requires_grad = False
        net.train()
        loss = torch.tensor(0.0, dtype=torch.float64)
        for c in range(CLASSES):
            img_real, img_syn = real_u[c], image_syn[c * IPC:(c + 1) * IPC]
            if draws is not None:
                draw = draws.pop(0)
                img_real, img_syn = diff_augment(img_real, draw), diff_augment(img_syn, draw)
            output_real = net.body.features(img_real).flatten(1).detach()
            output_syn = net.body.features(img_syn).flatten(1)
            loss = loss + torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0)) ** 2)
        optimizer_img.zero_grad()
        loss.backward()
        optimizer_img.step()
        losses.append(float(loss.detach()))
    assert not draws
    return image_syn.detach(), losses


@pytest.fixture
def recorded(monkeypatch):
    draws = []

    def record(*args, **kwargs):
        draws.append(sample(*args, **kwargs))
        return draws[-1]

    sample = dm_stage.sample_dsa
    monkeypatch.setattr(dm_stage, "sample_dsa", record)
    return draws


@pytest.mark.parametrize(("strategy", "dsa"), [("color_crop_cutout_flip_scale_rotate", True), ("crop", True),
                                               ("rotate", True), ("color", False)])
def test_two_dm_steps_are_main_dm(recorded, strategy, dsa):
    gen = torch.Generator().manual_seed(1)
    real = [torch.randint(0, 256, (PER_CLASS, 3, SIZE, SIZE), generator=gen, dtype=torch.uint8) for _ in range(CLASSES)]
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1).double(), torch.tensor(STD).view(1, 3, 1, 1).double()
    real_u = [(x.double() / 255 - m) / s for x in real]  # the authors' data: normalized at load (utils.py:52)
    nets = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        nets.append(build_model("convnet", CLASSES, MEAN, STD, width=4, image_size=SIZE).double())
    cfg = DMConfig(ipc=IPC, batch_real=PER_CLASS, dsa=dsa, dsa_strategy=strategy, lr_img=1.0, float64=True)
    cfg.validate()
    images = torch.randn((CLASSES * IPC, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(7),
                         dtype=torch.float64)
    ref_nets = copy.deepcopy(nets)
    u = images.clone().requires_grad_(True)
    u.grad = torch.zeros_like(u)
    opt = torch.optim.SGD([u], lr=cfg.lr_img, momentum=cfg.momentum_img)
    losses = [float(dm_step(cfg, ONE, net.requires_grad_(False), u, opt, real, it)) for it, net in enumerate(nets)]
    assert len(recorded) == (2 * CLASSES if dsa else 0)
    assert all(len(v) == 1 for d in recorded for v in d.params.values())  # one draw for the whole batch
    want, ref_losses = authors_dm(ref_nets, images, real_u, cfg.lr_img, list(recorded) if dsa else None)
    assert (want - images).abs().max() > 1e-4  # the steps are not negligible
    torch.testing.assert_close(u.detach(), want, rtol=1e-9, atol=1e-12)
    assert losses == pytest.approx([v / CLASSES for v in ref_losses], rel=1e-10)  # loss_avg (:197)


def test_pixel_space_is_the_same_loss_on_other_parameters():
    """space = pixel: the same images in pixels give the same loss; the step differs by std^2 (parameterization)."""
    gen = torch.Generator().manual_seed(1)
    real = [torch.randint(0, 256, (PER_CLASS, 3, SIZE, SIZE), generator=gen, dtype=torch.uint8) for _ in range(CLASSES)]
    torch.manual_seed(3)
    net = build_model("convnet", CLASSES, MEAN, STD, width=4, image_size=SIZE).double().requires_grad_(False)
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1).double(), torch.tensor(STD).view(1, 3, 1, 1).double()
    x0 = torch.rand((CLASSES * IPC, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    out = {}
    for space, start in (("pixel", x0), ("normalized", (x0 - m) / s)):
        cfg = DMConfig(ipc=IPC, batch_real=PER_CLASS, space=space, float64=True)
        u = start.clone().requires_grad_(True)
        u.grad = torch.zeros_like(u)
        loss = dm_step(cfg, ONE, net, u, torch.optim.SGD([u], lr=1.0, momentum=0.5), real, 0)
        out[space] = (float(loss), u.detach() if space == "pixel" else u.detach() * s + m)
    assert out["pixel"][0] == pytest.approx(out["normalized"][0], rel=1e-10)
    torch.testing.assert_close(out["normalized"][1] - x0, (out["pixel"][1] - x0) * s ** 2, rtol=1e-8, atol=1e-14)


def dm_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"--data.path={data}", "--data.image_size=8", "--data.workers=0", "--output.progress=false",
            "--model.width=4", "--ipc=2", "--iterations=4", "--batch_real=6", "--float64=true",
            "--output.log_every=1", f"--output.dir={out}", *extra]


def run(data, out, *extra):
    from guard_fast.distill.dm import run_dm

    return run_dm(load_config(DMConfig, None, dm_args(data, out, *extra)), ONE)


def images(out: Path) -> torch.Tensor:
    return torch.load(out / "images.pt", weights_only=True)["images"]


@pytest.fixture(scope="module")
def small_digits(digits_subset) -> Path:
    return digits_subset(8, 2)


@pytest.fixture(scope="module")
def full_run(small_digits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dm-full")
    assert run(small_digits, out, "--ckpt_every=1")["images"] == 20
    return out


def test_output_is_a_float_synthetic_set_from_real_init(full_run):
    from guard_fast.data.synthetic import load_synthetic

    s = load_synthetic(full_run, 10)
    assert s.pixels.shape == (20, 3, 8, 8) and s.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert s.manifest["method"] == "DM" and s.manifest["space"] == "normalized" and s.manifest["init"] == "real"
    log = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log if "match_loss" in r] == [1, 2, 3, 4]
    assert torch.isfinite(s.floats).all() and (s.floats.min() < 0 or s.floats.max() > 1)  # unclamped floats


def test_resume_equals_uninterrupted(small_digits, full_run, tmp_path):
    out = tmp_path / "cut"
    assert run(small_digits, out, "--ckpt_every=1", "--stop_after=2") == {"stopped_at_iteration": 2}
    assert not (out / "images.pt").exists()
    run(small_digits, out, "--ckpt_every=1")
    assert torch.equal(images(out), images(full_run))


def test_networks_with_batchnorm_are_refused(small_digits, tmp_path):
    with pytest.raises(ConfigError, match="BatchNorm"):
        run(small_digits, tmp_path / "x", "--model.arch=resnet18-cifar")


@pytest.mark.parametrize("bad", ["--lr_img=0", "--init=zeros", "--dsa_strategy=blur", "--space=lab"])
def test_bad_settings_are_config_errors(bad, tmp_path):
    with pytest.raises(ConfigError):
        load_config(DMConfig, None, [bad])


def test_registry_plans_dm_then_a_dsa_student(tmp_path):
    from guard_fast.pipeline import PipelineConfig, plan_pipeline

    cfg = load_config(PipelineConfig, REPO / "configs/digits/pipeline-dm.toml")
    chains = {(label, ipc): {s.kind: s for s in stages} for label, ipc, stages in plan_pipeline(cfg, tmp_path)}
    assert set(chains) == {("DM", 1), ("DM", 10)}
    dm, student = chains[("DM", 10)]["dm"], chains[("DM", 10)]["train-hard"]
    assert dm.config.ipc == 10 and dm.folder == tmp_path / "dm/ipc10/dm" and student.inputs == [dm.folder]
    assert student.config.augment == "dsa" and student.config.images == str(dm.folder)
    with pytest.raises(ConfigError, match="no option"):
        load_config(PipelineConfig, None, ["--methods=dm:guard=true"])  # DM has no GUARD variant
    authors = load_config(PipelineConfig, REPO / "configs/cifar10/pipeline-dm-ipc10.toml")
    d = authors.dm
    assert (d.iterations, d.lr_img, d.momentum_img, d.batch_real, d.init, d.model.width) == (20000, 1.0, 0.5, 256,
                                                                                             "real", 128)
    assert authors.train_dsa.optim.epochs == 1001 and authors.train_dsa.augment == "dsa"
    assert DMConfig().iterations == 20000 and DMConfig().lr_img == 1.0 and DMConfig().init == "real"


def test_pipeline_runs_dm_end_to_end(digits_subset, tmp_path):
    """dm -> train-hard (DSA student) -> evaluate -> report, in-process on 8 px digits."""
    from guard_fast.pipeline import PipelineConfig, run_pipeline

    data = digits_subset(4, 2)
    cfg = load_config(PipelineConfig, None, [
        f"--data.path={data}", "--data.image_size=8", "--data.workers=0", "--data.eval_batch_size=10",
        f"--output.dir={tmp_path}", "--output.progress=false", "--methods=dm", "--ipc=1", "--dm.model.width=4",
        "--dm.iterations=3", "--dm.batch_real=4", "--train_dsa.model.width=4", "--train_dsa.optim.epochs=2",
        "--train_dsa.val_batches=1", "--evaluate.num_images=10", "--evaluate.attack.names=pgd100",
        "--evaluate.attack.pgd_steps=1", "--evaluate.attack.eps=1/255"])
    run_pipeline(cfg, ONE)
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["label"] for r in results["rows"]] == ["DM IPC 1"]
    assert json.loads((tmp_path / "dm/ipc1/dm/manifest.json").read_text())["method"] == "DM"
    assert json.loads((tmp_path / "dm/ipc1/train-hard/config.json").read_text())["augment"] == "dsa"
    assert "- dm:" in (tmp_path / "report.md").read_text()


@pytest.mark.multirank
@pytest.mark.subprocess
def test_two_ranks_give_the_same_images(small_digits, full_run, tmp_path):
    """float64: 2 gloo ranks (5 classes each) reproduce the 1-process images to 1e-10."""
    out = tmp_path / "two"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29591",
           str(REPO / "launchers/dm.py"), *dm_args(small_digits, out, "--ckpt_every=1")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    torch.testing.assert_close(images(out), images(full_run), rtol=0, atol=1e-10)


@pytest.mark.subprocess
def test_cli_errors_are_one_line(small_digits, tmp_path):
    def one_error(args: list[str]) -> str:
        r = subprocess.run([PYTHON, "-m", "launchers.cli", "dm", *args], capture_output=True, text=True,
                           env=subprocess_env(), cwd=REPO, timeout=300)
        lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
        assert r.returncode != 0 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
        return lines[0]

    assert "ipc = 9 for init = real" in one_error(dm_args(small_digits, tmp_path / "a", "--ipc=9"))
    assert "BatchNorm" in one_error(dm_args(small_digits, tmp_path / "b", "--model.arch=resnet18-cifar"))
    assert "lr_img" in one_error(dm_args(small_digits, tmp_path / "c", "--lr_img=-1"))
