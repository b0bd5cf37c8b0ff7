"""Issue 27: one rule for run folders and inputs (guard_fast/runtime/runfolder.py, docs/reliability.md).

One test per case the issue lists (each failed on main eef7e39), plus a test that enumerates every stage command and
checks it goes through the run-folder contract. Tiny shapes, in-process calls of the launchers' main()."""

from __future__ import annotations

import dataclasses
import fcntl
import importlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from guard_fast.runtime.bounds import Radius, check_bounds
from guard_fast.runtime.config import load_config
from guard_fast.runtime.errors import ConfigError, GuardFastError
from launchers.cli import COMMANDS
from launchers.cli import run as cli_run
from tests.chain import recover
from tests.conftest import ONE

NOT_STAGES = {"data": "writes datasets, not runs (prepare-digits has its own rule: test_prepare_digits_*)",
              "bench": "writes a benchmark report of synthetic inputs", "study": "a coordinator: its runs are "
              "pipeline calls, each under the contract", "torchrun": "starts other commands",
              "reproduce": "a coordinator: each (draw, model) unit runs its stages under the contract"}
"""commands that open no run folder, and why"""

MINIMAL = {"recover": ["--model.checkpoint=t.pt"], "relabel": ["--model.checkpoint=t.pt", "--images=x"],
           "train": ["--images=x"], "train-hard": ["--images=x"], "mtt": ["--buffer=x"],
           "evaluate": ["--checkpoints=a.pt"], "curvature": ["--checkpoints=a.pt"]}
"""the least each stage command needs to reach its run folder (the inputs need not exist: the folder is checked
first)"""


@pytest.fixture(autouse=True)
def keep_process_group(monkeypatch):
    """The launchers' teardown destroys the process group, which DeepSpeed created (world 1) for the in-process
    engines of this test session and caches; a real launch is one process per run, so here teardown does nothing."""
    for name in COMMANDS.values():
        module = importlib.import_module(name)
        if hasattr(module, "teardown"):
            monkeypatch.setattr(module, "teardown", lambda: None)


def stage_commands() -> list[str]:
    return [c for c in COMMANDS if c not in NOT_STAGES]


def foreign_run(folder: Path, kind: str = "squeeze") -> dict[str, bytes]:
    """A folder holding another kind of run's record; returns its files' bytes."""
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"kind": kind, "identity": "0" * 16, "changes": []}))
    (folder / "config.json").write_text(json.dumps({"other": 1}))
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    return snapshot(folder)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def main_of(command: str):
    return importlib.import_module(COMMANDS[command]).main


# ---------------------------------------------------------------------------------------------------------------
# Run-folder contract


@pytest.mark.parametrize("command", stage_commands())
def test_every_stage_goes_through_the_contract(command, tmp_path):
    """Every stage command: its run function is a @stage, and another run's folder is refused before anything is
    written (without --output.overwrite), as are a user's files (even with it)."""
    module = importlib.import_module(COMMANDS[command])
    stage_fns = [v for v in vars(module).values() if callable(v) and getattr(v, "stage_kind", None)]
    assert [f.stage_kind for f in stage_fns] == [command]  # the launcher runs exactly one stage: its own
    out = tmp_path / "run"
    before = foreign_run(out, kind="other")
    args = [f"--output.dir={out}", "--data.path=nowhere", *MINIMAL.get(command, [])]
    with pytest.raises(GuardFastError, match=f"output.dir = {out} holds a other run, not a {command} run"):
        main_of(command)(args)
    assert snapshot(out) == before
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(GuardFastError, match="holds files that are not a guard_fast run .notes.txt."):
        main_of(command)([f"--output.dir={user}", "--data.path=nowhere", "--output.overwrite=true",
                          *MINIMAL.get(command, [])])
    assert snapshot(user) == {"notes.txt": b"mine"}
    # with overwrite, the folder is no obstacle: the stage goes on to its inputs (which do not exist here)
    with pytest.raises(GuardFastError) as err:
        main_of(command)([*args, "--output.overwrite=true"])
    assert "output.dir" not in str(err.value)
    if command != "pipeline":  # the pipeline's inputs are its stages', checked after its root folder is started
        assert snapshot(out) == before  # nothing replaced before the run's inputs were checked


def test_evaluate_into_a_squeeze_run_is_refused(teacher, tmp_path):
    run = tmp_path / "squeeze-run"
    foreign_run(run, kind="squeeze")
    shutil.copy(teacher, run / "teacher.pt")
    before = snapshot(run)
    with pytest.raises(GuardFastError, match="holds a squeeze run, not a evaluate run"):
        main_of("evaluate")([f"--output.dir={run}", f"--checkpoints={run / 'teacher.pt'}", "--model.width=4",
                             "--data.image_size=16", "--output.progress=false"])
    assert snapshot(run) == before


def test_recover_with_another_config_is_refused_naming_the_key(digits_dir, teacher, recovered, tmp_path):
    out = tmp_path / "set"
    shutil.copytree(recovered, out)
    before = snapshot(out)
    with pytest.raises(GuardFastError, match=r"holds another recover run \(config differs in lr\)"):
        recover(digits_dir, teacher, out, "--lr=0.2")
    assert snapshot(out) == before
    recover(digits_dir, teacher, out)  # the same config continues (its finished chunks are reused)


def test_dc_with_another_config_refused_before_its_record_changes(tmp_path):
    from guard_fast.distill.dc import DCConfig

    out = tmp_path / "dc"
    out.mkdir()
    cfg = load_config(DCConfig, None, ["--lr_img=0.5"])
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    (out / "run.json").write_text(json.dumps({"kind": "dc"}))
    before = snapshot(out)
    with pytest.raises(GuardFastError, match=r"holds another dc run \(config differs in lr_img\)"):
        main_of("dc")([f"--output.dir={out}", "--lr_img=0.1"])
    assert snapshot(out) == before


# squeeze at toy size (the resume / lock cases)


def squeeze(data: Path, out: Path, *extra: str):
    from guard_fast.squeeze.stage import SqueezeConfig, run_squeeze

    args = [f"--data.path={data}", f"--output.dir={out}", "--model.width=4", "--data.image_size=16",
            "--data.batch_size=8", "--data.workers=0", "--optim.epochs=2", "--output.progress=false",
            "--objective.name=none", "--val_batches=1", "--output.ckpt_every=2", "--output.log_every=1", *extra]
    return run_squeeze(load_config(SqueezeConfig, None, args), ONE)


@pytest.fixture(scope="module")
def small_digits(digits_subset) -> Path:
    return digits_subset(4, 1)


def test_resume_with_another_config_is_refused_naming_keys(small_digits, tmp_path):
    out = tmp_path / "run"
    squeeze(small_digits, out, "--stop_after=2")
    before = snapshot(out)
    with pytest.raises(GuardFastError, match=r"--resume with a changed config \(objective.name, optim.lr\)"):
        squeeze(small_digits, out, "--resume", "--optim.lr=0.5", "--objective.name=guard")
    with pytest.raises(GuardFastError, match=r"changed config \(optim.lr\).*optim.epochs"):
        squeeze(small_digits, out, "--resume", "--optim.lr=0.5", "--allow_config_change=optim.epochs")
    with pytest.raises(ConfigError, match="only these keys may change"):
        squeeze(small_digits, out, "--resume", "--optim.lr=0.5", "--allow_config_change=optim.lr")
    assert snapshot(out) == before
    # a documented safe change: more epochs
    squeeze(small_digits, out, "--resume", "--optim.epochs=3", "--allow_config_change=optim.epochs")
    record = json.loads((out / "run.json").read_text())
    assert record["kind"] == "squeeze"
    assert record["changes"][-1]["optim.epochs"] == {"from": 2, "to": 3}
    assert json.loads((out / "config.json").read_text())["optim"]["epochs"] == 3


def test_second_run_into_a_locked_folder_stops_with_one_line(small_digits, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"pid 1 on elsewhere\n")
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process's run holds the folder
    try:
        with pytest.raises(GuardFastError, match=f"output.dir = {out} is in use by another run .pid 1 on elsewhere"):
            squeeze(small_digits, out)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        os.close(fd)
    squeeze(small_digits, out, "--optim.epochs=1")  # released: the run goes ahead, and releases it in turn
    fd = os.open(out / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# Paths read from pointers, manifests and symlinks stay inside their folder


def test_latest_tag_leading_outside_the_run_is_refused(small_digits, tmp_path):
    squeeze(small_digits, tmp_path / "other", "--stop_after=2")
    out = tmp_path / "run"
    squeeze(small_digits, out, "--stop_after=2")
    latest = out / "checkpoints" / "latest.json"
    entry = json.loads(latest.read_text())
    entry["tag"] = f"../../other/checkpoints/{entry['tag']}"
    latest.write_text(json.dumps(entry))
    with pytest.raises(GuardFastError, match="latest.json: tag: ../../other/checkpoints/step000000002 leads outside"):
        squeeze(small_digits, out, "--resume")


def test_manifest_item_outside_the_set_is_refused(recovered, tmp_path):
    from guard_fast.data.synthetic import load_synthetic

    root = tmp_path / "set"
    shutil.copytree(recovered, root)
    manifest = json.loads((root / "manifest.json").read_text())
    first = manifest["items"][0]["file"]
    shutil.copy(root / first, tmp_path / "outside.png")  # the same pixels: only the path gives it away
    manifest["items"][0]["file"] = "../outside.png"
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GuardFastError, match=r"manifest.json: item: ../outside.png leads outside"):
        load_synthetic(root)


def test_symlinked_class_folder_does_not_redirect_writes(digits_dir, teacher, recovered, tmp_path):
    victim = tmp_path / "victim"
    shutil.copytree(recovered, victim)
    out = tmp_path / "set"
    shutil.copytree(recovered, out)
    cls = sorted((out / "images").iterdir())[3].name
    shutil.rmtree(out / "images" / cls)
    (out / "images" / cls).symlink_to(victim / "images" / cls)
    for p in (victim / "images" / cls).iterdir():
        p.write_bytes(b"the other run's image")
    before = snapshot(victim)
    with pytest.raises(GuardFastError, match=f"leads outside {out}"):
        recover(digits_dir, teacher, out)
    assert snapshot(victim) == before


# ---------------------------------------------------------------------------------------------------------------
# prepare-digits and usage


def test_prepare_digits_refuses_a_folder_with_user_files(tmp_path, capsys):
    from launchers.data import main

    out = tmp_path / "mine"
    (out / "train" / "3").mkdir(parents=True)
    (out / "train" / "3" / "holiday.png").write_bytes(b"user photo")
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    assert cli_run(main, ["prepare-digits", "--out", str(out), "--size", "8"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a digits dataset" in err
    assert snapshot(out) == before


@pytest.mark.parametrize("command", ["reproduce"])
def test_coordinators_without_arguments_print_usage(command, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a default run would write runs/ and results/ here
    with pytest.raises(SystemExit) as ex:
        main_of(command)([])
    assert ex.value.code == 2
    assert "usage: guard-fast" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("command", stage_commands())
def test_commands_without_arguments_print_usage(command, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a default run would write runs/default here
    with pytest.raises(SystemExit) as ex:
        main_of(command)([])
    assert ex.value.code == 2
    assert "usage: guard-fast" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# Validation in one place


@pytest.mark.parametrize("module, cls, args, key", [
    ("guard_fast.squeeze.stage", "SqueezeConfig", ["--objective.name=pgd-at", "--objective.eps=2.0"], "objective.eps"),
    ("guard_fast.squeeze.stage", "SqueezeConfig", ["--robust_eval_eps=[5]"], "robust_eval_eps"),
    ("guard_fast.squeeze.stage", "SqueezeConfig", ["--objective.alpha=3"], "objective.alpha"),
    ("guard_fast.distill.dc", "DCConfig", ["--attack=pgd", "--attack_eps=5"], "attack_eps"),
    ("guard_fast.robustness.evaluate", "EvaluateConfig", ["--attack.eps=[2]"], "attack.eps"),
    ("guard_fast.squeeze.stage", "SqueezeConfig", ["--optim.lr=nan"], "optim.lr"),
    ("guard_fast.squeeze.stage", "SqueezeConfig", ["--optim.lr=inf"], "optim.lr"),
    ("guard_fast.squeeze.stage", "SqueezeConfig", ["--optim.lr=0"], "optim.lr"),
    ("guard_fast.distill.recover", "RecoverConfig", ["--lr=-1"], "lr"),
    ("guard_fast.distill.experts", "ExpertsConfig", ["--lr=nan"], "lr"),
    ("guard_fast.distill.mtt", "MTTConfig", ["--lr_teacher=0"], "lr_teacher"),
    ("guard_fast.squeeze.stage", "SqueezeConfig", ["--objective.beta=-1"], "objective.beta"),
    ("guard_fast.student.kd", "TrainConfig", ["--temperature=nan"], "temperature"),
])
def test_bounds_are_checked_for_every_config_with_the_key(module, cls, args, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_config(getattr(importlib.import_module(module), cls), None, args)


@dataclasses.dataclass
class Probe:
    eps: Radius = 2.0
    radii: list[Radius] = dataclasses.field(default_factory=lambda: [0.5])


def test_bounds_hold_for_defaults_and_presets_too():
    """The bound is declared on the type: a default or a TOML value outside it is refused like a CLI value."""
    with pytest.raises(ConfigError, match="eps = 2.0: must be an L-inf radius"):
        check_bounds(Probe())
    with pytest.raises(ConfigError, match=r"radii = 0.0"):
        check_bounds(Probe(eps=0.1, radii=[0.5, 0.0]))


# ---------------------------------------------------------------------------------------------------------------
# Artifacts checked before they are written


def test_experts_diverging_stop_naming_the_stage(digits_subset, tmp_path):
    from guard_fast.distill.experts import ExpertsConfig, run_experts

    out = tmp_path / "buffer"
    cfg = load_config(ExpertsConfig, None, [f"--data.path={digits_subset(4, 1)}", "--data.image_size=16",
                                            "--model.width=4", f"--output.dir={out}", "--output.progress=false",
                                            "--num_experts=1", "--epochs=2", "--batch_size=20", "--lr=1e30"])
    with pytest.raises(GuardFastError, match=r"^experts: expert seed 0: non-finite loss in epoch 1"):
        run_experts(cfg, ONE)
    assert not (out / "experts" / "expert_0000.pt").exists() and not (out / "buffer.json").exists()


def test_recover_diverging_stops_naming_the_stage(digits_dir, teacher, tmp_path):
    out = tmp_path / "set"
    with pytest.raises(GuardFastError, match=r"^recover: .*chunk00000.pt would hold \d+ non-finite values"):
        recover(digits_dir, teacher, out, "--lr=1e30", "--first_bn_multiplier=1e30")  # diverges at toy size
    assert not (out / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# One error boundary: our own files and the data loader's workers


def test_manifest_missing_a_key_is_one_line(recovered, tmp_path, capsys):
    root = tmp_path / "set"
    shutil.copytree(recovered, root)
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["items"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    from guard_fast.data.synthetic import load_synthetic

    with pytest.raises(GuardFastError, match=f"{root / 'manifest.json'}: not a valid image-set manifest .missing "
                                             "key 'items'"):
        load_synthetic(root)


def test_garbled_labels_json_is_one_line(digits_dir, recovered, relabeled, tmp_path, capsys):
    labels = tmp_path / "labels"
    shutil.copytree(relabeled, labels)
    (labels / "labels.json").write_text('{"key": ')
    args = [f"--data.path={digits_dir}", "--data.image_size=16", "--data.workers=0", "--model.width=4",
            f"--images={recovered}", f"--labels={labels}", f"--output.dir={tmp_path / 'student'}",
            "--views.batch_size=10", "--optim.epochs=1", "--output.progress=false"]
    assert cli_run(main_of("train"), args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{labels / 'labels.json'}: not a valid soft-label record" in err


@pytest.mark.parametrize("damage", ["truncated", "pickled"])
def test_broken_dc_state_is_one_line(damage, digits_subset, tmp_path, capsys):
    from tests.distill.test_dc import dc_args

    data = digits_subset(8, 2)
    out = tmp_path / "dc"
    args = dc_args(data, out, "--stop_after=1", "--ckpt_every=1")
    assert cli_run(main_of("dc"), args) == 0
    state = out / "state.pt"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[:100])
    else:
        marker = tmp_path / "payload-ran"

        class Payload:
            def __reduce__(self):
                return open, (str(marker), "w")

        torch.save({"key": "x", "payload": Payload()}, state)
    capsys.readouterr()
    assert cli_run(main_of("dc"), args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(state) in err
    assert not (tmp_path / "payload-ran").exists()


def test_corrupt_image_in_a_loader_worker_is_one_line(small_digits, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(small_digits, data)
    victim = sorted((data / "train" / "5").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:30])
    args = [f"--data.path={data}", f"--output.dir={tmp_path / 'run'}", "--model.width=4", "--data.image_size=16",
            "--data.batch_size=8", "--data.workers=2", "--optim.epochs=1", "--output.progress=false",
            "--objective.name=none", "--val_batches=1"]
    assert cli_run(main_of("squeeze"), args) == 1
    err = capsys.readouterr().err
    ours = [x for x in err.splitlines() if x.startswith("guard-fast")]
    assert len(ours) == 1 and victim.name in ours[0] and "Traceback" not in err, err


@pytest.mark.subprocess
@pytest.mark.multirank
def test_failing_rank_under_torchrun_ends_with_its_line(tmp_path):
    """`guard-fast torchrun` (launchers/torchrun.py): the failed rank's line is the last thing printed, without
    torchrun's ChildFailedError traceback after it."""
    import subprocess

    from tests.conftest import PYTHON, REPO, subprocess_env
    from tests.runtime.test_multinode import free_port

    cmd = [PYTHON, "-m", "launchers.torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "launchers/squeeze.py"), f"--data.path={tmp_path / 'no-such-data'}",
           f"--output.dir={tmp_path / 'run'}", "--dist.cpu_threads=1", "--output.progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=120)
    lines = [x for x in (proc.stdout + proc.stderr).splitlines() if x.strip()]
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith("guard-fast torchrun: rank ") and "no-such-data" in lines[-1], lines[-3:]
