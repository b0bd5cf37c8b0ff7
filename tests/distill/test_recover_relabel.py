"""Recover, relabel and student training: BN matching, CDA, rank parity, replay identity, resume, bad input."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch

from guard_fast.runtime.config import load_config
from tests.chain import TEACHER, data_args, metric, recover, recover_args, relabel, train
from tests.conftest import PYTHON, REPO, subprocess_env

# ---------------------------------------------------------------------------------------------------------------
# Recover


def test_bn_matching_loss_decreases(teacher):
    from guard_fast.data.presets import DATASETS
    from guard_fast.distill.recover import BNStatLoss, RecoverConfig, recover_chunk
    from guard_fast.models import build_model

    spec = DATASETS["digits"]
    model = build_model("resnet18-cifar", 10, spec.mean, spec.std, 4, str(teacher)).eval().requires_grad_(False)
    cfg = load_config(RecoverConfig, None, ["--model.checkpoint=x", "--iterations=40", "--lr=0.1", "--r_bn=1",
                                            "--jitter=0", "--crop_scale_min=1"])
    labels = torch.arange(10)
    images, history = recover_chunk(model, labels, cfg, 16, seed=3)
    assert history[-1] < 0.5 * history[0]

    def bn_term(x):
        bn = BNStatLoss(model.body, cfg.first_bn_multiplier)
        model(x)
        value = bn.pop()
        bn.remove()
        return float(value)

    start = model.denormalize(torch.randn((10, 3, 16, 16), generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    assert bn_term(images) < 0.5 * bn_term(start)
    assert images.min() >= 0 and images.max() <= 1


def test_bn_loss_equals_formula(tiny_model):
    from guard_fast.distill.recover import BNStatLoss

    model = tiny_model(width=4).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp[0])))
             for m in model.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    bn = BNStatLoss(model.body, 10.0)
    with torch.no_grad():
        model(torch.rand(6, 3, 16, 16))
    for h in hooks:
        h.remove()
    expected = 0.0
    for i, (mod, x) in enumerate(seen):
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        mean, var = flat.mean(1), ((flat - flat.mean(1, keepdim=True)) ** 2).mean(1)
        expected += (10.0 if i == 0 else 1.0) * (float((mean - mod.running_mean).norm())
                                                 + float((var - mod.running_var).norm()))
    assert float(bn.pop()) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("curriculum, it, expected", [
    ("off", 0, 0.08), ("off", 50, 0.08),
    ("cosine", 0, 1.0), ("cosine", 25, 0.08 + 0.92 * 0.5), ("cosine", 50, 0.08), ("cosine", 99, 0.08),
    ("linear", 0, 1.0), ("linear", 10, 1.0 - 0.92 * 0.2), ("linear", 50, 0.08),
    ("step", 0, 1.0), ("step", 49, 1.0), ("step", 50, 0.08)])
def test_cda_schedule(curriculum, it, expected):
    from guard_fast.distill.recover import RecoverConfig, crop_lower_bound

    cfg = load_config(RecoverConfig, None, ["--model.checkpoint=x", f"--curriculum={curriculum}", "--milestone=0.5"])
    assert crop_lower_bound(it, 100, cfg) == pytest.approx(expected)


def test_cda_takes_effect(digits_dir, teacher, recovered, tmp_path):
    """With the curriculum on, the images differ from the curriculum-off run (the reference's default no-op)."""
    from guard_fast.data.synthetic import load_synthetic

    out = tmp_path / "cda"
    recover(digits_dir, teacher, out, "--curriculum=cosine", "--milestone=1.0")
    a, b = load_synthetic(out), load_synthetic(recovered)
    assert a.content_hash != b.content_hash
    assert (a.pixels.float() - b.pixels.float()).abs().mean() > 1


def test_recovered_set_layout(recovered):
    import torchvision

    from guard_fast.data.synthetic import load_synthetic

    s = load_synthetic(recovered, num_classes=10)
    assert s.pixels.shape == (20, 3, 16, 16) and s.pixels.dtype == torch.uint8
    assert torch.bincount(s.labels, minlength=10).tolist() == [2] * 10
    ds = torchvision.datasets.ImageFolder(recovered / "images")
    assert len(ds) == 20 and ds.classes == [str(c) for c in range(10)]  # the real data's class names
    # lossless: the PNGs hold the chunks' float images rounded to 8 bits
    chunk = torch.load(recovered / "chunks/chunk00000.pt", weights_only=True)
    assert chunk["images"].min() >= 0 and chunk["images"].max() <= 1
    c, k = chunk["items"][0]
    idx = s.manifest["items"].index(next(it for it in s.manifest["items"] if (it["label"], it["ipc_index"]) == (c, k)))
    assert torch.equal(s.pixels[idx], (chunk["images"][0] * 255).round().to(torch.uint8))
    assert (recovered / "grid.png").stat().st_size > 0


@pytest.mark.multirank
@pytest.mark.subprocess
def test_two_ranks_recover_same_images_disjoint_work(digits_dir, teacher, recovered, tmp_path):
    from guard_fast.data.synthetic import load_synthetic

    out = tmp_path / "two"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571",
           str(REPO / "launchers/recover.py"), *recover_args(digits_dir, teacher, out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = {}
    for path in sorted((out / "chunks").glob("chunk*.pt")):
        chunk = torch.load(path, weights_only=True)
        ranks.setdefault(chunk["rank"], set()).update(map(tuple, chunk["items"]))
    assert set(ranks) == {0, 1} and not ranks[0] & ranks[1]
    assert ranks[0] | ranks[1] == {(c, k) for c in range(10) for k in range(2)}
    one, two = load_synthetic(recovered), load_synthetic(out)
    assert one.manifest["items"] == two.manifest["items"]
    assert (one.pixels.int() - two.pixels.int()).abs().max() <= 1  # same seeds; at most 8-bit rounding differs


def test_recover_resume_equals_uninterrupted(digits_dir, teacher, recovered, tmp_path):
    out = tmp_path / "cut"
    assert recover(digits_dir, teacher, out, "--stop_after=1") == {"stopped_after_chunks": 1}
    assert not (out / "manifest.json").exists() and len(list((out / "chunks").glob("*.pt"))) == 1
    before = (out / "chunks/chunk00000.pt").stat().st_mtime_ns
    recover(digits_dir, teacher, out)
    assert (out / "chunks/chunk00000.pt").stat().st_mtime_ns == before  # the finished chunk was skipped
    from guard_fast.data.synthetic import load_synthetic

    assert load_synthetic(out).content_hash == load_synthetic(recovered).content_hash


# ---------------------------------------------------------------------------------------------------------------
# Relabel and student


def test_plan_is_deterministic_and_replays(digits_dir, teacher, recovered, relabeled):
    """Stored plan == recomputed plan; the teacher's logits on a replayed view == the stored fp16 logits."""
    from guard_fast.data.presets import DATASETS
    from guard_fast.data.soft_labels import StoredLabels
    from guard_fast.data.synthetic import load_synthetic
    from guard_fast.data.views import ViewConfig, plan_epoch, render
    from guard_fast.models import build_model

    images = load_synthetic(recovered)
    views = ViewConfig(batch_size=10)
    stored = StoredLabels(relabeled, images, views, epochs=3)
    spec = DATASETS["digits"]
    model = build_model("resnet18-cifar", 10, spec.mean, spec.std, 4, str(teacher)).eval()
    for e in range(3):
        plan, logits = stored.epoch(e)
        fresh = plan_epoch(20, 16, views, e)
        for name in ("order", "boxes", "flips", "partners", "cuts"):
            assert torch.equal(getattr(plan, name).long(), getattr(fresh, name).long()), name
        assert logits.shape == (20, 10)
        with torch.no_grad():
            again = model(render(images.pixels, plan, range(10, 20), 16))
        torch.testing.assert_close(again, logits[10:20], rtol=2e-3, atol=2e-3)
    assert sorted(plan.order.tolist()) == list(range(20))  # every image once per epoch
    cut_batches = int((plan.cuts[:, 2] > 0).sum())
    assert cut_batches >= 1  # CutMix active (alpha 1: a zero-area box has probability ~0)


def test_views_in_range_and_cutmix_pastes_partner(recovered):
    from guard_fast.data.synthetic import load_synthetic
    from guard_fast.data.views import ViewConfig, plan_epoch, render

    images = load_synthetic(recovered)
    plan = plan_epoch(20, 16, ViewConfig(batch_size=10, cutmix_alpha=1.0), 0)
    x = render(images.pixels, plan, range(0, 10), 16)
    assert x.shape == (10, 3, 16, 16) and x.min() >= 0 and x.max() <= 1
    no_mix = plan_epoch(20, 16, ViewConfig(batch_size=10, cutmix_alpha=0.0), 0)
    assert (no_mix.cuts == 0).all()


def test_relabel_topk_and_bytes(digits_dir, teacher, recovered, relabeled, tmp_path):
    from guard_fast.data.soft_labels import StoredLabels
    from guard_fast.data.synthetic import load_synthetic
    from guard_fast.data.views import ViewConfig

    out = tmp_path / "top3"
    result = relabel(digits_dir, teacher, recovered, out, "--topk=3")
    full = json.loads((relabeled / "labels.json").read_text())
    assert result["bytes"] == sum(p.stat().st_size for p in (out / "labels").glob("*.pt")) > 0
    assert full["bytes"] > 0 and json.loads((out / "labels.json").read_text())["topk"] == 3
    images = load_synthetic(recovered)
    _, top = StoredLabels(out, images, ViewConfig(batch_size=10), 3).epoch(1)
    _, all_ = StoredLabels(relabeled, images, ViewConfig(batch_size=10), 3).epoch(1)
    assert (torch.isfinite(top).sum(1) == 3).all()
    kept = torch.isfinite(top)
    assert torch.equal(top[kept], all_[kept])
    assert torch.equal(kept, all_ >= all_.topk(3, dim=1).values[:, -1:])


def test_relabel_resume_equals_uninterrupted(digits_dir, teacher, recovered, relabeled, tmp_path):
    out = tmp_path / "cut"
    assert relabel(digits_dir, teacher, recovered, out, "--stop_after=1") == {"stopped_after_epochs": 1}
    relabel(digits_dir, teacher, recovered, out)
    for e in range(3):
        a = torch.load(out / f"labels/epoch_{e:05d}.pt", weights_only=True)
        b = torch.load(relabeled / f"labels/epoch_{e:05d}.pt", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


def test_stored_and_online_give_same_first_loss(digits_dir, teacher, recovered, relabeled, tmp_path):
    train(digits_dir, recovered, tmp_path / "stored", f"--labels={relabeled}", "--stop_after=1")
    train(digits_dir, recovered, tmp_path / "online", "--soft_labels=online", "--teacher.width=4",
          f"--teacher.checkpoint={teacher}", "--stop_after=1")
    stored, online = metric(tmp_path / "stored", "loss"), metric(tmp_path / "online", "loss")
    assert len(stored) == len(online) == 1 and stored[0] > 0
    assert stored[0] == pytest.approx(online[0], rel=2e-3)  # fp16 storage of the logits


def test_kd_loss_formula():
    from guard_fast.student.kd import kd_loss

    s, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    p = torch.softmax(t / 20, 1)
    expected = (p * (p.log() - torch.log_softmax(s / 20, 1))).sum(1).mean()
    assert float(kd_loss(s, t, 20.0)) == pytest.approx(float(expected), rel=1e-6)
    t[:, 3:] = float("-inf")  # top-k storage: classes outside the top-k get probability 0
    assert math.isfinite(float(kd_loss(s, t, 20.0)))


def test_train_resume_equals_uninterrupted(digits_dir, recovered, relabeled, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    result = train(digits_dir, recovered, full, f"--labels={relabeled}", "--output.ckpt_every=1")
    assert result["steps"] == 6 and 0 <= result["val"]["clean"] <= 1
    train(digits_dir, recovered, cut, f"--labels={relabeled}", "--output.ckpt_every=1", "--stop_after=3")
    assert not (cut / "student.pt").exists()
    train(digits_dir, recovered, cut, f"--labels={relabeled}", "--output.ckpt_every=1", "--resume")
    a = torch.load(full / "student.pt", weights_only=True)
    b = torch.load(cut / "student.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metric(cut, "loss")[-3:] == metric(full, "loss")[-3:]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "launchers.cli", *args], capture_output=True, text=True,
                          env=subprocess_env(), cwd=REPO, timeout=300)


def one_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1, r.stderr[-2000:]
    return lines[0]


@pytest.mark.subprocess
def test_bad_input_errors(digits_dir, teacher, recovered, relabeled, tmp_path):
    base = recover_args(digits_dir, teacher, tmp_path / "r")
    assert "checkpoint not found" in one_error(cli("recover", *base, f"--model.checkpoint={tmp_path}/none.pt"))
    assert "does not match the model" in one_error(cli("recover", *base, "--data.num_classes=5"))
    assert "model.checkpoint" in one_error(cli("relabel", *data_args(digits_dir), f"--images={recovered}"))
    # soft labels made for another image set (a recovery with another seed)
    other = tmp_path / "other"
    recover(digits_dir, teacher, other, "--dist.seed=1")
    err = one_error(cli("train", *data_args(digits_dir), "--model.width=4", f"--images={other}",
                        f"--labels={relabeled}", "--views.batch_size=10", "--optim.epochs=1"))
    assert "different image set" in err
    # class count of the image set vs the data
    err = one_error(cli("train", *data_args(digits_dir), f"--images={recovered}", "--data.dataset=imagefolder",
                        "--data.num_classes=7", f"--labels={relabeled}"))
    assert "10 classes" in err and "7" in err
    # truncated soft-label file
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(relabeled, broken)
    f = broken / "labels/epoch_00000.pt"
    f.write_bytes(f.read_bytes()[:200])
    err = one_error(cli("train", *data_args(digits_dir), "--model.width=4", f"--images={recovered}",
                        f"--labels={broken}", "--views.batch_size=10", "--optim.epochs=1", "--output.dir="
                        + str(tmp_path / "t")))
    assert "epoch_00000.pt" in err and "unreadable" in err
    # IPC in the manifest inconsistent with the images on disk
    bad = tmp_path / "badipc"
    shutil.copytree(recovered, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["ipc"] = 3
    (bad / "manifest.json").write_text(json.dumps(manifest))
    err = one_error(cli("relabel", *data_args(digits_dir), *TEACHER, f"--model.checkpoint={teacher}",
                        f"--images={bad}", f"--output.dir={tmp_path / 'rl'}"))
    assert "expected ipc = 3" in err


@pytest.mark.multirank
@pytest.mark.subprocess
def test_two_rank_student_training(digits_dir, recovered, relabeled, tmp_path):
    """torchrun, 2 gloo ranks: each rank trains on its half of every global batch; the run completes and saves."""
    out = tmp_path / "two"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29572",
           str(REPO / "launchers/train.py"), *data_args(digits_dir), "--model.width=4", f"--images={recovered}",
           f"--labels={relabeled}", f"--output.dir={out}", "--views.batch_size=10", "--optim.epochs=3",
           "--output.log_every=1", "--val_batches=1", "--dist.zero_stage=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 6 and len(metric(out, "loss")) == 6
    assert all(math.isfinite(v) for v in metric(out, "loss"))
    assert torch.load(out / "student.pt", weights_only=True).keys()
