"""Curvature diagnostics: power iteration = the exact Hessian's top eigenvalue, a quadratic's known spectrum (top-k by
deflation), per-image independence, GUARD's step, 1 process == 2 gloo ranks, report == JSON, one-line errors, the
pipeline's optional section. Tiny models and images, float64."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from guard_fast.data import build_loader
from guard_fast.models import build_model, save_checkpoint
from guard_fast.robustness.curvature import (
    CurvatureConfig,
    PipelineCurvatureConfig,
    guard_step,
    measure_batch,
    power_iteration,
    run_curvature,
    start_vectors,
    top_eigenpairs,
)
from guard_fast.robustness.curvature_report import combine, quantiles, write_outputs
from guard_fast.runtime import config as C
from guard_fast.runtime.config import DataConfig, parse_args
from guard_fast.runtime.distributed import DistInfo
from guard_fast.runtime.errors import ConfigError
from launchers.cli import run
from tests.conftest import PYTHON, REPO, subprocess_env

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
# Exact-Hessian comparisons in float64: power iteration stops at a relative Rayleigh-quotient change of tol = 1e-10,
# so lambda_max must match eigvalsh to 1e-6 relative (the Rayleigh quotient's error is about the square of the
# eigenvector's, far below the stop tolerance).
TOL, RTOL = 1e-10, 1e-6


def per_image_hessians(loss_fn, x: torch.Tensor) -> torch.Tensor:
    """(B, d, d) exact input Hessians, one torch.autograd.functional.hessian call per image."""
    out = []
    for i in range(len(x)):
        def f(xi, i=i):
            return loss_fn(torch.cat([x[:i], xi[None], x[i + 1:]]))[i]
        out.append(torch.autograd.functional.hessian(f, x[i]).reshape(x[i].numel(), x[i].numel()))
    return torch.stack(out)


@pytest.fixture
def tiny_net():
    """A width-2 ResNet-18 on 4 px, 3-class images (d = 48), BatchNorm statistics made non-trivial, eval mode."""
    torch.manual_seed(0)
    model = build_model("resnet18-cifar", 3, (0.3, 0.3, 0.3), (0.35, 0.3, 0.25), width=2, image_size=4).double()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 3, 4, 4, dtype=torch.float64))  # running statistics away from (0, 1)
    return model.eval()


def test_power_iteration_equals_exact_hessian_top_eigenvalue(tiny_net):
    torch.manual_seed(1)
    x, y = torch.rand(5, 3, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])

    def loss_fn(xb):
        return F.cross_entropy(tiny_net(xb), y, reduction="none")

    exact = torch.linalg.eigh(per_image_hessians(loss_fn, x))
    # A ReLU net's input Hessian is J^T (diag(p) - p p^T) J: PSD, of rank <= classes - 1 = 2 here
    starts = start_vectors(0, range(5), 2, x.shape[1:], torch.float64, x.device)
    out = measure_batch(loss_fn, x, starts, TOL, 2000, 3.0, tiny_net.std)
    assert bool(out["converged"].all())
    top = exact.eigenvalues.flip(1)[:, :2]  # largest first
    assert bool((exact.eigenvalues.abs()[:, :-2] < 1e-10 * top[:, :1]).all())
    torch.testing.assert_close(out["eigenvalues"], top, rtol=RTOL, atol=0)
    # the reported cosine uses the top eigenvector: compare with the exact one
    xr = x.clone().requires_grad_(True)
    g = torch.autograd.grad(loss_fn(xr).sum(), xr)[0].flatten(1)
    v1 = exact.eigenvectors[:, :, -1]
    cos = (g * v1).sum(1).abs() / g.norm(dim=1)
    torch.testing.assert_close(out["cos_grad_top"], cos, rtol=1e-4, atol=1e-6)
    ghat = g / g.norm(dim=1, keepdim=True)
    exact_rq = torch.einsum("bi,bij,bj->b", ghat, per_image_hessians(loss_fn, x), ghat)
    torch.testing.assert_close(out["grad_rayleigh"], exact_rq, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(out["grad_norm"], g.norm(dim=1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("d, k", [(7, 3), (13, 4), (1, 1)])
def test_quadratic_with_known_hessian_gives_its_spectrum(d, k):
    """L_i(x) = 0.5 x^T A_i x with A_i = Q_i diag(s_i) Q_i^T: power iteration + deflation return s_i's k largest,
    per image (each image has its own spectrum, so a Hessian mixed across images would fail)."""
    gen = torch.Generator().manual_seed(d)
    B = 4
    spectra = torch.rand(B, d, generator=gen, dtype=torch.float64) * 10 + 0.1
    spectra[:, 0] = 20.0 + torch.arange(B)  # a clear gap at the top, different per image
    q, _ = torch.linalg.qr(torch.randn(B, d, d, generator=gen, dtype=torch.float64))
    A = q @ torch.diag_embed(spectra) @ q.transpose(1, 2)  # (B, d, d)

    def loss_fn(x):  # x: (B, d)
        return 0.5 * torch.einsum("bi,bij,bj->b", x, A, x)

    x = torch.randn(B, d, generator=gen, dtype=torch.float64)
    starts = start_vectors(3, range(B), k, (d,), torch.float64, x.device)
    out = measure_batch(loss_fn, x, starts, TOL, 5000, 0.5)
    want = spectra.sort(dim=1, descending=True).values[:, :k]
    torch.testing.assert_close(out["eigenvalues"], want, rtol=RTOL, atol=1e-9)
    # constant Hessian: the finite difference along GUARD's step is exactly ||A zhat||, the Rayleigh quotient exact
    g = torch.einsum("bij,bj->bi", A, x)
    ghat = g / g.norm(dim=1, keepdim=True)
    torch.testing.assert_close(out["fd_curvature"], torch.einsum("bij,bj->bi", A, ghat).norm(dim=1), rtol=1e-6,
                               atol=0)
    torch.testing.assert_close(out["grad_rayleigh"], torch.einsum("bi,bij,bj->b", ghat, A, ghat))
    assert bool((out["fd_curvature"] <= out["lambda_max"] * (1 + 1e-9)).all())


def test_each_image_stops_on_its_own_and_iterations_are_capped():
    """Convergence is per image: an image's result is the same alone or in a batch; max_iters caps and reports."""
    gen = torch.Generator().manual_seed(0)
    d = 9
    spectra = torch.stack([torch.linspace(1, 10, d), torch.linspace(9.9, 10, d)]).double()  # fast vs slow gap
    q, _ = torch.linalg.qr(torch.randn(2, d, d, generator=gen, dtype=torch.float64))
    A = q @ torch.diag_embed(spectra) @ q.transpose(1, 2)

    def hvp_of(idx):
        return lambda v: torch.einsum("bij,bj->bi", A[idx], v)

    v0 = torch.randn(2, d, generator=gen, dtype=torch.float64)
    lam, v, it, ok = power_iteration(hvp_of([0, 1]), v0, 1e-8, 10_000)
    lam0, v_0, it0, ok0 = power_iteration(hvp_of([0]), v0[:1], 1e-8, 10_000)
    assert it[0] < it[1] and bool(ok.all())
    assert torch.equal(lam[:1], lam0) and torch.equal(it[:1], it0) and torch.equal(v[:1], v_0)
    lam, _, it, ok = power_iteration(hvp_of([0, 1]), v0, 1e-12, 5)
    assert it.tolist() == [5, 5] and not bool(ok.any())


def test_zero_hessian_gives_zero_and_converges():
    lams, vecs, it, ok = top_eigenpairs(lambda v: torch.zeros_like(v), torch.randn(2, 3, 5, dtype=torch.float64),
                                        1e-3, 50)
    assert torch.equal(lams, torch.zeros(3, 2, dtype=torch.float64)) and bool(ok.all()) and bool((it <= 2).all())
    assert all(torch.isfinite(v).all() for v in vecs)


def test_guard_step_is_guards_z_in_pixel_units():
    """z_u = h (g_u + 1e-7) / (||g_u|| + 1e-7) in normalized space with g_u = std * g; z = std * z_u."""
    torch.manual_seed(0)
    std = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64).view(1, 3, 1, 1)
    g = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    z = guard_step(g, std, 3.0)
    z_u = z / std
    torch.testing.assert_close(z_u.flatten(1).norm(dim=1), torch.full((4,), 3.0, dtype=torch.float64), rtol=1e-6,
                               atol=0)
    g_u = (g * std).flatten(1)
    cos = (z_u.flatten(1) * g_u).sum(1) / (z_u.flatten(1).norm(dim=1) * g_u.norm(dim=1))
    torch.testing.assert_close(cos, torch.ones(4, dtype=torch.float64))


def test_start_vectors_depend_on_position_not_batch():
    a = start_vectors(5, [3, 4, 5], 2, (3, 2, 2), torch.float64, torch.device("cpu"))
    b = start_vectors(5, [4], 2, (3, 2, 2), torch.float64, torch.device("cpu"))
    assert a.shape == (2, 3, 3, 2, 2) and torch.equal(a[:, 1], b[:, 0]) and not torch.equal(a[:, 0], a[:, 1])


def test_quantiles():
    q = quantiles([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (q["median"], q["q1"], q["q3"], q["mean"], q["n"]) == (3.0, 2.0, 4.0, 3.0, 5)


# ----------------------------------------------------------------------------------------------------------------
# The stage: digits, tiny networks


def train(data: Path, epochs: int, out: Path) -> Path:
    """A width-4 resnet18-cifar on 16 px digits (seconds per epoch on 2 cores)."""
    loader = build_loader(DataConfig(path=str(data), image_size=16, workers=0, batch_size=64), "train")
    torch.manual_seed(0)
    model = build_model("resnet18-cifar", 10, loader.spec.mean, loader.spec.std, width=4)
    opt = torch.optim.Adam(model.parameters(), 0.01)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_checkpoint(model, out)
    return out


@pytest.fixture(scope="module")
def ckpts(digits_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("curv-ckpts")
    return {"a": train(digits_dir, 1, root / "a" / "teacher.pt"), "b": train(digits_dir, 0, root / "b" / "teacher.pt")}


# 8 images in batches of 3: ranks get batches {0, 2} and {1}, the last one short
TINY = ["--data.image_size=16", "--model.width=4", "--data.workers=0", "--batch_size=3", "--num_images=8",
        "--subset_seed=2", "--output.progress=false", "--top_k=2", "--tol=1e-4", "--max_iters=40"]


def curv_args(digits_dir: Path, ckpts: dict[str, Path], out: Path) -> list[str]:
    return [f"--data.path={digits_dir}", f"--output.dir={out}", *TINY, f"--checkpoints={ckpts['a']},{ckpts['b']}",
            "--labels=A,B", "--groups=t,t"]


@pytest.mark.multirank
@pytest.mark.subprocess
def test_two_gloo_ranks_equal_one_process_and_report_matches_json(digits_dir, ckpts, tmp_path):
    """Every per-image number matches exactly (1 thread per process in both, as each torchrun rank on 2 cores):
    ranks take whole batches of the 1-rank order and each image's power-iteration start is seeded by its position."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_curvature(parse_args(CurvatureConfig, curv_args(digits_dir, ckpts, tmp_path / "one"), "t"), CPU)
    finally:
        torch.set_num_threads(threads)
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29611",
           str(REPO / "launchers/curvature.py"), *curv_args(digits_dir, ckpts, tmp_path / "two")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "curvature.json").read_text())
    two = json.loads((tmp_path / "two" / "curvature.json").read_text())
    assert (one["world"], two["world"]) == (1, 2)
    strip = ("seconds", "seconds_per_image")
    for m1, m2 in zip(one["models"], two["models"], strict=True):
        assert m1["records"] == m2["records"] and m1["summary"] == m2["summary"]
        assert [r["position"] for r in m1["records"]] == list(range(8))
        assert {k for k in m1 if k not in strip} == {k for k in m2 if k not in strip}
    recs = one["models"][0]["records"]
    assert all(len(r["eigenvalues"]) == 2 and r["eigenvalues"][0] >= r["eigenvalues"][1] - 1e-12 for r in recs)
    assert all(0 <= r["cos_grad_top"] <= 1 + 1e-12 and r["lambda_max"] >= 0 for r in recs)
    # the trained network is measurably different from the untrained one
    assert one["models"][0]["summary"]["lambda_max"] != one["models"][1]["summary"]["lambda_max"]
    md = (tmp_path / "one" / "curvature.md").read_text()
    for m in one["models"]:
        q = m["summary"]["lambda_max"]
        assert f"| {m['label']} | t | {q['median']:.3g} | {q['q1']:.3g} | {q['q3']:.3g} | {q['mean']:.3g} |" in md
    c = one["comparisons"][0]
    assert (c["a"], c["b"], c["images"]) == ("A", "B", 8)
    a, b = (m["records"] for m in one["models"])
    assert c["fraction_a_flatter"] == sum(x["lambda_max"] < y["lambda_max"] for x, y in zip(a, b, strict=True)) / 8
    assert str(digits_dir) not in md  # no machine paths in the report besides checkpoint names
    from PIL import Image

    with Image.open(tmp_path / "one" / "curvature.png") as img:
        assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 300
    # the pipeline's combined report: one model per stage, here split into two "stages" and recombined
    halves = [{**one, "models": [m], "comparisons": [], "seconds": 1.0} for m in one["models"]]
    both = combine(halves)
    assert both["models"] == one["models"] and both["comparisons"] == one["comparisons"] and both["seconds"] == 2.0
    write_outputs(both, tmp_path / "combined")
    assert (tmp_path / "combined" / "curvature.md").read_text() == md.replace(f"{one['seconds']:.1f} s.", "2.0 s.")


def in_process(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = run(lambda a: run_curvature(parse_args(CurvatureConfig, a, "guard-fast curvature"), CPU) and 0, argv,
               prog="guard-fast curvature")
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def test_bad_inputs_give_one_line_errors(digits_dir, ckpts, tmp_path, capsys):
    base = [f"--data.path={digits_dir}", f"--output.dir={tmp_path / 'out'}", *TINY]
    cases = [
        ([*base, f"--checkpoints={ckpts['a']}", "--labels=x,y"], 2, "labels"),
        ([*base, f"--checkpoints={ckpts['a']}", "--groups=x,y"], 2, "groups"),
        ([*base, f"--checkpoints={ckpts['a']}", "--tol=0"], 2, "tol"),
        ([*base, f"--checkpoints={ckpts['a']}", "--top_k=0"], 2, "top_k"),
        ([*base, f"--checkpoints={ckpts['a']}", "--dtype=float16"], 2, "dtype"),
        ([*base, f"--checkpoints={ckpts['a']}", "--h=-1"], 2, "h = -1"),
        ([*base, f"--checkpoints={ckpts['a']}", "--num_images=-3"], 2, "num_images"),
        (base, 2, "checkpoints"),
        ([*base, f"--checkpoints={tmp_path / 'missing.pt'}"], 1, "missing.pt"),
        ([*base, "--model.width=8", f"--checkpoints={ckpts['a']}"], 1, "model.width = 8"),
        ([*base, f"--checkpoints={ckpts['a']}", "--bogus=1"], 2, "bogus"),
    ]
    for argv, want_code, needle in cases:
        code, err = in_process(argv, capsys)
        assert code == want_code and len(err) == 1 and needle in err[0], (argv, err)


@pytest.mark.subprocess
def test_cli_lists_the_command():
    r = subprocess.run([PYTHON, "-m", "launchers.cli", "curvature", "--help"], capture_output=True, text=True,
                       env=subprocess_env(), cwd=REPO, timeout=120)
    assert r.returncode == 0 and "--top_k" in r.stdout and "--h=3.0" in r.stdout


def test_every_field_documented():
    for section in (CurvatureConfig, PipelineCurvatureConfig):
        docs = C.field_docs(section)
        missing = [f.name for f in dataclasses.fields(section)
                   if f.name not in ("data", "model", "dist", "output") and f.name not in docs]
        assert not missing, f"{section.__name__}: fields without a docstring: {missing}"


def test_pipeline_section_is_off_by_default_and_strips_to_the_stage_config():
    sec = PipelineCurvatureConfig()
    assert sec.enabled is False and sec.models == ["students", "teachers"]
    sec.num_images, sec.top_k = 7, 3
    stage = sec.stage_config()
    assert type(stage) is CurvatureConfig and (stage.num_images, stage.top_k) == (7, 3)
    with pytest.raises(ConfigError, match="curvature.models"):
        PipelineCurvatureConfig(models=["student"]).validate()


def test_pipeline_plans_curvature_stages_only_when_enabled(tmp_path):
    """Off by default; enabled, each chain gets its teacher's (shared folder) and its student's curvature stage,
    after evaluate, each measuring the network its source stage wrote with that network's settings."""
    from guard_fast.pipeline import PipelineConfig, plan_pipeline
    from guard_fast.runtime.config import load_config

    args = ["--methods=sre2l:teacher=guard,sre2l:teacher=none", "--squeeze.model.width=5", "--train.model.width=7"]
    off = plan_pipeline(load_config(PipelineConfig, None, args), tmp_path)
    assert all(s.kind != "curvature" for _, _, st in off for s in st)
    cfg = load_config(PipelineConfig, None, [*args, "--curvature.enabled=true", "--curvature.num_images=5",
                                             "--force=curvature"])
    chains = plan_pipeline(cfg, tmp_path)
    kinds = [s.kind for s in chains[0][2]]
    assert kinds[-3:] == ["evaluate", "curvature", "curvature"]
    teacher, student = chains[1][2][-2:]
    assert type(student.config) is CurvatureConfig and student.config.num_images == 5
    assert teacher.folder == tmp_path / "curvature/teacher-none" and teacher.config.model.width == 5
    assert teacher.config.checkpoints == [str(tmp_path / "teachers/none/teacher.pt")]
    assert teacher.config.groups == ["teachers"] and teacher.inputs == [tmp_path / "teachers/none"]
    assert student.config.checkpoints == [str(tmp_path / "sre2l-teacher-none/ipc10/train/student.pt")]
    assert (student.config.labels, student.config.groups, student.config.model.width) == (["SRe2L IPC 10"],
                                                                                          ["students"], 7)
    only = plan_pipeline(load_config(PipelineConfig, None, [*args, "--curvature.enabled=true",
                                                            "--curvature.models=students"]), tmp_path)
    assert [s.kind for s in only[0][2]][-2:] == ["evaluate", "curvature"]
    with pytest.raises(ConfigError, match="force"):
        load_config(PipelineConfig, None, [*args, "--force=curvature"])
    # a method without a squeeze teacher (MTT) gets its student's stage only
    mtt = plan_pipeline(load_config(PipelineConfig, None, ["--methods=mtt", "--curvature.enabled=true"]), tmp_path)
    curv = [s for s in mtt[0][2] if s.kind == "curvature"]
    assert [s.config.checkpoints for s in curv] == [[str(tmp_path / "mtt/ipc10/train-hard/student.pt")]]


def test_teacher_bench_writes_both_models(digits_dir, tmp_path):
    """bench.curvature_digits end to end at zero epochs: both teachers are the same seeded initialization, so their
    per-image numbers must agree exactly and neither is 'flatter' on any image."""
    from bench.curvature_digits import main

    main([f"--data={digits_dir}", f"--out={tmp_path / 'out'}", f"--work={tmp_path / 'work'}", "--epochs=0",
          "--width=2", "--num_images=3", "--max_iters=5", "--batch_size=3"])
    res = json.loads((tmp_path / "out" / "curvature.json").read_text())
    guard, plain = res["models"]
    assert (guard["label"], plain["label"]) == ("GUARD teacher", "plain teacher") and guard["images"] == 3
    assert guard["records"] == plain["records"] and res["comparisons"][0]["fraction_a_flatter"] == 0.0


def test_pipeline_runs_curvature_stages_and_combines_them(digits_dir, ckpts, tmp_path, monkeypatch):
    """run_pipeline with curvature enabled, the distillation stages replaced by stubs that write a checkpoint: the
    real evaluate and curvature stages run, and report.md links the combined curvature.md/png of every model."""
    import shutil

    from guard_fast import pipeline as P
    from guard_fast.methods import Stage
    from guard_fast.runtime.config import load_config
    from guard_fast.squeeze.stage import SqueezeConfig
    from guard_fast.student.kd import TrainConfig

    cfg = load_config(P.PipelineConfig, None, [
        f"--data.path={digits_dir}", "--data.image_size=16", "--data.workers=0", "--data.eval_batch_size=4",
        f"--output.dir={tmp_path}", "--output.progress=false", "--evaluate.num_images=4",
        "--evaluate.attack.names=pgd100", "--evaluate.attack.pgd_steps=1", "--curvature.enabled=true",
        "--curvature.num_images=4", "--curvature.batch_size=4", "--curvature.max_iters=5"])

    def stub(kind: str, folder: Path, src: Path, name: str, config) -> Stage:
        config.model.width = 4

        def run_stub(c, info):
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, folder / name)
            return {}
        return Stage(kind, folder, config, run_stub, {name.split(".")[0]: name})

    def plan(cfg, root):
        chains = []
        for label, src in (("GUARD", ckpts["a"]), ("SRe2L", ckpts["b"])):
            chain = root / label / "ipc10"
            stages = [stub("squeeze", root / "teachers" / label, src, "teacher.pt", SqueezeConfig()),
                      stub("train", chain / "train", src, "student.pt", TrainConfig())]
            stages.append(P.evaluate_stage(cfg, stages[-1], f"{label} IPC 10", chain / "evaluate"))
            stages += P.curvature_stages(cfg, stages, f"{label} IPC 10", root, chain)
            chains.append((label, 10, stages))
        return chains

    monkeypatch.setattr(P, "plan_pipeline", plan)
    P.run_pipeline(cfg, CPU)
    res = json.loads((tmp_path / "curvature.json").read_text())
    assert [(m["label"], m["group"]) for m in res["models"]] == [
        ("GUARD teacher", "teachers"), ("GUARD IPC 10", "students"), ("SRe2L teacher", "teachers"),
        ("SRe2L IPC 10", "students")]
    assert [(c["a"], c["b"]) for c in res["comparisons"]] == [("GUARD teacher", "SRe2L teacher"),
                                                              ("GUARD IPC 10", "SRe2L IPC 10")]
    # a teacher and the student copied from the same checkpoint measure the same
    assert res["models"][0]["records"] == res["models"][1]["records"]
    report = (tmp_path / "report.md").read_text()
    assert "![curvature](curvature.png)" in report and (tmp_path / "curvature.png").is_file()
    assert (tmp_path / "GUARD/ipc10/curvature/curvature.json").is_file()
