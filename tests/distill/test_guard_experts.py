"""GUARD(MTT) / GUARD(TESLA): experts trained with a training objective of guard_fast/regularizers/objectives.py.

The expert's step against the regularizer written out here (not through the library), the plain-CE objective against
a hand-rolled SGD loop, the buffer's record of its objective, refusal of a buffer made with another objective, the
pipeline's planning of the GUARD arms beside the plain ones, and one tiny GUARD(MTT)/GUARD(TESLA) pipeline run."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from guard_fast.distill.experts import ExpertsConfig, expert_objective, expert_seed, expert_step, train_expert
from guard_fast.distill.matching import build_augment
from guard_fast.models import Classifier
from guard_fast.models.convnet import ConvNet
from guard_fast.regularizers.objectives import ObjectiveConfig, build_objective
from guard_fast.runtime.config import load_config
from guard_fast.runtime.errors import ConfigError, GuardFastError
from tests.conftest import PYTHON, REPO, subprocess_env
from tests.distill.test_mtt import experts, mtt, trajectories

MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)


def tiny_expert(dtype=torch.float64) -> Classifier:
    """A depth-2 width-4 ConvNet on 8 px, 3 classes (the experts' network: GroupNorm, no running statistics)."""
    torch.manual_seed(0)
    return Classifier(ConvNet(3, width=4, depth=2, image_size=8), MEAN, STD).to(dtype)


def batch(dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 8, 8, generator=gen, dtype=dtype), torch.tensor([0, 1, 2, 0, 1, 2])


def sgd_on(model: Classifier, loss: torch.Tensor, lr: float) -> list[torch.Tensor]:
    """The parameters after one plain SGD step on `loss` (what the expert's optimizer must produce)."""
    params = list(model.body.parameters())
    return [p.detach() - lr * g for p, g in zip(params, torch.autograd.grad(loss, params), strict=True)]


def unit_direction(g: torch.Tensor, h: float) -> torch.Tensor:
    """z_i = h (g_i + 1e-7) / (||g_i||_2 + 1e-7) (docs/spec.md section 2: step h along the input gradient)."""
    return h * (g + 1e-7) / (g.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-7)


@pytest.mark.parametrize("strategy", ["reference", "batched", "reuse"])
def test_expert_step_under_guard_is_sgd_on_ce_plus_the_guard_term(strategy):
    """L = ce(u) + beta |ce(u + z) - ce(u)|, z from the input gradient of ce at u held fixed; the expert's step
    returns L and moves the parameters by -lr dL/dtheta, whichever order of computation the objective uses."""
    model, (u, y) = tiny_expert(), batch()
    ref = copy.deepcopy(model)
    cfg = ObjectiveConfig(name="guard", strategy=strategy, beta=0.5, h=1.0)
    opt = torch.optim.SGD(model.body.parameters(), lr=0.1)
    loss, stats = expert_step(model, expert_objective(ExpertsConfig(objective=cfg)), opt, u, y)

    leaf = u.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(ref.body(leaf), y), leaf)
    ce = F.cross_entropy(ref.body(u), y)
    reg = 0.5 * (F.cross_entropy(ref.body(u + unit_direction(g, 1.0)), y) - ce).abs()
    assert float(reg.detach()) > 1e-3  # the regularizer is not negligible here: a plain CE step would fail below
    torch.testing.assert_close(loss, (ce + reg).detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(stats["reg"], reg.detach(), rtol=1e-10, atol=0)
    for got, want in zip(model.body.parameters(), sgd_on(ref, ce + reg, 0.1), strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-9, atol=1e-12)


def test_expert_curvature_term_counts_its_own_batch_only(monkeypatch):
    """guard-curvature's reference convention divides by the global batch; an expert is trained by one process
    alone, so with a (pretended) 2-rank group it divides by its own B, where the squeeze teacher divides by 2B."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    model, (u, y) = tiny_expert(), batch()
    ref = copy.deepcopy(model)
    cfg = ObjectiveConfig(name="guard-curvature", lam=20.0, h=1.0)
    opt = torch.optim.SGD(model.body.parameters(), lr=0.1)
    loss, _ = expert_step(model, expert_objective(ExpertsConfig(objective=cfg)), opt, u, y)

    leaf = u.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(ref.body(leaf), y), leaf)
    pert = (u + unit_direction(g, 1.0)).requires_grad_(True)
    clean = u.clone().requires_grad_(True)
    (gp,) = torch.autograd.grad(F.cross_entropy(ref.body(pert), y, reduction="sum"), pert, create_graph=True)
    (gc,) = torch.autograd.grad(F.cross_entropy(ref.body(clean), y, reduction="sum"), clean, create_graph=True)
    reg = 20.0 / len(y) * (gp - gc).flatten(1).norm(dim=1).mean()
    want = F.cross_entropy(ref.body(u), y) + reg
    torch.testing.assert_close(loss, want.detach(), rtol=1e-9, atol=0)
    for got, w in zip(model.body.parameters(), sgd_on(ref, want, 0.1), strict=True):
        torch.testing.assert_close(got.detach(), w, rtol=1e-8, atol=1e-11)
    teacher_loss, _ = build_objective(cfg)(copy.deepcopy(ref), ref.denormalize(u), y)  # the squeeze semantics
    torch.testing.assert_close(teacher_loss - want.detach() + reg.detach(), reg.detach() / 2, rtol=1e-9, atol=0)


@pytest.mark.parametrize("augment", ["none", "dsa"])
def test_plain_objective_trains_as_plain_sgd_on_ce(augment):
    """objective none = MTT's experts: SGD on CE of the (augmented) normalized batch, MTT's per-epoch permutation,
    written here as a plain loop; a GUARD objective moves the same expert elsewhere."""
    gen = torch.Generator().manual_seed(2)
    pixels = torch.randint(0, 256, (12, 3, 8, 8), generator=gen, dtype=torch.uint8)
    labels = torch.arange(3).repeat(4)
    cfg = ExpertsConfig(epochs=2, batch_size=5, lr=0.05, augment=augment)
    model = tiny_expert(torch.float32)
    ref = copy.deepcopy(model)
    traj, curves = train_expert(copy.deepcopy(model), pixels, labels, cfg, seed=7, device=torch.device("cpu"))

    aug = build_augment(augment, ref.mean, ref.std)
    order_gen, want = torch.Generator().manual_seed(7), [torch.nn.utils.parameters_to_vector(ref.body.parameters())]
    ces = []
    for epoch in range(2):
        total = 0.0
        for b, idx in enumerate(torch.split(torch.randperm(12, generator=order_gen), 5)):
            u = aug(ref.normalize(pixels[idx].float() / 255), expert_seed(7, epoch * 100_003 + b))
            ce = F.cross_entropy(ref.body(u), labels[idx])
            with torch.no_grad():
                for p, g in zip(ref.body.parameters(), torch.autograd.grad(ce, list(ref.body.parameters())),
                                strict=True):
                    p -= 0.05 * g
            total += float(ce.detach()) * len(idx)
        want.append(torch.nn.utils.parameters_to_vector(ref.body.parameters()).detach())
        ces.append(total / 12)
    torch.testing.assert_close(traj, torch.stack(want), rtol=1e-5, atol=1e-6)
    assert curves["reg"] == [0.0, 0.0] and curves["ce"] == pytest.approx(ces, rel=1e-5)
    cfg.objective = ObjectiveConfig(name="guard", beta=0.5, h=1.0)
    guarded, curves = train_expert(copy.deepcopy(model), pixels, labels, cfg, seed=7, device=torch.device("cpu"))
    assert torch.equal(guarded[0], traj[0]) and (guarded[-1] - traj[-1]).abs().max() > 1e-4
    assert min(curves["reg"]) > 0


def test_expert_objective_is_validated():
    with pytest.raises(ConfigError, match="objective.name = 'guardd'"):
        load_config(ExpertsConfig, None, ["--objective.name=guardd"])
    from guard_fast.distill.mtt import MTTConfig

    with pytest.raises(ConfigError, match="expert_objective = 'x'"):
        load_config(MTTConfig, None, ["--expert_objective=x"])
    assert ExpertsConfig().objective.name == "none" and MTTConfig().expert_objective == "none"


@pytest.fixture(scope="module")
def small(digits_subset) -> Path:
    return digits_subset(12, 4)


@pytest.fixture(scope="module")
def buffers(small, tmp_path_factory) -> dict[str, Path]:
    """The plain and the GUARD buffer of the same seed and settings."""
    out = {"none": tmp_path_factory.mktemp("plain"), "guard": tmp_path_factory.mktemp("guard")}
    experts(small, out["none"])
    experts(small, out["guard"], "--objective.name=guard", "--objective.beta=0.5", "--objective.h=1.0")
    return out


def test_buffer_records_its_objective(buffers):
    plain, guard = (json.loads((buffers[k] / "buffer.json").read_text()) for k in ("none", "guard"))
    assert plain["objective"]["name"] == "none"
    assert {k: guard["objective"][k] for k in ("name", "beta", "h", "strategy")} == {
        "name": "guard", "beta": 0.5, "h": 1.0, "strategy": "reuse"}
    assert plain["key"] != guard["key"]
    result = json.loads((buffers["guard"] / "result.json").read_text())
    assert result["objective"] == "guard" and min(result["final_train_reg"]) > 0
    for a, b in zip(trajectories(buffers["none"]), trajectories(buffers["guard"]), strict=True):
        assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])  # same init, other training


def test_a_buffer_of_another_objective_is_refused_with_one_line(small, buffers, tmp_path):
    with pytest.raises(GuardFastError, match="trained with objective 'guard' but this run asks for experts trained "
                                             "with 'none'") as err:
        mtt(small, buffers["guard"], tmp_path / "a")
    assert "\n" not in str(err.value)
    with pytest.raises(GuardFastError, match="objective 'none' but this run asks for experts trained with 'guard'"):
        mtt(small, buffers["none"], tmp_path / "b", "--expert_objective=guard")
    old = tmp_path / "old"  # a buffer from before the option: plain CE
    shutil.copytree(buffers["none"], old)
    manifest = json.loads((old / "buffer.json").read_text())
    del manifest["objective"]
    (old / "buffer.json").write_text(json.dumps(manifest))
    with pytest.raises(GuardFastError, match="objective 'none' but this run asks for experts trained with 'guard'"):
        mtt(small, old, tmp_path / "c", "--expert_objective=guard")
    out = mtt(small, buffers["guard"], tmp_path / "d", "--expert_objective=guard", "--method=tesla")
    made = json.loads((tmp_path / "d/manifest.json").read_text())
    assert out["method"] == "tesla" and made["expert_objective"]["name"] == "guard"
    assert made["expert_objective"]["beta"] == 0.5


def test_registry_plans_guard_arms_beside_plain_ones(tmp_path):
    """experts=guard: the GUARD buffer in its own folder (shared by MTT and TESLA), its objective from the method
    option and its settings from [experts.objective]; the matching asks for that objective."""
    from guard_fast.pipeline import PipelineConfig, plan_pipeline

    cfg = load_config(PipelineConfig, None, ["--methods=mtt,mtt:experts=guard,tesla,tesla:experts=guard",
                                             "--ipc=10", "--experts.objective.beta=0.01",
                                             "--experts.objective.name=pgd-at"])
    chains = plan_pipeline(cfg, tmp_path)
    assert [label for label, _, _ in chains] == ["MTT", "GUARD(MTT)", "TESLA", "GUARD(TESLA)"]
    by = {label: {s.kind: s for s in stages} for label, _, stages in chains}
    plain = {by[k]["experts"].folder for k in ("MTT", "TESLA")}
    guard = {by[k]["experts"].folder for k in ("GUARD(MTT)", "GUARD(TESLA)")}
    assert plain == {tmp_path / "experts"} and guard == {tmp_path / "experts-guard"}
    for name, objective in [("MTT", "none"), ("TESLA", "none"), ("GUARD(MTT)", "guard"), ("GUARD(TESLA)", "guard")]:
        ex, mt = by[name]["experts"].config, by[name]["mtt"].config
        beta = 0.01 if objective == "guard" else ObjectiveConfig().beta  # the plain buffer ignores GUARD settings
        assert (ex.objective.name, ex.objective.beta, mt.expert_objective) == (objective, beta, objective)
        assert mt.buffer == str(by[name]["experts"].folder)
    assert by["GUARD(TESLA)"]["mtt"].config.method == "tesla"
    with pytest.raises(ConfigError, match="mtt:experts=guardd: valid values are none, guard"):
        load_config(PipelineConfig, None, ["--methods=mtt:experts=guardd"])


@pytest.mark.subprocess
def test_pipeline_runs_guard_mtt_and_guard_tesla(small, tmp_path):
    """experts (guard) -> mtt / tesla -> train-hard -> evaluate -> report, tiny, one GUARD buffer for both."""
    out = tmp_path / "pipe"
    cmd = [PYTHON, str(REPO / "launchers/pipeline.py"), f"--data.path={small}", "--data.image_size=16",
           "--data.workers=0", "--data.eval_batch_size=20", f"--output.dir={out}", "--output.progress=false",
           "--methods=mtt:experts=guard,tesla:experts=guard", "--ipc=2", "--experts.model.width=4",
           "--experts.num_experts=2", "--experts.epochs=3", "--experts.batch_size=32", "--experts.objective.beta=0.1",
           "--mtt.iterations=2", "--mtt.syn_steps=2", "--mtt.max_start_epoch=1", "--mtt.lr_img=10",
           "--train_hard.model.width=4", "--train_hard.optim.epochs=2", "--train_hard.val_batches=1",
           "--evaluate.num_images=20", "--evaluate.attack.eps=1/255", "--evaluate.attack.pgd_steps=2",
           "--evaluate.attack.square_queries=5", "--evaluate.attack.aa_steps=2",
           "--evaluate.attack.aa_square_queries=5", "--evaluate.attack.cw_steps=2", "--evaluate.attack.mim_steps=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert {row["label"] for row in results["rows"]} == {"GUARD(MTT) IPC 2", "GUARD(TESLA) IPC 2"}
    assert [s["stage"] for s in results["stages"]].count("experts-guard") == 1  # one buffer for both methods
    buffer = json.loads((out / "experts-guard/buffer.json").read_text())
    assert buffer["objective"]["name"] == "guard" and buffer["objective"]["beta"] == 0.1
    assert not (out / "experts").exists()
    for slug in ("mtt-experts-guard", "tesla-experts-guard"):
        made = json.loads((out / slug / "ipc2/distill/manifest.json").read_text())
        assert made["expert_objective"]["name"] == "guard" and made["buffer_key"] == buffer["key"]
    assert "GUARD(MTT)" in (out / "report.md").read_text()
