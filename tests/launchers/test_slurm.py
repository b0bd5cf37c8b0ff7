"""The SLURM templates (launchers/slurm): every template's command parses with its stage's config, passes --resume
where the stage has it and asks for the pre-timeout signal and requeue; the shared torchrun.sh, run under a fake
srun/scontrol, turns the batch shell's USR1 into a checkpoint on every rank and a requeue."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guard_fast.runtime.config import load_config
from tests.conftest import REPO, subprocess_env

SLURM = REPO / "launchers/slurm"


def stage_configs() -> dict[str, type]:
    from guard_fast.distill.recover import RecoverConfig
    from guard_fast.distill.relabel import RelabelConfig
    from guard_fast.pipeline import PipelineConfig
    from guard_fast.robustness.evaluate import EvaluateConfig
    from guard_fast.squeeze.stage import SqueezeConfig
    from guard_fast.student.kd import TrainConfig

    return {"squeeze": SqueezeConfig, "pipeline": PipelineConfig, "recover": RecoverConfig,
            "relabel": RelabelConfig, "train": TrainConfig, "evaluate": EvaluateConfig}


def run_stage_line(path: Path) -> list[str]:
    text = path.read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.startswith("run_stage ")]
    return [a for a in shlex.split(line)[1:] if a != "$@"]


@pytest.mark.parametrize("path", sorted(SLURM.glob("*.sbatch")), ids=lambda p: p.name)
def test_template_command_is_a_valid_stage_config(path):
    command, *args = run_stage_line(path)
    cls = stage_configs()[command]
    config = None
    if "--config" in args:
        i = args.index("--config")
        config, args = REPO / args[i + 1], args[:i] + args[i + 2:]
    cfg = load_config(cls, config, args)  # raises ConfigError naming a wrong key
    has_resume = "resume" in {f.name for f in dataclasses.fields(cls)}
    assert cfg.resume if has_resume else "--resume" not in args
    text = path.read_text()
    assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text
    assert "source launchers/slurm/torchrun.sh" in text


def test_every_stage_with_a_resume_key_has_a_template():
    covered = {run_stage_line(p)[0] for p in SLURM.glob("*.sbatch")}
    assert {"squeeze", "train", "pipeline"} <= covered


FAKE_SRUN = """#!/usr/bin/env bash
# srun [--opt value | --opt=value]... command: run the command here (one node)
while [[ $1 == --* ]]; do if [[ $1 == *=* ]]; then shift; else shift 2; fi; done
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case $1 in show) echo 127.0.0.1 ;; requeue) echo "requeue $2" >> "$FAKE_LOG" ;; esac
"""


@pytest.mark.subprocess
@pytest.mark.multirank
def test_usr1_to_the_batch_shell_checkpoints_every_rank_and_requeues(digits_subset, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    run = tmp_path / "run"
    args = ["--config", "configs/digits/squeeze.toml", f"--data.path={digits_subset(8, 2)}", "--model.width=4",
            "--data.image_size=16", "--data.batch_size=8", "--data.workers=0", "--optim.epochs=6",
            "--output.log_every=1", "--output.progress=false", "--val_batches=1", "--dist.cpu_threads=1",
            f"--output.dir={run}", "--resume"]
    script = tmp_path / "job.sbatch"
    script.write_text("source launchers/slurm/torchrun.sh\nrun_stage squeeze " + shlex.join(args) + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**subprocess_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(REPO),
           "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": "77", "PROCS_PER_NODE": "2",
           "RDZV_PORT": str(port), "VENV": str(Path(sys.executable).parent), "FAKE_LOG": str(tmp_path / "calls")}
    log = tmp_path / "job.log"
    job = subprocess.Popen(["bash", str(script)], env=env, cwd=REPO, stdout=open(log, "w"),  # sbatch: submit dir
                           stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").is_file() or len((run / "metrics.jsonl").read_text().splitlines()) < 2:
        assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # SLURM's --signal=B:USR1@180
    assert job.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert (tmp_path / "calls").read_text() == "requeue 77\n"
    latest = json.loads((run / "checkpoints/latest.json").read_text())
    stops = [ln for ln in log.read_text().splitlines() if "stopped by SIGTERM" in ln]
    assert len(stops) == 2 and all(f"after step {latest['step']}: checkpoint {latest['tag']}" in ln for ln in stops)
    assert latest["world_size"] == 2 and not (run / "teacher.pt").exists()
