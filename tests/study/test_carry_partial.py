"""The study's carry of unfinished jobs (guard_fast/study/carry_partial.py): what a resume needs is copied, nothing
else; a new checkout resumes an interrupted study where it stopped and gets the uninterrupted run's numbers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bench.study_runner import tiny_study
from guard_fast.study import carry_partial as partial
from tests.conftest import PYTHON, REPO, subprocess_env

KEY = {"fingerprint": "abc", "methods": ["sre2l"], "ipc": [1]}


def write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def job_folder(root: Path) -> Path:
    """A job with a finished stage (its checkpoints are not needed) and an unfinished one at checkpoint step2."""
    job = root / "seed0/base"
    write(job, {
        "config.json": b"{}",
        "teachers/none/stage.key": b'{"key": "k1"}', "teachers/none/stage.json": b'{"key": "k1"}',
        "teachers/none/teacher.pt": b"w" * 100, "teachers/none/.lock": b"",
        "teachers/none/checkpoints/latest.json": b'{"tag": "step1"}',
        "teachers/none/checkpoints/step1/rank0.pt": b"c" * 50,
        "sre2l/ipc1/recover/stage.key": b'{"key": "k2"}', "sre2l/ipc1/recover/state.pt": b"s" * 30,
        "sre2l/ipc1/recover/.state.pt.abc.tmp": b"partial write",
        "sre2l/ipc1/recover/checkpoints/latest.json": b'{"tag": "step2"}',
        "sre2l/ipc1/recover/checkpoints/step1/rank0.pt": b"old",
        "sre2l/ipc1/recover/checkpoints/step2/rank0.pt": b"new", "sre2l/ipc1/recover/checkpoints/step2/complete.json":
        b"{}", "sre2l/ipc1/recover/checkpoints/step3/rank0.pt": b"being written",
    })
    return job


def test_only_what_a_resume_needs_is_carried_and_record_files_come_last(tmp_path):
    job = job_folder(tmp_path / "runs")
    got = [str(p) for p in partial.wanted_files(job)]
    assert sorted(got) == sorted([
        "config.json", "teachers/none/stage.key", "teachers/none/stage.json", "teachers/none/teacher.pt",
        "sre2l/ipc1/recover/stage.key", "sre2l/ipc1/recover/state.pt",
        "sre2l/ipc1/recover/checkpoints/latest.json", "sre2l/ipc1/recover/checkpoints/step2/rank0.pt",
        "sre2l/ipc1/recover/checkpoints/step2/complete.json"])
    # a stage record and latest.json vouch for files: they are copied after every file they could name
    assert {Path(g).name for g in got[-2:]} == {"stage.json", "latest.json"}


def test_save_is_incremental_drops_stale_files_and_respects_the_size_cap(tmp_path):
    runs, carry = tmp_path / "runs", tmp_path / "carry"
    job = job_folder(runs)
    size = partial.save(runs, carry, "seed0/base", KEY, max_mb=1)
    dst = carry / "partial/seed0/base"
    assert size == sum((job / p).stat().st_size for p in partial.wanted_files(job))
    assert json.loads((dst / "partial.json").read_text()) == {"key": KEY, "bytes": size}
    assert (dst / "teachers/none/teacher.pt").read_bytes() == b"w" * 100
    inode = (dst / "teachers/none/teacher.pt").stat().st_ino
    # the run goes on: a new checkpoint, the old one pruned; an unchanged file is not copied again
    write(job, {"sre2l/ipc1/recover/checkpoints/step3/complete.json": b"{}",
                "sre2l/ipc1/recover/checkpoints/latest.json": b'{"tag": "step3"}'})
    shutil.rmtree(job / "sre2l/ipc1/recover/checkpoints/step1")
    partial.save(runs, carry, "seed0/base", KEY, max_mb=1)
    assert (dst / "teachers/none/teacher.pt").stat().st_ino == inode
    assert sorted(p.name for p in (dst / "sre2l/ipc1/recover/checkpoints").iterdir()) == ["latest.json", "step3"]
    # over the cap: nothing is written (the older copy stays as it was)
    assert partial.save(runs, tmp_path / "other", "seed0/base", KEY, max_mb=1e-5) is None
    assert not (tmp_path / "other").exists()
    assert partial.save(runs, carry, "seed1/base", KEY, max_mb=1) is None  # not started: nothing to carry


def test_restore_needs_the_same_job_and_no_local_folder(tmp_path):
    runs, carry = tmp_path / "runs", tmp_path / "carry"
    job_folder(runs)
    partial.save(runs, carry, "seed0/base", KEY, max_mb=1)
    assert not partial.restore(runs, carry, "seed0/base", KEY)  # a local folder: its own stage cache decides
    fresh = tmp_path / "fresh"
    assert not partial.restore(fresh, carry, "seed0/base", {**KEY, "fingerprint": "changed"})
    assert not (fresh / "seed0/base").exists()
    assert partial.restore(fresh, carry, "seed0/base", KEY)
    assert sorted(partial.wanted_files(fresh / "seed0/base")) == sorted(partial.wanted_files(runs / "seed0/base"))
    assert not (fresh / "seed0/base/partial.json").exists()
    partial.drop(carry, "seed0/base")
    assert not (carry / "partial/seed0/base").exists()


def test_the_saver_carries_running_jobs_until_they_finish(tmp_path):
    runs, carry = tmp_path / "runs", tmp_path / "carry"
    job_folder(runs)
    with partial.Saver(runs, carry, {"seed0/base": KEY}, every_s=0.05, max_mb=1) as saver:
        deadline = time.time() + 10
        while not (carry / "partial/seed0/base/partial.json").is_file() and time.time() < deadline:
            time.sleep(0.02)
        assert (carry / "partial/seed0/base/partial.json").is_file()  # the thread alone made it
        saver.finished("seed0/base")
        assert not (carry / "partial/seed0/base").exists()
    assert not (carry / "partial/seed0/base").exists()  # the last save on exit skips a finished job


@pytest.mark.subprocess
def test_an_interrupted_study_resumes_in_a_new_checkout_with_the_uninterrupted_numbers(digits_subset, tmp_path):
    """Study A runs through (one process). Study B (two workers) is interrupted (SIGINT) once its first job's
    recover stage has finished, its runs_dir deleted (a new checkout), and rerun: its first job comes back from the
    partial carry, its finished stages are not run again, and its cells equal A's."""
    data = digits_subset(8, 4)

    def args(name: str, workers: int = 2) -> list[str]:
        return [*tiny_study(data, tmp_path / name / "runs", tmp_path / name / "res", seeds=2),
                "--pipeline.dist.cpu_threads=1", "--pipeline.train.optim.epochs=2", "--pipeline.recover.iterations=3",
                f"--workers={workers}", "--carry_every_s=0.2"]

    def study(a: list[str]) -> subprocess.CompletedProcess:
        r = subprocess.run([PYTHON, str(REPO / "launchers/study.py"), *a], capture_output=True, text=True,
                           env=subprocess_env(), cwd=REPO, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
        return r

    study(args("a", workers=1))
    want = json.loads((tmp_path / "a/res/results.json").read_text())["cells"]

    # SIGINT at its default in the study: a suite started in the background by a shell without job control (nohup
    # ... &, some CI runners) inherits SIGINT ignored, and Python keeps an inherited ignore, so the study would run on
    proc = subprocess.Popen([PYTHON, str(REPO / "launchers/study.py"), *args("b")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=subprocess_env(), cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    runs = tmp_path / "b/runs"
    deadline = time.time() + 600
    while not list(runs.glob("seed0/*/**/recover/stage.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the study finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-2000:]
    kept = tmp_path / "b/res/carry/partial"
    records = list(kept.glob("seed0/*/partial.json"))
    assert records, out[-3000:]
    job = records[0].parent
    assert list(job.glob("**/recover/stage.json")) and list(job.glob("**/*.pt"))  # finished stages with weights
    # the workers were stopped (SIGTERM) before the last copy: each stage they were running kept its time so far
    running = [k.parent for k in kept.glob("seed*/*/**/stage.key") if not (k.parent / "stage.json").exists()]
    assert all((f / "stage.prior").is_file() for f in running), running
    shutil.rmtree(runs)  # a new checkout: runs_dir is never committed

    r = study(args("b"))
    name = str(job.relative_to(kept))
    assert "unfinished job(s) restored" in r.stdout and name in r.stdout, r.stdout[-3000:]
    assert "recover: cached" in r.stdout or "recover-" in r.stdout, r.stdout[-3000:]
    assert json.loads((tmp_path / "b/res/results.json").read_text())["cells"] == want and want
    assert not list(kept.rglob("partial.json"))  # every job finished: no partial copy is left
