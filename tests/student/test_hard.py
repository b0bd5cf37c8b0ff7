"""Hard-label training on a distilled set (DC's evaluation protocol): schedule, decay groups, resume, rank parity."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from guard_fast.runtime.config import load_config
from guard_fast.runtime.engine import OptimConfig, build_optimizer, build_scheduler
from tests.conftest import ONE, PYTHON, REPO, subprocess_env


@pytest.fixture(scope="module")
def synset(tmp_path_factory) -> Path:
    """10 classes x 3 random 16 px images in the synthetic-set format."""
    from guard_fast.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("synset")
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (30, 3, 16, 16), generator=g, dtype=torch.uint8)
    items = [{"label": c, "ipc_index": k} for c in range(10) for k in range(3)]
    write_synthetic(root, pixels, items, [str(c) for c in range(10)], {"ipc": 3, "image_size": 16})
    return root


def args(digits_dir: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return [f"--data.path={digits_dir}", "--data.image_size=16", "--data.workers=0", "--data.eval_batch_size=128",
            "--output.progress=false", "--model.width=4", f"--images={images}", f"--output.dir={out}",
            "--batch_size=8", "--optim.epochs=2", "--augment=dsa", "--val_batches=1", "--output.log_every=1", *extra]


def train(digits_dir, images, out, *extra):
    from guard_fast.student.hard import HardTrainConfig, run_train_hard

    return run_train_hard(load_config(HardTrainConfig, None, args(digits_dir, images, out, *extra)), ONE)


def test_step_schedule_is_dcs():
    """lr for epochs 0..E//2+1, then 0.1 lr (E = 6: epochs 0-4 at lr, 5 at 0.1 lr); 2 steps per epoch."""
    model = torch.nn.Linear(2, 2)
    cfg = OptimConfig(lr=0.5, epochs=6, schedule="step")
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=2)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.5] * 10 + [0.05] * 2


def test_weight_decay_on_all_includes_biases():
    model = torch.nn.Linear(2, 2)
    cfg = OptimConfig(weight_decay=5e-4, weight_decay_on="all")
    groups = build_optimizer(model, cfg).param_groups
    assert len(groups) == 1 and len(groups[0]["params"]) == 2 and groups[0]["weight_decay"] == 5e-4
    default = build_optimizer(model, OptimConfig(weight_decay=5e-4)).param_groups
    assert len(default[0]["params"]) == 1  # only the weight matrix: today's behaviour


def test_resume_equals_uninterrupted(digits_dir, synset, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    result = train(digits_dir, synset, full, "--output.ckpt_every=1")
    assert result["steps"] == 8 and 0 <= result["val"]["clean"] <= 1  # 30 images / batch 8 = 4 steps x 2 epochs
    assert train(digits_dir, synset, cut, "--output.ckpt_every=1", "--stop_after=5") == {"stopped_at": 5}
    train(digits_dir, synset, cut, "--output.ckpt_every=1", "--resume")
    a = torch.load(full / "student.pt", weights_only=True)
    b = torch.load(cut / "student.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_chunked_passes_train_the_same_network(digits_dir, synset, tmp_path):
    """chunk = 3 splits each 8-image batch into 3 + 3 + 2 passes (the last batch 6: 3 + 3): same weights as one pass
    to float rounding, also under ZeRO 1."""
    train(digits_dir, synset, tmp_path / "one", "--augment=none")
    assert train(digits_dir, synset, tmp_path / "chunked", "--augment=none", "--chunk=3")["steps"] == 8
    train(digits_dir, synset, tmp_path / "short", "--augment=none", "--optim.epochs=1")
    a, b, c = (torch.load(tmp_path / d / "student.pt", weights_only=True) for d in ("one", "chunked", "short"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)
    assert not all(torch.allclose(a[k], c[k], atol=1e-5, rtol=0) for k in a)  # the tolerance tells steps apart
    train(digits_dir, synset, tmp_path / "z1", "--augment=none", "--chunk=3", "--dist.zero_stage=1")
    z = torch.load(tmp_path / "z1" / "student.pt", weights_only=True)
    assert all(torch.allclose(a[k], z[k], atol=1e-5, rtol=0) for k in a)


@pytest.mark.multirank
@pytest.mark.subprocess
def test_two_ranks_train_the_same_network(digits_dir, synset, tmp_path):
    """torchrun, 2 gloo ranks (uneven slices: the last batch has 6 images -> 3 + 3, batch 8 -> 4 + 4): same weights
    as 1 process to float32 summation-order tolerance (atol 1e-5 after 8 SGD steps); the ranks run their slices in
    passes of 2 (chunk), the one process in one pass."""
    one = tmp_path / "one"
    train(digits_dir, synset, one, "--batch_size=7")  # 30 = 4 x 7 + 2: slices 4 + 3 and 1 + 1
    two = tmp_path / "two"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29581",
           str(REPO / "launchers/train_hard.py"), *args(digits_dir, synset, two, "--batch_size=7", "--chunk=2")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((two / "result.json").read_text())["steps"] == 10
    a = torch.load(one / "student.pt", weights_only=True)
    b = torch.load(two / "student.pt", weights_only=True)
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)
    assert any(not torch.equal(a[k], b[k].new_zeros(b[k].shape)) for k in a)


@pytest.mark.subprocess
def test_bad_augment_and_size_are_one_line_errors(digits_dir, synset, tmp_path):
    base = [PYTHON, "-m", "launchers.cli", "train-hard", *args(digits_dir, synset, tmp_path / "x")]
    for extra, words in ((["--augment=mixup"], "valid values are none, dsa"), (["--data.image_size=32"], "16 px")):
        r = subprocess.run([*base, *extra], capture_output=True, text=True, env=subprocess_env(), cwd=REPO,
                           timeout=300)
        lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
        assert r.returncode != 0 and "Traceback" not in r.stderr and len(lines) == 1 and words in lines[0], r.stderr
