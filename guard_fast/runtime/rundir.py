"""What every run folder gets at start: resolved config, git SHA, package versions, device; metrics as JSON lines."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from guard_fast.runtime import config as config_mod
from guard_fast.runtime.distributed import topology
from guard_fast.runtime.errors import ConfigError, GuardFastError
from guard_fast.runtime.io import append_jsonl, atomic_json, atomic_text
from guard_fast.runtime.runfolder import (
    RUN_FILE,
    Verdict,
    as_dict,
    check_allowed,
    contents,
    flatten,
    identity,
    lock,
    register_root,
    verdict,
)

PACKAGES = ("torch", "torchvision", "triton", "deepspeed", "ffcv", "numpy", "torchattacks")

ENV_FILE, RESUMES_FILE = "environment.json", "environment.jsonl"


def git_sha() -> str:
    """SHA of the checkout guard_fast runs from ('unknown' outside git), with '-dirty' for uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_description(device: torch.device | str | None = None) -> dict[str, Any]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info: dict[str, Any] = {"device": str(device), "platform": platform.platform(), "cpu": platform.processor()
                            or platform.machine(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    return info


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """git SHA, versions, rank 0's hardware, and the job's layout (world size, every rank's host: cluster)."""
    return {"git_sha": git_sha(), "versions": versions(), "hardware": device_description(device),
            "cluster": topology() or {"world_size": 1, "nodes": 1, "ranks": []},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def check_output_dir(path: Path) -> None:
    """One-line errors for an output folder that cannot be one: a file, under a file, or not writable."""
    if path.exists() and not path.is_dir():
        raise GuardFastError(f"output.dir = {path} is a file, not a folder; choose another output.dir")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise GuardFastError(f"output.dir = {path}: {parent} is a file, not a folder; choose another output.dir")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GuardFastError(f"output.dir = {path}: {parent} is not writable; choose another output.dir")


class RunDir:
    """A run folder under the run-folder contract (runtime/runfolder.py). Nothing is written until `start()`, called
    once the run's inputs are checked and it is known to start: rank 0 then takes the folder's lock, checks the
    verdict again under it, (overwrite) removes the old run, and writes run.json, config.toml/config.json and
    environment.json (the environment that began the run; a later start that continues it, a resume or a cached
    rerun, appends its own to environment.jsonl instead); metrics.jsonl is appended later.

    `kind`: the stage kind (the current @stage's). `resume`: None = the stage reuses finished work itself (an
    identical run continues); False = a fresh run; True = continue the run in the folder (`allow`: config keys it may
    change). `keyed`: False when only the kind must match (the pipeline root: its stages key their own work)."""

    def __init__(self, path: str | Path, cfg: Any = None, *, kind: str, is_main: bool = True, device=None,
                 resume: bool | None = None, overwrite: bool = False, allow: list[str] | None = None,
                 keyed: bool = True):
        self.path, self.cfg, self.device, self.kind = Path(path), cfg, device, kind
        self.is_main, self.resume, self.overwrite, self.keyed = is_main, resume, overwrite, keyed
        self.allow = list(allow or [])
        check_allowed(self.allow)
        if self.allow and resume is not True:
            raise ConfigError(f"allow_config_change = {self.allow}: only with --resume")
        check_output_dir(self.path)
        self.verdict = self._verdict()

    def _verdict(self) -> Verdict:
        return verdict(self.path, self.kind, as_dict(self.cfg), resume=self.resume, overwrite=self.overwrite,
                       allow=self.allow, keyed=self.keyed)

    def start(self) -> "RunDir":
        """The run is starting: lock, check again, (overwrite) clear the old run, drop stale temp files, write the
        record. Every rank registers the folder so that writes under it must resolve inside it."""
        register_root(self.path)
        if not self.is_main:
            return self
        self.path.mkdir(parents=True, exist_ok=True)
        lock(self.path)
        now = self._verdict()  # another run may have started between opening and here
        if now != self.verdict:
            raise GuardFastError(f"output.dir = {self.path} changed while this run was setting up (another run "
                                 "wrote into it); choose another output.dir")
        if now.action == "replace":
            for name in contents(self.path):
                p = self.path / name
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        for tmp in (*self.path.glob(".*.tmp"), *self.path.glob("checkpoints/.*.tmp")):
            tmp.unlink(missing_ok=True)  # left by a killed atomic write; this run owns the folder
        record = self._run_record(now)
        # the record first (config.json, then run.json: a folder with either is a run), config.toml after it: a kill
        # between the writes leaves a folder the next run continues, never one refused as "not a guard_fast run"
        if self.cfg is not None:
            atomic_json(self.path / "config.json", config_mod.to_dict(self.cfg))
        atomic_json(self.path / RUN_FILE, record)
        if self.cfg is not None:
            atomic_text(self.path / "config.toml", config_mod.to_toml(self.cfg))
        env = environment(self.device)
        if now.action == "continue" and (self.path / ENV_FILE).is_file():
            append_jsonl(self.path / RESUMES_FILE, env)  # environment.json stays the one that began the run
        else:
            atomic_json(self.path / ENV_FILE, env)
        return self

    def _run_record(self, now: Verdict) -> dict[str, Any]:
        """run.json: kind and identity; a --resume --allow_config_change run appends what it changed."""
        old: dict[str, Any] = {}
        if now.action == "continue" and (self.path / RUN_FILE).is_file():
            old = json.loads((self.path / RUN_FILE).read_text())
        changes = list(old.get("changes", []))
        if now.changed:
            before = flatten(json.loads((self.path / "config.json").read_text()))
            after = flatten(json.loads(json.dumps(config_mod.to_dict(self.cfg), default=str)))
            changes.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            **{k: {"from": before.get(k), "to": after.get(k)} for k in now.changed}})
        return {"kind": self.kind, "identity": identity(self.kind, as_dict(self.cfg)), "changes": changes}

    def resumed_at(self, step: int, file: str = "metrics.jsonl") -> None:
        """Drop metric lines past `step` (logged after the checkpoint a resumed run restarts from; they are logged
        again) and any line a kill cut short."""
        path = self.path / file
        if not self.is_main or not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict) or rec.get("step", 0) <= step:
                kept.append(line + "\n")
        atomic_text(path, "".join(kept))

    def log(self, record: dict[str, Any], file: str = "metrics.jsonl") -> None:
        if self.is_main:
            append_jsonl(self.path / file, {"time": round(time.time(), 3), **record})
