"""DSA as a method (Zhao & Bilen, ICML 2021) against the authors' code: one outer iteration of the dc stage with
dsa = true, on tiny float64 tensors, equals an implementation of what VICO-UoE/DatasetCondensation (53f63a6) main.py
computes with `--method DSA`, written here from reading main.py and utils.py: the matching loss and the updated
synthetic images. GUARD(DSA) (our composition: the authors run DSA and CURE as exclusive methods) adds main_CURE's
curvature term on the augmented real batch. Plus the method's planning and a pipeline smoke run."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import guard_fast.distill.dc as dc_stage
from guard_fast.distill.dc import DCConfig, outer_iteration, seeded
from guard_fast.models import build_model
from guard_fast.runtime.config import load_config
from guard_fast.runtime.errors import ConfigError
from tests.conftest import ONE
from tests.distill.vico_dsa import diff_augment

MEAN, STD = (0.45, 0.40, 0.35), (0.20, 0.25, 0.30)
CLASSES, IPC, PER_CLASS, SIZE = 3, 2, 5, 8


def dc_distance(gw_syn, gw_real):
    """match_loss 'ours' (utils.py:218-246): per layer with >= 2 dims, rows = output units, sum of 1 - cosine."""
    total = 0.0
    for a, b in zip(gw_syn, gw_real, strict=True):
        if a.dim() == 1:
            continue
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        total = total + (1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-6)).sum()
    return total


def curvature(net, x, y, h, lam):
    """main_CURE.py:228-249 on pixel-unit x through the Normalize-then-ConvNet network (as tests/distill/
    test_dc_fidelity.py): eval mode, z = h (sign g + 1e-7) / (||sign g|| + 1e-7), mean_i lam ||grad diff_i||."""
    xr = x.clone().requires_grad_(True)
    net.eval()
    (g,) = torch.autograd.grad(F.cross_entropy(net(xr), y), xr)
    z = torch.sign(g)
    z = h * (z + 1e-7) / (z.reshape(len(z), -1).norm(dim=1)[:, None, None, None] + 1e-7)
    (gd,) = torch.autograd.grad(F.cross_entropy(net(xr + z), y) - F.cross_entropy(net(xr), y), xr, create_graph=True)
    net.train()
    return (lam * gd.reshape(len(gd), -1).norm(dim=1)).mean()


def authors_outer_iteration(net, image_syn, real_u, cfg: DCConfig, draws: list, guard: bool):
    """One `for ol in range(outer_loop)` pass of VICO main.py:156-215 with args.dsa (plain ConvNet on normalized
    data, net.body here): per class the same DiffAugment draw on img_real and img_syn (:185-188, one seed for both),
    CE gradients, distance summed (:190-199), SGD(lr_img, momentum 0.5) (:100, 201-203); between image steps
    inner_loop epochs of SGD(lr_net) with a per-image DiffAugment on every batch (:214-215 -> utils.py:307-311).
    `draws` are the draws in the order they are used; the inner loop's shuffle is ours (the reference's DataLoader
    shuffle, a random order either way). Returns (updated images, summed loss of all steps)."""
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1).double(), torch.tensor(STD).view(1, 3, 1, 1).double()
    image_syn = image_syn.clone().requires_grad_(True)
    opt_img = torch.optim.SGD([image_syn], lr=cfg.lr_img, momentum=0.5)
    opt_net = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)
    params, total = list(net.parameters()), 0.0
    labels = torch.arange(CLASSES).repeat_interleave(IPC)
    for ol in range(cfg.outer_loop):
        loss = 0.0
        for c in range(CLASSES):
            draw = draws.pop(0)
            img_real, img_syn = diff_augment(real_u[c], draw), diff_augment(image_syn[c * IPC:(c + 1) * IPC], draw)
            y = torch.full((len(img_real),), c)
            loss_real = F.cross_entropy(net.body(img_real), y)
            if guard:
                loss_real = loss_real + curvature(net, img_real * s + m, y, cfg.h, cfg.lam)
            gw_real = [g.detach() for g in torch.autograd.grad(loss_real, params)]
            gw_syn = torch.autograd.grad(F.cross_entropy(net.body(img_syn), torch.full((IPC,), c)), params,
                                         create_graph=True)
            loss = loss + dc_distance(gw_syn, gw_real)
        opt_img.zero_grad()
        loss.backward()
        opt_img.step()
        total += float(loss.detach())
        if ol == cfg.outer_loop - 1:
            break
        for il in range(cfg.inner_loop):
            order = torch.randperm(len(labels), generator=seeded(cfg.dist.seed, 4, 0, ol, il))
            out = F.cross_entropy(net.body(diff_augment(image_syn.detach()[order], draws.pop(0))), labels[order])
            opt_net.zero_grad()
            out.backward()
            opt_net.step()
    assert not draws
    return image_syn.detach(), total


def setup(strategy: str, guard: bool, outer: int, seed: int = 0):
    torch.manual_seed(seed)
    net = build_model("convnet", CLASSES, MEAN, STD, width=4, image_size=SIZE).double()
    gen = torch.Generator().manual_seed(seed + 1)
    real = [torch.rand((PER_CLASS, 3, SIZE, SIZE), generator=gen, dtype=torch.float64) for _ in range(CLASSES)]
    cfg = DCConfig(ipc=IPC, space="normalized", dsa=True, dsa_strategy=strategy, guard=guard, outer_loop=outer,
                   inner_loop=2, batch_real=PER_CLASS, batch_train=64, lam=100.0, h=0.6, float64=True)
    cfg.validate()
    return net, real, cfg


@pytest.fixture
def recorded(monkeypatch):
    """Every draw the dc stage makes, in order."""
    draws = []

    def record(*args, **kwargs):
        draws.append(sample(*args, **kwargs))
        return draws[-1]

    sample = dc_stage.sample_dsa
    monkeypatch.setattr(dc_stage, "sample_dsa", record)
    return draws


ALL = "color_crop_cutout_flip_scale_rotate"


@pytest.mark.parametrize(("strategy", "guard", "outer", "chunk"), [
    ("color", False, 1, 0), ("crop", False, 1, 0), ("cutout", False, 1, 0), ("flip", False, 1, 0),
    ("scale", False, 1, 0), ("rotate", False, 1, 0), (ALL, False, 2, 0), (ALL, True, 2, 0), ("rotate", True, 1, 0),
    (ALL, False, 2, 2), (ALL, True, 2, 3)])
def test_dsa_outer_iteration_is_vicos_main_method_dsa(recorded, strategy, guard, outer, chunk):
    """chunk > 0: gradients accumulated over passes of `chunk` images take the authors' one-pass step."""
    net, real, cfg = setup(strategy, guard, outer)
    cfg.chunk = chunk
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1).double(), torch.tensor(STD).view(1, 3, 1, 1).double()
    images = torch.randn((CLASSES * IPC, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(7),
                         dtype=torch.float64)
    ref_net = copy.deepcopy(net)
    u = images.clone().requires_grad_(True)
    u.grad = torch.zeros_like(u)
    opt = torch.optim.SGD([u], lr=cfg.lr_img, momentum=cfg.momentum_img)
    loss = outer_iteration(cfg, ONE, net, u, opt, real, it=0)
    # siamese: one draw (n = 1) per class and matching step; inner-loop draws are per image
    n_match = CLASSES * outer
    assert len(recorded) == n_match + (outer - 1) * cfg.inner_loop
    assert all(len(v) == 1 for d in recorded[:CLASSES] for v in d.params.values())
    want, total = authors_outer_iteration(ref_net, images, [(x - m) / s for x in real], cfg, list(recorded), guard)
    assert (want - images).abs().max() > 1e-4  # the step is not negligible
    torch.testing.assert_close(u.detach(), want, rtol=1e-9, atol=1e-12)
    assert float(loss) == pytest.approx(total / (CLASSES * outer), rel=1e-10)  # main.py:218's loss_avg


def test_without_dsa_the_draws_change_the_step():
    """The same run with dsa = false takes another step: the augmentation is not a no-op on this input."""
    net, real, cfg = setup("crop", False, 1)
    images = torch.randn((CLASSES * IPC, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(7),
                         dtype=torch.float64)
    steps = []
    for dsa in (True, False):
        cfg.dsa = dsa
        u = images.clone().requires_grad_(True)
        u.grad = torch.zeros_like(u)
        outer_iteration(cfg, ONE, copy.deepcopy(net), u, torch.optim.SGD([u], lr=0.1, momentum=0.5), real, it=0)
        steps.append(u.detach() - images)
    assert (steps[0] - steps[1]).abs().max() > 1e-6


def test_registry_plans_dsa_with_its_own_section_and_a_dsa_student(tmp_path):
    from guard_fast.pipeline import PipelineConfig, plan_pipeline
    from tests.conftest import REPO

    cfg = load_config(PipelineConfig, REPO / "configs/digits/pipeline-dsa.toml", ["--ipc=10"])
    chains = {label: {s.kind: s for s in stages} for label, _, stages in plan_pipeline(cfg, tmp_path)}
    assert set(chains) == {"DSA", "GUARD(DSA)"}
    plain, guard = chains["DSA"], chains["GUARD(DSA)"]
    assert plain["dsa"].config.dsa and guard["dsa"].config.dsa and not plain["dsa"].config.guard
    assert guard["dsa"].config.guard and plain["dsa"].config.ipc == 10
    assert plain["dsa"].config.space == "normalized" and plain["dsa"].config.init == "real"
    assert plain["dsa"].folder == tmp_path / "dsa/ipc10/dsa"
    student = plain["train-hard"].config
    assert student.augment == "dsa" and student.images == str(plain["dsa"].folder)
    vico = load_config(PipelineConfig, REPO / "configs/cifar10/pipeline-dsa-ipc10.toml")
    assert (vico.dsa.iterations, vico.dsa.batch_real, vico.dsa.lr_img, vico.dsa.model.width) == (1000, 256, 0.1, 128)
    assert vico.train_dsa.optim.epochs == 1001 and vico.train_dsa.augment == "dsa"
    with pytest.raises(ConfigError, match="valid values"):
        load_config(PipelineConfig, None, ["--methods=dsa:guard=maybe"])


def test_pipeline_runs_dsa_end_to_end(digits_subset, tmp_path):
    """dsa -> train-hard (DSA student) -> evaluate -> report, in-process on 8 px digits."""
    from guard_fast.pipeline import PipelineConfig, run_pipeline

    data = digits_subset(4, 2)
    cfg = load_config(PipelineConfig, None, [
        f"--data.path={data}", "--data.image_size=8", "--data.workers=0", "--data.eval_batch_size=10",
        f"--output.dir={tmp_path}", "--output.progress=false", "--methods=dsa", "--ipc=1", "--dsa.model.width=4",
        "--dsa.iterations=2", "--dsa.batch_real=4", "--dsa.outer_loop=2", "--dsa.inner_loop=1",
        "--train_dsa.model.width=4", "--train_dsa.optim.epochs=2", "--train_dsa.val_batches=1",
        "--evaluate.num_images=10", "--evaluate.attack.names=pgd100", "--evaluate.attack.pgd_steps=1",
        "--evaluate.attack.eps=1/255"])
    run_pipeline(cfg, ONE)
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["label"] for r in results["rows"]] == ["DSA IPC 1"]
    manifest = json.loads((tmp_path / "dsa/ipc1/dsa/manifest.json").read_text())
    assert manifest["method"] == "DSA" and manifest["space"] == "normalized"
    assert json.loads((tmp_path / "dsa/ipc1/train-hard/config.json").read_text())["augment"] == "dsa"
    assert "- dsa:" in (tmp_path / "report.md").read_text()
