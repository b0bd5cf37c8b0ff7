"""Faults a user meets (issue 13): nothing silently wrong, nothing lost, one line instead of a traceback.

Each test is one fault of the fault table in docs/testing.md; tiny shapes, in-process where possible."""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from guard_fast.runtime.checkpoint import safe_load
from guard_fast.runtime.config import DataConfig, DistConfig, load_config
from guard_fast.runtime.errors import CheckpointError, ConfigError, GuardFastError
from tests.chain import train
from tests.conftest import ONE, REPO, copy_subset

# ---------------------------------------------------------------------------------------------------------------
# Checkpoints (runtime/checkpoint.py) on a tiny engine


def tiny_engine(seed: int = 0):
    from guard_fast.runtime.engine import OptimConfig, build_engine, build_optimizer, build_scheduler

    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optim = OptimConfig(name="adamw", lr=0.1, epochs=2)
    opt = build_optimizer(model, optim)
    return build_engine(model, opt, build_scheduler(opt, optim, 4), DistConfig(), optim, 4, torch.device("cpu"))


def train_step(engine) -> None:
    loss = engine(torch.randn(4, 4)).square().mean()
    engine.backward(loss)
    engine.step()


@pytest.fixture
def saved(tmp_path):
    """A checkpoint folder with complete checkpoints at steps 1 and 2; returns (folder, weights at step 2)."""
    from guard_fast.runtime.checkpoint import Checkpointer

    engine = tiny_engine()
    ckpt = Checkpointer(tmp_path / "checkpoints", engine)
    for step in (1, 2):
        train_step(engine)
        ckpt.save(step, {"epoch": 0})
    return tmp_path / "checkpoints", engine.module.weight.detach().clone()


def fresh_checkpointer(folder: Path):
    from guard_fast.runtime.checkpoint import Checkpointer

    return Checkpointer(folder, tiny_engine(seed=1))


def test_garbled_latest_falls_back_to_newest_complete_checkpoint(saved, capsys):
    folder, weights = saved
    (folder / "latest.json").write_text('{"tag": "step0000')  # cut off by a crash or an editor
    ckpt = fresh_checkpointer(folder)
    step, _ = ckpt.load()
    assert step == 2 and torch.equal(ckpt.engine.module.weight, weights)
    assert "resuming from the newest complete checkpoint step000000002" in capsys.readouterr().err
    for marker in folder.glob("step*/complete.json"):
        marker.unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint to fall back to"):
        fresh_checkpointer(folder).load()


def test_pickle_payload_in_model_states_is_refused_without_running(saved, tmp_path):
    folder, _ = saved
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    torch.save(Payload(), folder / "step000000002" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: refused"):
        fresh_checkpointer(folder).load()
    assert not marker.exists()


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "rank0.pt"])
def test_truncated_checkpoint_file_is_one_line(saved, name):
    folder, _ = saved
    path = folder / "step000000002" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{name}: truncated or corrupt"):
        fresh_checkpointer(folder).load()


def test_disk_full_during_checkpoint_keeps_latest(saved):
    from guard_fast.runtime.checkpoint import Checkpointer

    folder, _ = saved
    engine = tiny_engine()
    ckpt = Checkpointer(folder, engine)

    def full(state_dict, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", path)

    engine.checkpoint_engine.save = full
    with pytest.raises(CheckpointError, match="No space left on device.*still names step000000002"):
        ckpt.save(3, {"epoch": 0})
    assert json.loads((folder / "latest.json").read_text())["tag"] == "step000000002"
    assert not (folder / "step000000003").exists()  # no half-written checkpoint left behind
    assert fresh_checkpointer(folder).load()[0] == 2


# ---------------------------------------------------------------------------------------------------------------
# Run folders (runtime/rundir.py) through the real squeeze stage


@pytest.fixture(scope="module")
def small_digits(digits_subset) -> Path:
    return digits_subset(4, 1)


def squeeze(data: Path, out: Path, *extra: str):
    from guard_fast.squeeze.stage import SqueezeConfig, run_squeeze

    args = [f"--data.path={data}", f"--output.dir={out}", "--model.width=4", "--data.image_size=16",
            "--data.batch_size=8", "--data.workers=0", "--optim.epochs=2", "--output.progress=false",
            "--objective.name=none", "--val_batches=1", "--output.ckpt_every=2", "--output.log_every=1", *extra]
    return run_squeeze(load_config(SqueezeConfig, None, args), ONE)


@pytest.fixture(scope="module")
def squeezed(small_digits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("squeezed") / "run"
    squeeze(small_digits, out)
    return out


def test_fresh_run_into_another_runs_folder_is_refused_and_record_kept(small_digits, squeezed, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(squeezed, out)
    record = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(GuardFastError, match=f"output.dir = {out} holds another squeeze run .config differs in "
                                             "optim.lr.*--resume.*--output.dir.*--output.overwrite=true"):
        squeeze(small_digits, out, "--optim.lr=0.5")
    # case 5: a run that fails its input checks does not touch the record of the run in the folder
    with pytest.raises(GuardFastError, match="not found"):
        squeeze(tmp_path / "no-such-data", out, "--resume", "--allow_config_change=data.path")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == record
    squeeze(small_digits, out, "--optim.lr=0.5", "--output.overwrite=true")
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 0.5
    assert (out / "teacher.pt").read_bytes() != record["teacher.pt"]
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step000000008", "step000000010"]
    assert json.loads((out / "checkpoints/latest.json").read_text())["step"] == 10


def test_skipped_images_are_counted_in_result_and_log(small_digits, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_digits, data)
    victim = sorted((data / "train" / "5").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:30])
    result = squeeze(data, tmp_path / "run", "--data.skip_corrupt=true", "--optim.epochs=1")
    assert result["skipped_images"] == {"train": 1, "val": 0}
    assert json.loads((tmp_path / "run/result.json").read_text())["skipped_images"]["train"] == 1
    assert any(r.get("skipped_images") == {"train": 1, "val": 0}
               for r in map(json.loads, (tmp_path / "run/metrics.jsonl").read_text().splitlines()))


def test_resume_dedupes_metrics_and_cleans_stale_tmp(small_digits, squeezed, tmp_path):
    out = tmp_path / "cut"
    squeeze(small_digits, out, "--stop_after=3")  # checkpoint at step 2, metrics up to step 3: killed after step 3
    (out / ".metrics.jsonl.x1y2.tmp").write_text("half")
    squeeze(small_digits, out, "--resume")
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    full = [r["step"] for r in map(json.loads, (squeezed / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == full  # each step logged once, as in the uninterrupted run
    assert not list(out.glob(".*.tmp"))


def test_output_dir_that_cannot_be_a_folder(small_digits, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(GuardFastError, match="is a file, not a folder"):
        squeeze(small_digits, tmp_path / "file")
    with pytest.raises(GuardFastError, match=f"{tmp_path / 'file'} is a file, not a folder"):
        squeeze(small_digits, tmp_path / "file" / "run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits; the file cases cover root")
def test_output_dir_not_writable(small_digits, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(GuardFastError, match="is not writable"):
        squeeze(small_digits, locked / "run")


# ---------------------------------------------------------------------------------------------------------------
# Student training: non-finite state never reaches a checkpoint or student.pt


def test_diverged_student_writes_nothing_and_names_first_bad_step(digits_dir, recovered, relabeled, tmp_path):  # noqa: F811
    common = [f"--labels={relabeled}", "--optim.lr=1e30", "--output.ckpt_every=1"]
    with pytest.raises(GuardFastError, match=r"non-finite loss at step (\d+)") as every:
        train(digits_dir, recovered, tmp_path / "a", *common)
    with pytest.raises(GuardFastError, match=r"non-finite loss at step (\d+)") as never:
        train(digits_dir, recovered, tmp_path / "b", *common, "--output.log_every=1000")
    first = every.value.args[0].split("step ")[1].split()[0]
    assert never.value.args[0].split("step ")[1].split()[0] == first  # the first bad step, whatever log_every
    assert not (tmp_path / "b" / "student.pt").exists() and not (tmp_path / "b" / "result.json").exists()
    for tag in (tmp_path / "b" / "checkpoints").glob("step*"):
        assert int(tag.name[4:]) <= int(first)  # checkpoint at step k holds the state after steps 0..k-1
        states = safe_load(tag / "mp_rank_00_model_states.pt")["module"]
        assert all(torch.isfinite(v).all() for v in states.values() if v.is_floating_point())


# ---------------------------------------------------------------------------------------------------------------
# Data


@pytest.fixture
def renamed(digits_dir, tmp_path) -> Path:
    root = copy_subset(digits_dir, tmp_path / "data", {"train": 2, "val": 1})
    (root / "val" / "0").rename(root / "val" / "zero")  # same count, shifted labels
    return root


def test_renamed_val_class_folder_is_refused(renamed):
    from guard_fast.data import build_loader

    with pytest.raises(GuardFastError, match=r"val: its classes differ .*label 0 is '1' in val, '0' in train"):
        build_loader(DataConfig(path=str(renamed), workers=0), "val")


def test_beton_records_class_names_and_val_is_compared(renamed, tmp_path):
    from guard_fast.data import build_loader
    from guard_fast.data.ffcv_backend import write_beton

    for split in ("train", "val"):
        write_beton(renamed / split, tmp_path / "b" / f"{split}.beton", workers=1)
    assert json.loads((tmp_path / "b" / "train.beton.classes.json").read_text())["classes"][0] == "0"
    with pytest.raises(GuardFastError, match="its classes differ"):
        build_loader(DataConfig(path=str(tmp_path / "b"), backend="ffcv", workers=1), "val")


def test_truncated_beton_says_truncated(digits_dir, tmp_path):
    from guard_fast.data import build_loader
    from guard_fast.data.ffcv_backend import write_beton

    root = copy_subset(digits_dir, tmp_path / "data", {"val": 2})
    beton = tmp_path / "val.beton"
    write_beton(root / "val", beton, workers=1)
    beton.write_bytes(beton.read_bytes()[:-200])
    with pytest.raises(GuardFastError, match="truncated .beton"):
        build_loader(DataConfig(path=str(tmp_path), backend="ffcv", workers=1), "val")


def test_missing_beton_hints_to_ffcv(tmp_path):
    from guard_fast.data import build_loader

    with pytest.raises(GuardFastError, match="guard-fast data to-ffcv --src"):
        build_loader(DataConfig(path=str(tmp_path), backend="ffcv"), "val")


def test_prepare_digits_repairs_truncated_file(digits_dir, tmp_path, capsys):
    from guard_fast.data.digits import prepare_digits

    root = tmp_path / "digits"
    shutil.copytree(digits_dir, root)
    victim = sorted((root / "val" / "3").iterdir())[0]
    good = victim.read_bytes()
    victim.write_bytes(good[:40])
    (root / "train" / "1" / "stray.png").write_bytes(b"x")
    prepare_digits(root, size=32, val_fraction=0.2, seed=0)
    assert victim.read_bytes() == good and not (root / "train" / "1" / "stray.png").exists()
    assert "repaired 2" in capsys.readouterr().out


def test_to_ffcv_into_existing_folder_fails_before_converting(digits_dir, tmp_path, capsys):
    from launchers.cli import run
    from launchers.data import main

    (tmp_path / "out").mkdir()
    bad = tmp_path / "file"
    bad.write_text("x")
    assert run(main, ["to-ffcv", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 1
    assert "is a folder" in capsys.readouterr().err  # before even looking at --src
    assert run(main, ["to-ffcv", "--src", str(digits_dir / "val"), "--out", str(bad / "v.beton")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err
    assert run(main, ["prepare-digits", "--out", str(bad / "digits")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err


# ---------------------------------------------------------------------------------------------------------------
# Config and the CLI


def test_non_utf8_toml_is_one_line(tmp_path):
    from guard_fast.squeeze.stage import SqueezeConfig

    path = tmp_path / "latin1.toml"
    path.write_bytes('[output]\ndir = "runs/caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(SqueezeConfig, path)


@pytest.mark.parametrize("override, bound", [("--data.image_size=-5", "data.image_size = -5: must be >= 1"),
                                             ("--data.num_classes=-3", "data.num_classes = -3: must be >= 1")])
def test_negative_sizes_name_the_bound(override, bound):
    from guard_fast.squeeze.stage import SqueezeConfig

    with pytest.raises(ConfigError, match=bound):
        load_config(SqueezeConfig, None, [override])


def test_cli_turns_os_errors_into_one_line(tmp_path, capsys):
    from launchers.cli import run

    def main(argv):
        open(tmp_path / "missing" / "x.txt")

    assert run(main, []) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No such file or directory" in err and str(tmp_path / "missing") in err


def test_the_one_line_error_is_one_write(monkeypatch):
    """The ranks of a job share one stderr: each rank's error line, newline included, goes out in one write, so two
    ranks stopping at once print two lines, not one line run into the next (print writes the newline apart)."""
    from launchers.cli import run

    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stderr", Recorder())

    def stopped(argv):
        raise GuardFastError("stopped by SIGTERM after step 3")

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run(stopped, [], prog="guard-fast squeeze") == 1
    assert run(interrupted, [], prog="guard-fast squeeze") == 130
    assert writes == ["guard-fast squeeze: error: stopped by SIGTERM after step 3\n",
                      "guard-fast squeeze: interrupted\n"]


# ---------------------------------------------------------------------------------------------------------------
# The shared environment (scripts/envlib.sh): each checkout imports its own code


def envlib(*command: str) -> subprocess.CompletedProcess:
    script = f". {REPO / 'scripts/envlib.sh'}; " + " ".join(shlex.quote(c) for c in command)
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)


@pytest.mark.subprocess
def test_each_checkout_layer_imports_its_own_code(tmp_path):
    dep = Path(torch.__file__).resolve().parents[4]  # <env>/lib/pythonX.Y/site-packages/torch/__init__.py
    for name in ("a", "b"):
        repo = tmp_path / name
        (repo / "guard_fast").mkdir(parents=True)
        (repo / "guard_fast" / "__init__.py").write_text(f"WHO = {name!r}\n")
        (repo / "launchers").mkdir()
        (repo / "launchers" / "__init__.py").write_text("")
        (repo / "launchers" / "cli.py").write_text("import guard_fast\n\ndef main():\n    print(guard_fast.WHO)\n")
        r = envlib("layer_venv", str(dep), str(repo))
        assert r.returncode == 0, r.stderr
    for name in ("a", "b"):
        venv = tmp_path / name / ".venv"
        code = "import guard_fast, importlib.util as u; print(guard_fast.WHO, u.find_spec('torch') is not None)"
        clean = {"PATH": "/usr/bin:/bin"}  # no PYTHONPATH: the layer alone decides what is imported
        out = subprocess.run([str(venv / "bin/python"), "-c", code], capture_output=True, text=True, cwd="/",
                             env=clean, timeout=60)
        assert out.stdout.split() == [name, "True"], out.stderr
        out = subprocess.run([str(venv / "bin/guard-fast")], capture_output=True, text=True, cwd="/", env=clean,
                             timeout=60)
        assert out.stdout.strip() == name, out.stderr
        for script in ("torchrun", "deepspeed"):  # the documented multi-process commands start this checkout's python
            if (dep / "bin" / script).exists():
                assert (venv / "bin" / script).read_text().splitlines()[0] == f"#!{venv}/bin/python"
    assert envlib("layer_venv", str(dep), str(tmp_path / "a")).returncode == 0  # idempotent


@pytest.mark.subprocess
def test_old_environments_removed_only_when_unused(tmp_path):
    cache = tmp_path / "cache"
    for env in ("venv-old", "venv-used", "venv-new"):
        (cache / env / "bin").mkdir(parents=True)
    user = tmp_path / "checkout"
    pth = user / ".venv/lib/python3.11/site-packages/guard_fast_checkout.pth"
    pth.parent.mkdir(parents=True)
    pth.write_text(f"{user}\nimport site; site.addsitedir('{cache}/venv-used/lib/python3.11/site-packages')\n")
    assert envlib("register_user", str(cache), str(user)).returncode == 0
    assert envlib("register_user", str(cache), str(tmp_path / "deleted-checkout")).returncode == 0
    r = envlib("remove_unused", str(cache), str(cache / "venv-new"))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in cache.glob("venv-*")) == ["venv-new", "venv-used"]
    assert "keeping" in r.stdout and "venv-used" in r.stdout


def test_a_continued_run_keeps_the_environment_that_began_it(tmp_path, monkeypatch):
    """environment.json records the start that made the run (its git SHA, threads, ranks); a resume or a cached rerun
    appends its own to environment.jsonl, and only a replacing run writes environment.json anew."""
    from dataclasses import dataclass

    from guard_fast.runtime import rundir
    from guard_fast.runtime.runfolder import stage

    @dataclass
    class Toy:
        lr: float = 0.1

    starts = iter(range(5))
    monkeypatch.setattr(rundir, "environment", lambda device=None: {"git_sha": f"start{next(starts)}"})
    folder = tmp_path / "run"

    @stage("toy")
    def start(**kw) -> None:
        rundir.RunDir(folder, Toy(), kind="toy", **kw).start()

    def first() -> str:
        return json.loads((folder / "environment.json").read_text())["git_sha"]

    start()
    start()  # an identical rerun continues (the stage reuses its finished work)
    start(resume=True)
    assert first() == "start0"
    later = [json.loads(line)["git_sha"] for line in (folder / "environment.jsonl").read_text().splitlines()]
    assert later == ["start1", "start2"]
    start(overwrite=True)
    assert first() == "start3" and not (folder / "environment.jsonl").exists()


@pytest.mark.parametrize("killed_at", ["config.json", "run.json", "config.toml", "environment.json"])
def test_a_run_killed_while_writing_its_record_is_continued_not_refused(tmp_path, monkeypatch, killed_at):
    """A study killed (SIGKILL) while a stage wrote its record had left config.toml alone in the folder, which the
    rerun refused as 'not a guard_fast run'. Whichever write the kill interrupts, the next start continues the run."""
    from dataclasses import dataclass

    from guard_fast.runtime import rundir
    from guard_fast.runtime.runfolder import stage

    @dataclass
    class Toy:
        lr: float = 0.1

    folder = tmp_path / "run"
    real_json, real_text = rundir.atomic_json, rundir.atomic_text

    def killed(real):
        def write(path, *a, **kw):
            if Path(path).name == killed_at:
                raise KeyboardInterrupt  # the process dies before this file exists
            return real(path, *a, **kw)
        return write

    @stage("toy")
    def start() -> None:
        rundir.RunDir(folder, Toy(), kind="toy").start()

    monkeypatch.setattr(rundir, "atomic_json", killed(real_json))
    monkeypatch.setattr(rundir, "atomic_text", killed(real_text))
    with pytest.raises(KeyboardInterrupt):
        start()
    monkeypatch.setattr(rundir, "atomic_json", real_json)
    monkeypatch.setattr(rundir, "atomic_text", real_text)
    start()  # continues (before the fix: "holds files that are not a guard_fast run (config.toml)")
    assert json.loads((folder / "run.json").read_text())["kind"] == "toy"
    assert (folder / "config.toml").is_file() and json.loads((folder / "config.json").read_text()) == {"lr": 0.1}
