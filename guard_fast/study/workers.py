"""Independent pipeline calls in parallel worker processes, one thread each; resumable because every call is.

A job is one `run_pipeline` call: one seed and one set of row settings (or one selection candidate). Jobs write
disjoint folders, and the stages inside a job depend on each other (teacher -> recover -> relabel -> train ->
evaluate), so the job is the unit of parallelism. Each job gets a fresh worker process with one torch thread
(`workers` of them share the machine's cores instead of each starting one thread per core), forked from a
`forkserver` that imported torch and the pipeline once (a `spawn` per job paid that import, about 5 s, every time;
the fork server holds no torch threads or process groups, so each worker starts as clean as a spawned one). A
worker sends back one status line over a pipe, and exits when the study dies (a killed study leaves no orphan
writing into the cache).
A finished stage is cached by its StageRunner, so a rerun, sequential or parallel, skips it: the results do not
depend on the number of workers (tests/study/test_runner.py).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable

import torch

from guard_fast.pipeline import run_pipeline
from guard_fast.runtime.distributed import DistInfo, pick_device
from guard_fast.runtime.errors import GuardFastError
from guard_fast.study import gates as G


@dataclass
class GateContext:
    """What a worker needs to check the teacher / recover gates right after those stages."""

    gates: Any
    roots: list[tuple[int, Path]]
    """(seed, pipeline folder) of the plan's calls for this job's seed (the plain teacher may live in another)"""
    runs_dir: Path

    def after_stage(self, kind: str, folder: Path) -> None:
        if kind in ("squeeze", "recover"):
            G.check(G.measure_roots(self.gates, self.roots, self.runs_dir))


@dataclass
class Job:
    name: str
    """display name, e.g. 'seed1/base'"""
    config: Any
    """the PipelineConfig of this call"""
    gate: GateContext | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """caller's bookkeeping (selection candidate, call), not read here"""


def run_job(job: Job, info: DistInfo) -> None:
    run_pipeline(job.config, info, on_stage=job.gate.after_stage if job.gate else None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user (a reused pid): treat as alive
        return True
    return True


def _exit_with_study(study: int) -> None:
    """Exit when the study process `study` is gone, or when this worker's parent (the fork server, which exits with
    the study) is: whichever is seen first."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent and _alive(study):
            time.sleep(0.5)
        os._exit(1)  # orphaned: the study was killed; a rerun resumes this job's stage from its checkpoints

    threading.Thread(target=watch, daemon=True).start()


# Left in the environment by the parent's own 1-rank process group (engine.ensure_process_group, e.g. after a job ran
# in-process): a worker that inherited them would bind the parent's MASTER_PORT and fail with EADDRINUSE.
GROUP_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def _stopped(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds: the running stage records its time so far (runtime/stagecache.py)


def _worker(job: Job, conn: Any, study: int) -> None:
    _exit_with_study(study)
    signal.signal(signal.SIGTERM, _stopped)  # run_jobs stops the others with SIGTERM when one fails
    for k in GROUP_ENV:
        os.environ.pop(k, None)  # each worker makes its own 1-rank group on a free port
    torch.set_num_threads(1)
    status = ("ok", "")
    try:
        run_job(job, DistInfo(rank=0, world=1, local_rank=0, device=pick_device(job.config.dist.device)))
    except G.GateError as e:
        status = ("gate", str(e))
    except GuardFastError as e:
        status = ("error", str(e))
    except BaseException as e:  # the traceback goes to the inherited stderr; the parent gets one line
        try:
            conn.send(("crash", f"{type(e).__name__}: {e}"))
        except OSError:  # the parent stopped listening (it is stopping this worker)
            pass
        raise
    conn.send(status)


def run_jobs(jobs: list[Job], info: DistInfo, workers: int, on_done: Callable[[Job], None]) -> None:
    """Run every job, `workers` at a time in worker processes (in this process, in order, when workers == 1 or
    under several ranks), calling on_done(job) in this process as each finishes. The first failure (a gate, a user
    error, a crash) stops the others and is raised here as one line."""
    if workers <= 1 or info.world > 1 or len(jobs) <= 1:
        for job in jobs:
            run_job(job, info)
            on_done(job)
        return
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # torch and the pipeline, imported once by the server, not per job
    pending, running = list(jobs), {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_worker, args=(job, send, os.getpid()), name=f"study:{job.name}")
                proc.start()
                send.close()
                running[proc.sentinel] = (proc, job, recv)
            for sentinel in wait(list(running)):
                proc, job, recv = running.pop(sentinel)
                proc.join()
                kind, line = recv.recv() if recv.poll() else ("crash", f"exit code {proc.exitcode}")
                recv.close()
                if kind == "gate":
                    raise G.GateError(line)
                if kind != "ok":
                    raise GuardFastError(f"{job.name}: {line}" if kind == "crash" else line)
                on_done(job)
    finally:
        for proc, _, recv in running.values():  # a failure elsewhere: stop the others (their stages resume later)
            proc.terminate()
            proc.join()
            recv.close()
