"""Every rank agrees on the run folder: rank 0 decides, the others check they see what rank 0 sees.

A multi-node job needs output.dir on a filesystem all nodes share: checkpoints, the resume point (latest.json) and
the stage's products are written by rank 0 (and ZeRO shards by every rank) and read back by every rank. On a
node-local disk each node would keep its own run and resume from its own step. `open_run` therefore

1. proves the folder is shared: rank 0 writes a probe file with a random token in output.dir (creating it, and
   removing what it created afterwards), every rank reads it through its own output.dir path, and any rank that
   cannot makes every rank stop with one line ("output.dir must be on a filesystem shared by all nodes");
2. lets rank 0 check the folder (RunDir's rules: a file, not writable, another run's record) and hands its verdict to
   every rank; then each rank opens the RunDir.

The resume point is decided the same way (runtime/loop.py: rank 0 reads latest.json, every rank loads that tag).
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

from guard_fast.runtime import distributed as D
from guard_fast.runtime.distributed import DistInfo
from guard_fast.runtime.errors import GuardFastError
from guard_fast.runtime.rundir import RunDir
from guard_fast.runtime.runfolder import stage_context

PROBE_WAIT_S = 5.0
"""how long a rank looks for rank 0's probe file (NFS may show a new file only after its attribute cache expires)"""


def _probe(output_dir: str, token: str) -> Path:
    """A name never looked up before (NFS caches failed lookups); a stale one, left by a kill, is removed by
    RunDir.start with the other temp files."""
    return Path(output_dir).absolute() / f".guard-fast-shared-{token[:12]}.tmp"


def _write_probe(output_dir: str) -> tuple[str, list[str]] | None:
    """Rank 0: a probe file holding a random token in output.dir (created if missing); (token, the folders it
    created), or None if it cannot write one (RunDir's check then says why)."""
    path = Path(output_dir).absolute()
    created = [str(p) for p in (path, *path.parents) if not p.exists()]
    token = secrets.token_hex(16)
    try:
        path.mkdir(parents=True, exist_ok=True)
        _probe(output_dir, token).write_text(token)
    except OSError:
        _remove_probe(output_dir, token, created)
        return None
    return token, created


def _remove_probe(output_dir: str, token: str, created: list[str]) -> None:
    """Rank 0: the probe and the folders it created go again (the run's record is written only at start)."""
    _probe(output_dir, token).unlink(missing_ok=True)
    for folder in created:  # deepest first
        try:
            Path(folder).rmdir()
        except OSError:
            break


def _sees_probe(output_dir: str, token: str) -> bool:
    """Whether this rank's own output.dir holds rank 0's probe (retried: NFS may show a new file late)."""
    path = _probe(output_dir, token)
    deadline = time.monotonic() + PROBE_WAIT_S
    while True:
        try:
            if path.read_text() == token:
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def check_shared(output_dir: str) -> None:
    """Collective: every rank sees rank 0's output.dir, else every rank raises one line naming the ranks that do
    not."""
    probe = D.decide_on_main(lambda: _write_probe(output_dir))
    if probe is None:
        return
    try:
        seen = D.all_gather_objects(_sees_probe(output_dir, probe[0]))
    finally:
        if D.rank() == 0:
            _remove_probe(output_dir, *probe)
    blind = [r for r, ok in enumerate(seen) if not ok]
    if blind:
        who = ", ".join(f"rank {r} (host {D.host_of(r)})" for r in blind)
        raise GuardFastError(f"output.dir = {output_dir}: {who} cannot see rank 0's folder (host {D.host_of(0)}); "
                             "output.dir must be on a filesystem shared by all nodes")


def open_run(path: str | Path, cfg: Any = None, *, info: DistInfo, keyed: bool = True) -> RunDir:
    """The current @stage's run folder (runtime/runfolder.py: identity, overwrite, resume, lock), on every rank,
    agreed: one process opens it directly; several prove the folder is shared, then rank 0 checks it and every rank
    gets its verdict (collective). `--resume`, `--output.overwrite` and `--allow_config_change` are read from cfg."""
    kind = stage_context().kind
    output = getattr(cfg, "output", None)

    def make() -> RunDir:
        return RunDir(path, cfg, kind=kind, is_main=info.is_main, device=info.device,
                      resume=getattr(cfg, "resume", None), overwrite=bool(getattr(output, "overwrite", False)),
                      allow=getattr(cfg, "allow_config_change", None), keyed=keyed)

    if info.world == 1:
        return make()
    def check() -> None:
        make()

    check_shared(str(path))
    D.decide_on_main(check)
    with D.setup_phase():
        run = make()
    return run
