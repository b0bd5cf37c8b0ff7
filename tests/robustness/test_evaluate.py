"""Robustness evaluation: attack semantics (eps ball, [0,1] box, worst-case counting), registry == torchattacks,
report == JSON, 2 gloo ranks == 1 process, seeded subsets, one-line errors. Tiny models, reduced attack budgets."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
import torchattacks
from torch import nn

from guard_fast.attacks.suite import ATTACKS, AttackConfig, build_attack
from guard_fast.data import build_loader
from guard_fast.data.folder import ShardSampler
from guard_fast.models import build_model, save_checkpoint
from guard_fast.robustness.evaluate import EvaluateConfig, batch_seed, default_labels, evaluate_model, run_evaluate
from guard_fast.robustness.report import drop_rate, improved_robustness_ratio, robustness_ratio
from guard_fast.runtime.config import DataConfig, load_config, parse_args
from guard_fast.runtime.distributed import DistInfo
from guard_fast.runtime.errors import ConfigError
from launchers.cli import run
from tests.conftest import PYTHON, REPO, subprocess_env

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
LINF = [n for n, spec in ATTACKS.items() if spec.norm == "Linf"]
# Reduced budgets: every attack still runs every code path (AutoAttack all four sub-attacks).
SMALL = {"pgd_steps": 5, "square_queries": 30, "aa_steps": 3, "aa_square_queries": 30, "aa_target_classes": 3,
         "cw_steps": 10, "mim_steps": 5}
TINY = ["--data.image_size=16", "--model.width=8", "--data.workers=0", "--data.eval_batch_size=16",
        "--num_images=40", "--subset_seed=3", "--output.progress=false", "--attack.eps=[1/255, 8/255]",
        *[f"--attack.{k}={v}" for k, v in SMALL.items()]]


def small_cfg(**kw) -> AttackConfig:
    return AttackConfig(**{**SMALL, **kw})


def train(data: Path, epochs: int, out: Path, num_classes: int = 10) -> Path:
    """A width-8 resnet18-cifar trained on the 16 px digits for a few epochs (about 1 s per epoch on 2 cores)."""
    cfg = DataConfig(path=str(data), image_size=16, workers=0, batch_size=64, crop_scale_min=0.6)
    loader = build_loader(cfg, "train")
    torch.manual_seed(0)
    model = build_model("resnet18-cifar", num_classes, loader.spec.mean, loader.spec.std, width=8)
    opt = torch.optim.Adam(model.parameters(), 0.01)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y % num_classes)
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_checkpoint(model, out)
    return out


@pytest.fixture(scope="module")
def ckpts(digits_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {"strong": train(digits_dir, 3, root / "strong" / "teacher.pt"),
            "weak": train(digits_dir, 1, root / "weak" / "teacher.pt")}


@pytest.fixture(scope="module")
def model(ckpts, digits_dir):
    spec = build_loader(DataConfig(path=str(digits_dir), workers=0), "val").spec
    return build_model("resnet18-cifar", 10, spec.mean, spec.std, 8, str(ckpts["strong"])).eval()


@pytest.fixture(scope="module")
def batch(digits_dir):
    x, y = next(iter(build_loader(DataConfig(path=str(digits_dir), image_size=16, workers=0), "val",
                                  batch_size=16, subset=16, subset_seed=1)))
    return x, y


def eval_args(digits_dir: Path, ckpts: dict[str, Path], out: Path) -> list[str]:
    return [f"--data.path={digits_dir}", f"--output.dir={out}", *TINY,
            f"--checkpoints={ckpts['strong']},{ckpts['weak']}", "--labels=GUARD,SRe2L"]


@pytest.fixture(scope="module")
def single(digits_dir, ckpts, tmp_path_factory) -> Path:
    """One in-process run (1 rank, 1 thread like each torchrun rank below) of both checkpoints."""
    out = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_evaluate(load_config(EvaluateConfig, overrides=eval_args(digits_dir, ckpts, out)), CPU)
    finally:
        torch.set_num_threads(threads)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Attack semantics


def test_paper_settings_are_the_defaults(tiny_model):
    cfg = AttackConfig()
    cfg.validate()
    assert cfg.names == ["pgd100", "square", "autoattack", "cw", "mim"] and cfg.eps == [1 / 255]
    m = tiny_model(num_classes=5, width=4).eval()
    eps = 1 / 255
    pgd = build_attack("pgd100", m, cfg, eps, 5)
    assert (pgd.eps, pgd.alpha, pgd.steps, pgd.random_start) == (eps, 0.25 / 255, 100, True)
    sq = build_attack("square", m, cfg, eps, 5)
    assert (sq.eps, sq.n_queries, sq.loss, sq.norm) == (eps, 5000, "margin", "Linf")
    cw = build_attack("cw", m, cfg, eps, 5)
    assert (cw.c, cw.kappa, cw.steps, cw.lr) == (1e-4, 0, 50, 0.01)
    mim = build_attack("mim", m, cfg, eps, 5)
    assert (mim.eps, mim.alpha, mim.steps, mim.decay) == (eps, 1 / 255, 20, 1.0)
    aa = build_attack("autoattack", m, cfg, eps, 5)
    kinds = [type(a).__name__ for a in aa.attacks]
    assert kinds == ["APGD", "APGDT", "FAB", "Square"]
    assert [a.steps for a in aa.attacks[:3]] == [10, 10, 10] and aa.attacks[3].n_queries == 5000
    assert aa.attacks[1].n_target_classes == aa.attacks[2].n_target_classes == 4  # 5 classes, not torchattacks' 10
    assert all(a.eps == eps for a in aa.attacks)
    aa100 = build_attack("autoattack", m, AttackConfig(aa_steps=100), eps, 1000)
    assert [a.steps for a in aa100.attacks[:3]] == [100] * 3 and aa100.attacks[1].n_target_classes == 9
    for a in (pgd, sq, cw, mim, aa, *aa.attacks):
        assert a.normalization_used is None  # the model normalizes inside
    # sweeping eps keeps the paper's step-to-radius ratios
    assert build_attack("pgd100", m, cfg, 8 / 255, 5).alpha == pytest.approx(2 / 255)
    assert build_attack("mim", m, cfg, 8 / 255, 5).alpha == pytest.approx(8 / 255)


@pytest.mark.parametrize("name", LINF)
def test_linf_adversarial_examples_stay_in_eps_ball_and_box(name, model, batch):
    x, y = batch
    eps = 8 / 255
    torch.manual_seed(0)
    adv = build_attack(name, model, small_cfg(), eps, 10, seed=0)(x, y)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert not model.training


def test_cw_stays_in_box(model, batch):
    x, y = batch
    adv = build_attack("cw", model, small_cfg(cw_c=10.0, cw_lr=0.1), 0.0, 10)(x, y)
    assert adv.min() >= 0 and adv.max() <= 1 and not torch.equal(adv, x)


class OffGrid(nn.Module):
    """Class 1 iff some pixel is off the 1/255 grid (a perturbed image), else class 0; zero input gradient. Images of
    class 1 are wrong clean but 'right' once perturbed: a count of adversarial correctness alone would exceed clean
    accuracy."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))  # torchattacks reads the device from a parameter

    def forward(self, x):
        off = ((x * 255 - (x * 255).round()).abs().flatten(1).amax(1) > 1e-3).float()
        return torch.stack([1 - off, off], 1) * 10 + 0 * x.flatten(1).sum(1, keepdim=True) + self.w


class Constant(nn.Module):
    """Logits that ignore the input (favouring class 3), still connected to it so gradients exist (all zero)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.logits = nn.Parameter(torch.linspace(0, 1, num_classes).roll(4))

    def forward(self, x):
        return self.logits.expand(len(x), -1) + 0 * x.flatten(1).sum(1, keepdim=True)


def test_attacked_accuracy_never_exceeds_clean(model, batch):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 8, 8), generator=gen).float() / 255
    y = (torch.arange(16) % 4 != 0).long()  # 4 of class 0 (correct clean), 12 of class 1 (wrong clean)
    offgrid = OffGrid()
    torch.manual_seed(0)
    raw = offgrid(build_attack("pgd100", offgrid, small_cfg(), 8 / 255, 2)(x, y)).argmax(1) == y
    assert raw.float().mean() == 0.75  # perturbed class-1 images are "correct": the test can tell
    res = evaluate_model(offgrid, [(x, y)], small_cfg(names=["pgd100", "mim", "autoattack"], eps=[8 / 255]), 2)
    acc = {r["attack"]: r["accuracy"] for r in res["results"]}
    assert acc["clean"] == 0.25
    assert acc["pgd100"] == acc["autoattack"] == 0.0  # random starts leave the grid: class 0 images fall
    assert acc["mim"] == 0.25  # no random start, zero gradient: nothing moves
    # a real model, real attacks
    res = evaluate_model(model, [batch], small_cfg(names=["pgd100", "mim", "autoattack"], eps=[2 / 255, 8 / 255]), 10)
    clean = res["results"][0]["correct"]
    assert clean > 8
    assert all(r["correct"] <= clean for r in res["results"])
    assert min(r["correct"] for r in res["results"] if r["eps"] == 8 / 255) < clean  # the attacks do bite


def test_input_independent_model_keeps_clean_accuracy(batch):
    x, y = batch
    res = evaluate_model(Constant(), [(x, y)], small_cfg(eps=[8 / 255]), 10)
    clean = res["results"][0]["correct"]
    assert clean == int((y == 3).sum()) > 0
    assert {r["attack"] for r in res["results"]} == {"clean", *ATTACKS}
    assert all(r["correct"] == clean for r in res["results"]), res["results"]


def test_registry_pgd_equals_direct_torchattacks(model, batch):
    x, y = batch
    eps = 8 / 255
    torch.manual_seed(7)
    ours = build_attack("pgd100", model, small_cfg(), eps, 10, seed=7)(x, y)
    torch.manual_seed(7)
    direct = torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=5, random_start=True)(x, y)
    assert torch.equal(ours, direct)
    # and evaluate_model's count is that of the direct call under its documented seed
    res = evaluate_model(model, [(x, y)], small_cfg(names=["pgd100"], eps=[eps]), 10, seed=11)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    torch.manual_seed(batch_seed(11, 1, 0))
    adv = torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=5, random_start=True)(x[correct], y[correct])
    with torch.no_grad():
        expected = int((model(adv).argmax(1) == y[correct]).sum())
    assert res["results"][1]["correct"] == expected < int(correct.sum())


# ----------------------------------------------------------------------------------------------------------------
# Report and distribution


def test_metric_formulas():
    assert drop_rate(0.8, 0.2) == pytest.approx(0.75) and drop_rate(0.0, 0.0) is None
    # ASR = clean - acc = [0.6, 0.2, 0.4]: RR = 100 (1 - 0.4 / 0.6)
    assert robustness_ratio(0.8, [0.2, 0.6, 0.4]) == pytest.approx(100 / 3)
    assert robustness_ratio(0.8, [0.5, 0.5]) == pytest.approx(0.0)  # every attack as strong as the strongest
    assert robustness_ratio(0.5, [0.5, 0.5]) is None  # no attack lowers accuracy
    assert improved_robustness_ratio(0.8, [0.2, 0.6, 0.4]) == pytest.approx(100 * (1 - 0.4 * 0.6 / 0.64))
    assert improved_robustness_ratio(0.5, [0.5, 0.5]) == 100.0 and improved_robustness_ratio(0.8, [0.0]) == 0.0


def parse_tables(md: str) -> dict[str, dict[str, dict[str, str]]]:
    """{section heading: {first cell: {column: cell}}} of the 'Accuracy' tables in evaluation.md."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    for section in md.split("\n## ")[1:]:
        head, _, body = section.partition("\n")
        table = body.split("Accuracy (%):\n\n", 1)[-1].split("\n\n", 1)[0] if "Accuracy (%)" in body else ""
        lines = [ln for ln in table.splitlines() if ln.startswith("|")]
        if not lines:
            continue
        cols = [c.strip() for c in lines[0].strip("|").split("|")]
        out[head] = {cells[0]: dict(zip(cols, cells, strict=True)) for cells in
                     ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:])}
    return out


def test_report_table_and_json_agree(single):
    ev = json.loads((single / "evaluation.json").read_text())
    md = (single / "evaluation.md").read_text()
    tables = parse_tables(md)
    assert set(tables) == {"L-inf eps = 1/255", "L-inf eps = 8/255"}
    header = ["Checkpoint", "Clean", "PGD100", "Square", "AutoAttack", "CW", "MIM"]  # the paper's layout
    assert re.search(r"\| " + r" \| ".join(header) + r" \|", md)
    assert ev["dataset"]["images"] == 40 and ev["dataset"]["split_images"] == 359
    for ck in ev["checkpoints"]:
        assert ck["num_images"] == 40
        for r in ck["results"]:
            assert r["accuracy"] == r["correct"] / r["total"] and r["seconds"] >= 0
            eps_list = [r["eps"]] if r["eps"] is not None else [1 / 255, 8 / 255]  # CW shows under every eps
            for eps in eps_list:
                cell = tables[f"L-inf eps = {round(eps * 255)}/255"][ck["label"]][
                    {"clean": "Clean", "pgd100": "PGD100", "square": "Square", "autoattack": "AutoAttack",
                     "cw": "CW", "mim": "MIM"}[r["attack"]]]
                assert float(cell) == pytest.approx(100 * r["accuracy"], abs=0.005)
    for row, m in zip(ev["rows"], ev["metrics"], strict=True):
        attacks = [k for k in ATTACKS if k in row]
        assert m["drop_rate"] == {k: pytest.approx(drop_rate(row["clean"], row[k])) for k in attacks}
        assert m["robustness_ratio"] == pytest.approx(robustness_ratio(row["clean"], [row[k] for k in attacks]))
        assert m["improved_robustness_ratio"] == pytest.approx(
            improved_robustness_ratio(row["clean"], [row[k] for k in attacks]))
    strong = next(ck for ck in ev["checkpoints"] if ck["label"] == "GUARD")["results"]
    assert strong[0]["accuracy"] > 0.5  # a trained model, so the numbers above are not all zeros
    assert "10 steps" in md and "aa_steps=100" in md  # the report says how AutoAttack ran
    from PIL import Image

    with Image.open(single / "robustness.png") as img:
        assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 300


@pytest.mark.multirank
@pytest.mark.subprocess
def test_two_gloo_ranks_equal_one_process(digits_dir, ckpts, single, tmp_path):
    """Every count - random-start PGD, Square and AutoAttack included - matches: each rank attacks whole batches of
    the 1-rank order with the same per-batch seeds."""
    out = tmp_path / "two"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29600",
           str(REPO / "launchers/evaluate.py"), *eval_args(digits_dir, ckpts, out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    one = json.loads((single / "evaluation.json").read_text())
    two = json.loads((out / "evaluation.json").read_text())
    assert (one["world"], two["world"]) == (1, 2)

    def counts(ev):
        return {(ck["label"], r["attack"], r["eps"]): (r["correct"], r["total"]) for ck in ev["checkpoints"]
                for r in ck["results"]}

    assert counts(two) == counts(one)
    assert len(counts(one)) == 2 * (1 + 4 * 2 + 1)  # 2 checkpoints x (clean + 4 L-inf attacks x 2 eps + CW)


@pytest.mark.parametrize("n, subset, world, block", [(359, 40, 2, 16), (359, 40, 3, 1), (10, 0, 2, 4),
                                                     (50, 100, 2, 8)])
def test_subset_shards_are_disjoint_and_cover_the_subset(n, subset, world, block):
    one = ShardSampler(n, 0, 1, shuffle=False, even=False, subset=subset, subset_seed=3, block=block).indices()
    assert one == sorted(one) and len(one) == (min(subset, n) if subset else n) and len(set(one)) == len(one)
    shards = [ShardSampler(n, r, world, shuffle=False, even=False, subset=subset, subset_seed=3, block=block)
              for r in range(world)]
    flat = [i for s in shards for i in s.indices()]
    assert sorted(flat) == one and len(flat) == len(set(flat))
    assert all(len(s) == len(s.indices()) for s in shards)
    if block > 1:  # whole batches of the 1-rank order: rank r holds batches r, r + world, ...
        batches = [one[i:i + block] for i in range(0, len(one), block)]
        for r, s in enumerate(shards):
            assert s.indices() == [i for b in batches[r::world] for i in b]
    if subset and subset < n:
        other = ShardSampler(n, subset=subset, subset_seed=4, even=False).indices()
        assert other != one


def test_loader_subset(digits_dir):
    cfg = DataConfig(path=str(digits_dir), workers=0, eval_batch_size=8)
    full = build_loader(cfg, "val")
    sub = build_loader(cfg, "val", subset=20, subset_seed=1)
    assert (full.num_samples, sub.num_samples, sub.split_samples) == (359, 20, 359) and len(sub) == 3
    picked = ShardSampler(359, subset=20, subset_seed=1).chosen().tolist()
    xs = torch.cat([x for x, _ in full])
    assert torch.equal(torch.cat([x for x, _ in sub]), xs[picked])
    # unchanged default behaviour: the whole split, strided over ranks
    assert ShardSampler(11, 1, 2, even=False).indices() == list(range(1, 11, 2))


def test_default_labels():
    assert default_labels(["runs/guard/teacher.pt", "runs/sre2l/teacher.pt"]) == ["guard/teacher", "sre2l/teacher"]
    assert default_labels(["a/x.pt", "b/y.pt"]) == ["x", "y"]


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one clear line, non-zero exit


def in_process(argv: list[str], capsys) -> tuple[int, list[str]]:
    """The CLI's error path without the launcher's process-group setup (this pytest process may hold one)."""
    code = run(lambda a: run_evaluate(parse_args(EvaluateConfig, a, "guard-fast evaluate"), CPU) and 0, argv,
               prog="guard-fast evaluate")
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


@pytest.mark.subprocess
def test_bad_inputs_give_one_line_errors(digits_dir, ckpts, tmp_path, capsys):
    r = subprocess.run([str(Path(PYTHON).parent / "guard-fast"), "evaluate", "--attack.names=pgd100,fgsm",
                        f"--checkpoints={ckpts['strong']}"], capture_output=True, text=True, env=subprocess_env(),
                       cwd=REPO, timeout=300)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert "attack.names" in err[0] and "'fgsm'" in err[0] and "pgd100, square, autoattack, cw, mim" in err[0]
    with pytest.raises(ConfigError, match="unknown attack 'fgsm'"):
        build_attack("fgsm", Constant(), AttackConfig(), 1 / 255, 10)

    base = [f"--data.path={digits_dir}", f"--output.dir={tmp_path / 'out'}", *TINY]
    five = train(digits_dir, 0, tmp_path / "five.pt", num_classes=5)  # a 5-class head for 10-class data
    code, err = in_process([*base, f"--checkpoints={ckpts['strong']},{five}"], capsys)
    assert code == 1 and len(err) == 1 and str(five) in err[0] and "does not match" in err[0], err
    assert "10 classes" in err[0]
    code, err = in_process([*base, "--model.width=4", f"--checkpoints={ckpts['strong']}"], capsys)
    assert code == 1 and len(err) == 1 and str(ckpts["strong"]) in err[0] and "model.width = 4" in err[0], err
    code, err = in_process([*base, f"--checkpoints={tmp_path / 'missing.pt'}"], capsys)
    assert code == 1 and len(err) == 1 and "missing.pt" in err[0], err

    empty = tmp_path / "empty"
    for c in range(10):
        (empty / "val" / str(c)).mkdir(parents=True)
    code, err = in_process([*base, f"--data.path={empty}", f"--checkpoints={ckpts['strong']}"], capsys)
    assert code == 1 and len(err) == 1 and str(empty / "val") in err[0], err
    code, err = in_process([*base, "--labels=a,b,c", f"--checkpoints={ckpts['strong']}"], capsys)
    assert code == 2 and len(err) == 1 and "labels" in err[0], err
    code, err = in_process([*base, "--attack.eps=[0]", f"--checkpoints={ckpts['strong']}"], capsys)
    assert code == 2 and len(err) == 1 and "attack.eps" in err[0], err
    code, err = in_process(base, capsys)
    assert code == 2 and len(err) == 1 and "checkpoints" in err[0], err


def test_attack_cost_bench_reports_every_attack(digits_dir, tmp_path):
    from bench.attack_cost import main

    main(["--width=4", "--size=16", "--epochs=0", "--images=2", "--reps=2", "--expensive-images=1",
          "--expensive-reps=2", f"--data={digits_dir}", f"--out={tmp_path}", "--pgd_steps=2", "--square_queries=5",
          "--aa_steps=2", "--aa_square_queries=5", "--aa_target_classes=1", "--cw_steps=2", "--mim_steps=2"])
    out = json.loads((tmp_path / "attack-cost.json").read_text())
    attacks = out["results"]["attacks"]
    assert set(attacks) == {*ATTACKS, "mim_denormals_kept"}
    for r in attacks.values():
        assert len(r["samples"]) == 2 and all(t > 0 for t in r["samples"])
        assert r["seconds_per_image"]["median"] == pytest.approx(sum(r["samples"]) / 2)
    assert out["results"]["settings"]["pgd100"]["steps"] == 2
    assert str(digits_dir) not in (tmp_path / "attack-cost.md").read_text()  # no machine paths in results
