"""The SRe2L chain at toy size (16 px digits, width-4 ResNet-18s), called by the shared fixtures in conftest.py and by
tests that run a stage with other settings."""

from __future__ import annotations

import json
from pathlib import Path

from guard_fast.runtime.config import load_config
from tests.conftest import ONE

TEACHER = ["--model.width=4"]


def data_args(root: Path) -> list[str]:
    return [f"--data.path={root}", "--data.image_size=16", "--data.workers=0", "--data.eval_batch_size=128",
            "--output.progress=false"]


def recover_args(root: Path, teacher: Path, out: Path) -> list[str]:
    return [*data_args(root), *TEACHER, f"--model.checkpoint={teacher}", f"--output.dir={out}", "--ipc=2",
            "--iterations=12", "--batch_size=8", "--jitter=2", "--lr=0.1", "--r_bn=0.05"]


def recover(digits_dir, teacher, out, *extra):
    from guard_fast.distill.recover import RecoverConfig, run_recover

    return run_recover(load_config(RecoverConfig, None, [*recover_args(digits_dir, teacher, out), *extra]), ONE)


def relabel(digits_dir, teacher, images, out, *extra):
    from guard_fast.distill.relabel import RelabelConfig, run_relabel

    args = [*data_args(digits_dir), *TEACHER, f"--model.checkpoint={teacher}", f"--images={images}",
            f"--output.dir={out}", "--epochs=3", "--views.batch_size=10", *extra]
    return run_relabel(load_config(RelabelConfig, None, args), ONE)


def train(digits_dir, images, out, *extra):
    from guard_fast.student.kd import TrainConfig, run_train

    args = [*data_args(digits_dir), "--model.width=4", f"--images={images}", f"--output.dir={out}",
            "--views.batch_size=10", "--optim.epochs=3", "--output.log_every=1", "--val_batches=1", *extra]
    return run_train(load_config(TrainConfig, None, args), ONE)


def metric(run: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]
