"""The paper presets end to end at toy size on ImageNet-shaped data, under 2 ranks (torchrun, gloo).

Data: a 10-class ImageFolder of 224 px JPEGs (random crops of scikit-learn's two sample photographs), converted with
`guard-fast data to-ffcv`. The presets run unchanged except for sizes and counts: data path, batch sizes, loader
workers, model width, epochs, recover iterations, IPC, view batch, evaluation subset, attack steps/queries, output
folder. Everything else is the preset's: resnet18 (7x7 stride-2 ImageNet stem) at 224 px, ffcv backend, ZeRO-1,
bf16 (CPU autocast; fast enough at width 4), channels_last, SGD/AdamW settings, GUARD's h and beta.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import PYTHON, REPO, subprocess_env

pytestmark = pytest.mark.slow

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SIZE = 10, 4, 2, 224
ATTACKS_TOY = ["--evaluate.num_images=10", "--evaluate.attack.pgd_steps=2", "--evaluate.attack.square_queries=5",
               "--evaluate.attack.aa_steps=2", "--evaluate.attack.aa_square_queries=5",
               "--evaluate.attack.cw_steps=2", "--evaluate.attack.mim_steps=2"]


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def _torchrun(script: str, *args: str) -> subprocess.CompletedProcess:
    return _run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / script), *args])


@pytest.fixture(scope="module")
def imagenet_shaped(tmp_path_factory) -> Path:
    """root/{train,val}.beton (JPEG mode) from a 10-class ImageFolder of 224 px JPEG crops, via the CLI."""
    from bench.toy_imagenet import make_imagenet_folder

    root = tmp_path_factory.mktemp("imagenet_shaped")
    make_imagenet_folder(root / "folders", CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SIZE)
    for split in ("train", "val"):
        _run([PYTHON, "-m", "launchers.cli", "data", "to-ffcv", "--src", str(root / "folders" / split),
              "--out", str(root / f"{split}.beton"), "--mode", "jpg", "--workers", "1"])
    return root


def _resolved(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _assert_preset_path(cfg: dict, dataset: str) -> None:
    """The settings the toy run must not have overridden."""
    assert cfg["data"]["dataset"] == dataset and cfg["data"]["backend"] == "ffcv"
    assert cfg["dist"]["precision"] == "bf16" and cfg["dist"]["zero_stage"] == 1
    assert cfg["model"]["arch"] == "resnet18" and cfg["model"]["channels_last"] is True


@pytest.mark.multirank
@pytest.mark.subprocess
def test_pipeline_imagenette_preset_runs_end_to_end(imagenet_shaped, tmp_path):
    out = tmp_path / "pipeline"
    _torchrun("launchers/pipeline.py", "--config", str(REPO / "configs/imagenette/pipeline.toml"),
              f"--data.path={imagenet_shaped}", "--data.batch_size=4", "--data.eval_batch_size=10",
              "--data.workers=1", f"--output.dir={out}", "--output.progress=false", "--output.log_every=1", "--ipc=1",
              "--squeeze.model.width=4", "--squeeze.optim.epochs=1", "--squeeze.val_batches=1",
              "--recover.iterations=3", "--recover.batch_size=10",
              "--train.model.width=4", "--train.optim.epochs=2", "--train.views.batch_size=10",
              "--train.render_workers=0", "--train.val_batches=1", *ATTACKS_TOY)
    results = json.loads((out / "results.json").read_text())
    assert {r["label"] for r in results["rows"]} == {"GUARD IPC 1", "SRe2L IPC 1"}
    for r in results["rows"]:
        assert 0 <= r["pgd100"] <= r["clean"] <= 1
    assert len(results["stages"]) == 10  # 2 teachers + 2 x (recover, relabel, train, evaluate)
    teacher_dir = out / "teachers" / "guard"
    _assert_preset_path(_resolved(teacher_dir), "imagenette")
    teacher = torch.load(teacher_dir / "teacher.pt", weights_only=True)
    assert teacher["body.conv1.weight"].shape == (4, 3, 7, 7)  # the ImageNet stem, not the 3x3 CIFAR one
    assert teacher["body.fc.weight"].shape[0] == CLASSES
    assert all(torch.isfinite(v.float()).all() for v in teacher.values())
    guard_steps = [json.loads(ln) for ln in (teacher_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("reg", 0) > 0 for m in guard_steps)  # the GUARD regularizer was on
    recovered = sorted((out / "sre2l-teacher-guard/ipc1/recover/images").rglob("*.png"))
    assert len(recovered) == CLASSES
    from PIL import Image

    assert Image.open(recovered[0]).size == (SIZE, SIZE)


@pytest.mark.multirank
@pytest.mark.subprocess
def test_squeeze_imagenet_1k_preset_runs(imagenet_shaped, tmp_path):
    """The ImageNet-1K squeeze preset: 1000-way head over the 10 classes present, GUARD objective, 2 ranks."""
    out = tmp_path / "squeeze"
    _torchrun("launchers/squeeze.py", "--config", str(REPO / "configs/imagenet-1k/squeeze-guard.toml"),
              f"--data.path={imagenet_shaped}", "--data.batch_size=4", "--data.eval_batch_size=10",
              "--data.workers=1", f"--output.dir={out}", "--output.progress=false", "--output.log_every=1",
              "--model.width=4", "--optim.epochs=1", "--val_batches=1")
    cfg = _resolved(out)
    _assert_preset_path(cfg, "imagenet-1k")
    assert cfg["objective"]["name"] == "guard" and cfg["objective"]["beta"] == 1e-4
    teacher = torch.load(out / "teacher.pt", weights_only=True)
    assert teacher["body.fc.weight"].shape == (1000, 32)
    steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    # 40 images / (2 ranks x 4) = 5 steps, every loss finite, the regularizer on
    assert len(steps) == 5 and all(np.isfinite(m["loss"]) and m["reg"] > 0 for m in steps)
