"""The run-folder contract, one rule for every stage (docs/reliability.md).

- A stage is a function decorated with `@stage("kind")`; inside it, `runtime.cluster.open_run` opens its output folder
  (calling open_run anywhere else is an error, so a new stage gets the contract by construction).
- A folder belongs to one run: its identity is the stage kind plus the resolved config, minus the keys that do not
  change what the run computes (`VOLATILE`). `run.json` records the kind; `config.json` the config.
- Opening decides, before anything is written (`verdict`):
  empty folder -> fresh run; the same identity -> continue (stages that reuse finished work themselves) or, for
  stages with `--resume`, refused without it; another identity -> refused, naming the kind or the differing keys,
  unless `--output.overwrite` (a fresh run then replaces the old run's files) or `--resume
  --allow_config_change=key,...` with keys from `SAFE_CHANGES`; files that are no run's -> refused, even with
  overwrite (they are the user's).
- `RunDir.start()` takes an exclusive lock (`flock` on `<dir>/.lock`, rank 0) for as long as the stage runs, checks
  the verdict again under the lock, and only then writes. A second run into a locked folder stops with one line.
- Paths read from the folder (latest.json tags, manifest items) and every atomic write into it are resolved and must
  stay inside it (`inside`, `check_write`): a symlink or `../` cannot lead a run into another one.
"""

from __future__ import annotations

import contextvars
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from guard_fast.runtime.errors import ConfigError, GuardFastError

RUN_FILE = "run.json"
"""the run's identity: stage kind, config hash, allowed config changes"""
LOCK_FILE = ".lock"

VOLATILE = ("resume", "stop_after", "allow_config_change", "force", "output", "data.workers", "render_workers",
            "dist.timeout_s", "dist.cpu_threads")
"""config keys (and sections) that do not change what a run computes: they are not part of its identity"""

SAFE_CHANGES = {
    "optim.epochs": "train longer (or stop earlier): the schedule is recomputed for the new length from the resumed "
                    "step, so a resumed run with more epochs is not bit-identical to one started with them",
    "val_every": "how often the validation metrics are logged",
    "val_batches": "how many validation batches the logged metrics use",
    "robust_eval_steps": "PGD steps of the logged robust validation",
    "data.eval_batch_size": "validation batch size (memory only)",
    "chunk": "images per forward/backward pass of a student's step (the same gradient to float rounding; speed)",
    "data.path": "the dataset was moved (the same images under another path)",
}
"""keys `--resume --allow_config_change=...` may change, and why each is safe"""

IGNORED = (LOCK_FILE, "stage.key", "stage.json", "stage.prior")
"""files the contract and the pipeline's stage cache keep in a run folder; they belong to no run's record"""


# ----------------------------------------------------------------------------------------------------------------
# Stages: the context open_run needs


@dataclass
class _Stage:
    kind: str
    locks: list[int] = field(default_factory=list)
    """file descriptors of the folder locks this stage holds (released when it returns)"""
    roots: list[Path] = field(default_factory=list)
    """run folders this stage opened: writes under them must resolve inside them"""


_CURRENT: contextvars.ContextVar[tuple[_Stage, ...]] = contextvars.ContextVar("guard_fast_stage", default=())
F = TypeVar("F", bound=Callable[..., Any])


def stage(kind: str) -> Callable[[F], F]:
    """Mark `run_<kind>(cfg, info)` as a stage: open_run works inside it (naming the stage), its folder lock is
    released when it returns or raises, and errors from artifact checks name it."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            ctx = _Stage(kind)
            token = _CURRENT.set((*_CURRENT.get(), ctx))
            try:
                return fn(*args, **kwargs)
            finally:
                _CURRENT.reset(token)
                for fd in ctx.locks:
                    os.close(fd)  # closing the descriptor releases the flock

        run.stage_kind = kind  # type: ignore[attr-defined]
        return run  # type: ignore[return-value]

    return wrap


def current_stage() -> str | None:
    stack = _CURRENT.get()
    return stack[-1].kind if stack else None


def stage_context() -> _Stage:
    stack = _CURRENT.get()
    if not stack:
        raise RuntimeError("open_run called outside a @stage function (guard_fast/runtime/runfolder.py)")
    return stack[-1]


# ----------------------------------------------------------------------------------------------------------------
# Identity


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def identity_items(config: dict[str, Any]) -> dict[str, Any]:
    """The flattened config keys that define a run (VOLATILE keys and sections dropped)."""
    return {k: v for k, v in flatten(config).items()
            if not any(k == v_ or k.startswith(v_ + ".") for v_ in VOLATILE)}


def identity(kind: str, config: dict[str, Any] | None) -> str:
    blob = json.dumps({"kind": kind, "config": identity_items(config or {})}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    """What the config looks like after a round trip through config.json (tuples -> lists, paths -> str)."""
    return json.loads(json.dumps(config, default=str))


def contents(path: Path) -> list[str]:
    """Names in the folder other than the contract's own files and temp files left by a killed atomic write."""
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir()
                  if p.name not in IGNORED and not (p.name.startswith(".") and p.name.endswith(".tmp")))


def read_record(path: Path) -> dict[str, Any] | None:
    """The run recorded in the folder: {'kind', 'config'} from run.json + config.json (kind None for a folder
    written before run.json existed), or None when the folder holds no run record."""
    cfg_file, run_file = path / "config.json", path / RUN_FILE
    if not cfg_file.is_file() and not run_file.is_file():
        return None
    try:
        config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else None
        run = json.loads(run_file.read_text()) if run_file.is_file() else {}
    except (OSError, ValueError) as e:
        raise GuardFastError(f"output.dir = {path}: its run record is unreadable ({e}); choose another "
                             "output.dir") from None
    if not isinstance(run, dict) or (config is not None and not isinstance(config, dict)):
        raise GuardFastError(f"output.dir = {path}: its run record is not a guard_fast one; choose another output.dir")
    return {"kind": run.get("kind"), "config": config, "identity": run.get("identity")}


def differing_keys(theirs: dict[str, Any] | None, ours: dict[str, Any]) -> list[str]:
    a, b = identity_items(theirs or {}), identity_items(_jsonable(ours))
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))


# ----------------------------------------------------------------------------------------------------------------
# The verdict


@dataclass(frozen=True)
class Verdict:
    action: str
    """'fresh' (nothing there), 'continue' (this run's folder), 'replace' (overwrite another run)"""
    changed: tuple[str, ...] = ()
    """config keys a --resume --allow_config_change run changes"""


def verdict(path: Path, kind: str, config: dict[str, Any] | None, *, resume: bool | None, overwrite: bool,
            allow: list[str], keyed: bool = True) -> Verdict:
    """What opening `path` for a `kind` run with `config` does, or a one-line GuardFastError saying why it may not.

    resume: None = the stage reuses its own finished work (an identical run continues); False = a fresh run (an
    identical one is refused too: --resume or --output.overwrite); True = continue the run in the folder.
    keyed: False for a folder whose stages key their own work (the pipeline root): only the kind must match."""
    found = contents(path)
    if not found:
        return Verdict("fresh")
    where = f"output.dir = {path}"
    record = read_record(path)
    if record is None:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise GuardFastError(f"{where} holds files that are not a guard_fast run ({shown}); choose an empty or new "
                             "output.dir (they are left alone, even with --output.overwrite)")
    if overwrite and resume is not True:
        return Verdict("replace")
    fix = "choose a new output.dir, or --output.overwrite=true to replace it"
    theirs = record["kind"]
    if theirs is not None and theirs != kind:
        raise GuardFastError(f"{where} holds a {theirs} run, not a {kind} run; {fix}")
    if theirs is None and config is not None and set(record["config"] or {}) != set(config):
        raise GuardFastError(f"{where} holds another kind of run (its config.json has other sections); {fix}")
    diff = differing_keys(record["config"], config or {}) if keyed else []
    if resume is False:
        what = "this run already" if not diff else f"another {kind} run (config differs in {', '.join(diff)})"
        raise GuardFastError(f"{where} holds {what}; pass --resume to continue it, a new --output.dir, or "
                             "--output.overwrite=true to replace it")
    if not diff:
        return Verdict("continue")
    if resume is None:
        raise GuardFastError(f"{where} holds another {kind} run (config differs in {', '.join(diff)}); {fix}")
    refused = [k for k in diff if k not in allow]
    if refused:
        unsafe = [k for k in refused if k not in SAFE_CHANGES]
        hint = (f"keys that may change on --resume (--allow_config_change=...): {', '.join(SAFE_CHANGES)}" if unsafe
                else f"pass --allow_config_change={','.join(diff)} to accept")
        raise GuardFastError(f"{where}: --resume with a changed config ({', '.join(refused)}) is refused; {hint}; "
                             f"or start a new output.dir")
    return Verdict("continue", tuple(diff))


def check_allowed(allow: list[str]) -> None:
    """--allow_config_change names only keys from SAFE_CHANGES."""
    if bad := [k for k in allow if k not in SAFE_CHANGES]:
        raise ConfigError(f"allow_config_change = {bad}: only these keys may change on --resume: "
                          f"{', '.join(SAFE_CHANGES)} (docs/reliability.md)")


# ----------------------------------------------------------------------------------------------------------------
# Lock and containment


def lock(path: Path) -> int:
    """An exclusive flock on `<path>/.lock`, held by the current stage until it returns; a held lock is one line."""
    ctx = stage_context()
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        finally:
            os.close(fd)
        raise GuardFastError(f"output.dir = {path} is in use by another run ({holder}); wait for it to finish or "
                             "choose another output.dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    ctx.locks.append(fd)
    return fd


def register_root(path: Path) -> None:
    ctx = stage_context()
    if path not in ctx.roots:
        ctx.roots.append(path)


def inside(root: str | Path, relative: str | Path, what: str) -> Path:
    """`root / relative` once resolved (symlinks, `..`) lies inside `root`, else one line naming `what`."""
    root = Path(root)
    path = root / relative
    real, top = path.resolve(), root.resolve()
    if real != top and top not in real.parents:
        raise GuardFastError(f"{what}: {relative} leads outside {root} (to {real}); refused")
    return path


def check_write(path: Path) -> None:
    """Called by every atomic write: a path under an open run folder must resolve inside it."""
    absolute = Path(os.path.abspath(path))
    for ctx in _CURRENT.get():
        for root in ctx.roots:
            top = Path(os.path.abspath(root))
            if top in absolute.parents:
                inside(top, absolute.relative_to(top), f"write into {root}")


def as_dict(cfg: Any) -> dict[str, Any] | None:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg
