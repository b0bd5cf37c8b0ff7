"""Two "nodes" on one machine: two torchrun agents (--nnodes 2, one process each, c10d rendezvous on 127.0.0.1)
against one agent with two processes, and the failures a cluster meets (issue 28). Tiny squeezes on CPU/gloo.

2 x 1 equals 1 x 2 bit for bit (squeeze; evaluate; torch and ffcv backends), a node-local output.dir and a setup error
on one node stop both nodes with one line, a killed rank ends both agents within seconds, SIGTERM checkpoints and
stops, and a SIGTERM + SIGKILL + resume sequence ends at the uninterrupted run's weights for the `guard` objective
(per-rank BatchNorm statistics and RNG streams restored); another world size is refused with one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import PYTHON, REPO, subprocess_env

pytestmark = [pytest.mark.multirank, pytest.mark.subprocess]

SQUEEZE = ["--config", str(REPO / "configs/digits/squeeze.toml"), "--model.width=4", "--data.image_size=16",
           "--data.batch_size=8", "--data.eval_batch_size=64", "--optim.epochs=4", "--optim.warmup_epochs=0.5",
           "--optim.lr=0.05", "--output.log_every=1", "--output.ckpt_every=2", "--output.progress=false",
           "--objective.name=guard", "--objective.beta=0.5", "--val_batches=1", "--dist.cpu_threads=1"]
"""20 micro-steps on 2 ranks (80 images, batch 8 per rank), the default GUARD objective"""
BACKENDS = {"torch": ["--data.workers=0"], "ffcv": ["--data.backend=ffcv", "--data.workers=1"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nnodes: int, nproc: int, port: int) -> list[str]:
    if nnodes == 1:
        return [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port)]
    return [PYTHON, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc_per_node", str(nproc),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "test"]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    out = open(log, "w")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=REPO)


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"agents still running after {timeout} s") from None
    return codes


def two_nodes(launcher: str, per_node: list[list[str]], logs: Path) -> list[subprocess.Popen]:
    """Two torchrun agents, one process each; per_node[i] = node i's arguments."""
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    return [start([*torchrun(2, 1, port), str(REPO / launcher), *args], logs / f"node{i}.log")
            for i, args in enumerate(per_node)]


def one_node(launcher: str, args: list[str], logs: Path, nproc: int = 2) -> subprocess.Popen:
    logs.mkdir(parents=True, exist_ok=True)
    return start([*torchrun(1, nproc, free_port()), str(REPO / launcher), *args], logs / "node0.log")


def ok(procs: list[subprocess.Popen], logs: Path) -> None:
    codes = finish(procs)
    assert codes == [0] * len(procs), "\n".join(p.read_text()[-3000:] for p in sorted(logs.glob("*.log")))


def error_lines(logs: Path) -> list[str]:
    return [ln for p in sorted(logs.glob("*.log")) for ln in p.read_text().splitlines() if ": error: " in ln]


def no_worker_traceback(logs: Path) -> bool:
    """Our processes print one line, never a traceback (torchrun's own agent report may follow)."""
    return not any(f'File "{REPO / "guard_fast"}' in p.read_text() for p in logs.glob("*.log"))


def weights(run: Path, name: str = "teacher.pt") -> dict[str, torch.Tensor]:
    return torch.load(run / name, weights_only=True)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_losses(run: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["reg"]) for r in metrics(run) if "loss" in r]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> int:
    """Block until metrics.jsonl shows a training step >= `step`; the newest step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before the signal could be sent"
        try:
            steps = [r["step"] for r in metrics(run) if "loss" in r]
        except (OSError, ValueError):
            steps = []
        if steps and max(steps) >= step:
            return max(steps)
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def workers(agent: subprocess.Popen) -> list[int]:
    """The agent's worker processes (torchrun starts each in its own session)."""
    return [int(p) for p in Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()]


@pytest.fixture(scope="module")
def data(digits_subset, tmp_path_factory) -> dict[str, Path]:
    """The digits subset (10 classes x 8 train / 2 val) as an ImageFolder and as .beton files."""
    from guard_fast.data.ffcv_backend import write_beton

    folder = digits_subset(8, 2)
    beton = tmp_path_factory.mktemp("beton")
    for split in ("train", "val"):
        write_beton(folder / split, beton / f"{split}.beton", workers=1)
    return {"torch": folder, "ffcv": beton}


@pytest.fixture(scope="module")
def squeezed(data, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Uninterrupted squeezes: {(backend, '2x1' | '1x2'): run folder}. Both layouts run at the same time."""
    root = tmp_path_factory.mktemp("squeezed")
    runs = {}
    for backend, extra in BACKENDS.items():
        args = [*SQUEEZE, *extra, f"--data.path={data[backend]}"]
        two, one = root / f"{backend}-2x1", root / f"{backend}-1x2"
        logs = root / f"logs-{backend}"
        procs = two_nodes("launchers/squeeze.py", [[*args, f"--output.dir={two}", "--output.loggers=tensorboard,csv"]]
                          * 2, logs / "2x1")
        procs.append(one_node("launchers/squeeze.py", [*args, f"--output.dir={one}"], logs / "1x2"))
        ok(procs, logs)
        runs[backend, "2x1"], runs[backend, "1x2"] = two, one
    return runs


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_squeeze_two_nodes_equal_one_node(squeezed, backend):
    """torch backend: bit for bit. ffcv: FFCV draws its train crops and flips from numba's unseeded thread-local RNG,
    so two identical runs already differ (data/ffcv_backend.py); there the schedule and layout must agree (its
    deterministic val path is compared bit for bit by the evaluate test below)."""
    two, one = squeezed[backend, "2x1"], squeezed[backend, "1x2"]
    if backend == "torch":
        assert_same_weights(weights(two), weights(one))
        assert train_losses(two) == train_losses(one)
    schedule = [[(r["step"], r["epoch"], r["lr"]) for r in metrics(run) if "loss" in r] for run in (two, one)]
    assert schedule[0] == schedule[1] and len(schedule[0]) == 20
    line = [r for r in metrics(two) if "loss" in r][5]
    assert line["world_size"] == 2 and line["images_per_s"] > 0 and line["step_time_s"] > 0
    assert 0 < line["peak_memory_gib"] < 64
    cluster = json.loads((two / "environment.json").read_text())["cluster"]
    assert cluster["world_size"] == 2 and [r["rank"] for r in cluster["ranks"]] == [0, 1]
    assert all(r["host"] and r["torch_threads"] == 1 for r in cluster["ranks"])
    assert len(list((two / "tensorboard").glob("events.out.tfevents.*"))) == 1
    csv_steps = {int(r.split(",")[1]) for r in (two / "metrics.csv").read_text().splitlines()[1:]}
    assert csv_steps == set(range(1, 21))
    latest = json.loads((two / "checkpoints/latest.json").read_text())
    assert (latest["world_size"], latest["global_batch"], latest["step"]) == (2, 16, 20)
    assert sorted(p.name for p in (two / "checkpoints" / latest["tag"]).glob("rank*.pt")) == ["rank0.pt", "rank1.pt"]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_evaluate_two_nodes_equal_one_node(squeezed, data, backend, tmp_path):
    """A second stage: sharded robust evaluation (PGD seeded per global batch), counts gathered over ranks."""
    args = ["--model.width=4", "--data.image_size=16", "--data.eval_batch_size=4", *BACKENDS[backend],
            f"--data.path={data[backend]}", f"--checkpoints={squeezed[backend, '1x2'] / 'teacher.pt'}",
            "--attack.names=pgd100", "--attack.eps=8/255", "--attack.pgd_steps=2", "--output.progress=false",
            "--dist.cpu_threads=1"]
    procs = two_nodes("launchers/evaluate.py", [[*args, f"--output.dir={tmp_path / '2x1'}"]] * 2, tmp_path / "l2")
    procs.append(one_node("launchers/evaluate.py", [*args, f"--output.dir={tmp_path / '1x2'}"], tmp_path / "l1"))
    ok(procs, tmp_path)

    def counts(run: Path) -> list[tuple]:
        rows = json.loads((run / "evaluation.json").read_text())["checkpoints"][0]["results"]
        return [(r["attack"], r["correct"], r["total"]) for r in rows]

    assert counts(tmp_path / "2x1") == counts(tmp_path / "1x2")
    assert counts(tmp_path / "2x1")[0][2] == 20  # every val image once over both nodes


def test_node_local_output_is_refused_on_every_node(data, tmp_path):
    """Each node writes under its own folder (what a node-local disk gives): both stop, one line each."""
    args = [*SQUEEZE, *BACKENDS["torch"], f"--data.path={data['torch']}"]
    procs = two_nodes("launchers/squeeze.py", [[*args, f"--output.dir={tmp_path / f'disk{i}' / 'run'}"]
                                               for i in range(2)], tmp_path / "logs")
    assert finish(procs, timeout=120) == [1, 1]
    lines = error_lines(tmp_path / "logs")
    assert len(lines) == 2 and all("output.dir must be on a filesystem shared by all nodes" in ln for ln in lines)
    assert "rank 1 (host" in lines[0] and no_worker_traceback(tmp_path / "logs")
    assert not (tmp_path / "disk0").exists() and not (tmp_path / "disk1").exists()  # nothing left behind


def test_setup_error_on_one_node_stops_both(data, tmp_path):
    """Node 1 lacks the data (a node-local data.path): rank 0 hears rank 1's error instead of waiting for it."""
    base = [*SQUEEZE, *BACKENDS["torch"], f"--output.dir={tmp_path / 'run'}"]
    procs = two_nodes("launchers/squeeze.py", [[*base, f"--data.path={data['torch']}"],
                                               [*base, f"--data.path={tmp_path / 'missing'}"]], tmp_path / "logs")
    assert finish(procs, timeout=120) == [1, 1]
    lines = error_lines(tmp_path / "logs")
    assert len(lines) == 2 and all(f"{tmp_path / 'missing' / 'train'} not found" in ln for ln in lines), lines
    assert any("rank 1 (host" in ln and "failed" in ln for ln in lines) and no_worker_traceback(tmp_path / "logs")


def test_killed_rank_ends_both_agents_in_bounded_time(data, tmp_path):
    run, logs = tmp_path / "run", tmp_path / "logs"
    args = [*SQUEEZE, *BACKENDS["torch"], f"--data.path={data['torch']}", f"--output.dir={run}",
            "--optim.epochs=50", "--dist.timeout_s=300"]
    procs = two_nodes("launchers/squeeze.py", [args, args], logs)
    wait_for_step(run, 2, procs[0])
    killed = time.monotonic()
    for w in workers(procs[1]):
        os.kill(w, signal.SIGKILL)
    codes = finish(procs, timeout=60)
    assert all(c != 0 for c in codes) and time.monotonic() - killed < 60  # well under dist.timeout_s
    lines = error_lines(logs)
    assert len(lines) == 1 and "rank 0 (host" in lines[0] and "lost the other ranks" in lines[0], lines
    assert no_worker_traceback(logs)


def test_unresponsive_rank_ends_the_job_within_timeout(data, tmp_path):
    """A rank that stops answering but keeps its sockets open (a hung node; a lost link looks the same to the
    others) ends the job within dist.timeout_s: DeepSpeed's own gradient group included (runtime/engine.py)."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    args = [*SQUEEZE, *BACKENDS["torch"], f"--data.path={data['torch']}", f"--output.dir={run}",
            "--optim.epochs=50", "--dist.timeout_s=20"]
    procs = two_nodes("launchers/squeeze.py", [args, args], logs)
    wait_for_step(run, 2, procs[0])
    stopped = workers(procs[1])
    for w in stopped:
        os.kill(w, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        while not error_lines(logs) and time.monotonic() - t0 < 120:
            time.sleep(0.2)
        waited = time.monotonic() - t0
    finally:
        for w in stopped:
            os.kill(w, signal.SIGKILL)
        finish(procs, timeout=120)
    lines = error_lines(logs)
    assert len(lines) == 1 and "rank 0 (host" in lines[0] and "no answer within dist.timeout_s" in lines[0], lines
    assert waited < 20 + 30  # the timeout plus this loaded machine's slack, not torch's 30 minutes


def test_sigterm_then_kill_then_resume_equals_uninterrupted(squeezed, data, tmp_path):
    """SIGTERM to the agent (what SLURM sends at the time limit): both ranks agree on a step, checkpoint it and stop.
    The resumed run is then SIGKILLed (no warning) and resumed from its newest periodic checkpoint. The end equals
    the uninterrupted 1 x 2 run bit for bit under `guard`, whose eval-mode forwards read each rank's BatchNorm
    statistics."""
    run = tmp_path / "run"
    args = [*SQUEEZE, *BACKENDS["torch"], f"--data.path={data['torch']}", f"--output.dir={run}"]
    agent = one_node("launchers/squeeze.py", args, tmp_path / "a")
    wait_for_step(run, 3, agent)
    agent.send_signal(signal.SIGTERM)
    assert finish([agent], timeout=60) != [0]
    latest = json.loads((run / "checkpoints/latest.json").read_text())
    lines = error_lines(tmp_path / "a")
    assert len(lines) == 2 and all(f"stopped by SIGTERM after step {latest['step']}: checkpoint {latest['tag']}"
                                   in ln for ln in lines), lines
    assert 3 <= latest["step"] < 20 and no_worker_traceback(tmp_path / "a")

    agent = one_node("launchers/squeeze.py", [*args, "--resume"], tmp_path / "b")
    wait_for_step(run, latest["step"] + 3, agent)
    for w in workers(agent):
        os.kill(w, signal.SIGKILL)
    finish([agent], timeout=60)
    assert not (run / "teacher.pt").exists()

    ok([one_node("launchers/squeeze.py", [*args, "--resume"], tmp_path / "c")], tmp_path / "c")
    reference = squeezed["torch", "1x2"]
    assert_same_weights(weights(run), weights(reference))
    assert train_losses(run) == train_losses(reference)  # every step logged once, cut back at each resume


def test_resume_on_another_world_size_is_refused(squeezed, data, tmp_path):
    """A 2-rank checkpoint resumed by 1 process: one line, exit 1, the checkpoint untouched (docs/cluster.md)."""
    run = tmp_path / "run"
    shutil.copytree(squeezed["torch", "1x2"], run)
    before = (run / "checkpoints/latest.json").read_text()
    r = subprocess.run([PYTHON, str(REPO / "launchers/squeeze.py"), *SQUEEZE, *BACKENDS["torch"],
                        f"--data.path={data['torch']}", f"--output.dir={run}", "--resume"], capture_output=True,
                       text=True, env=subprocess_env(), cwd=REPO, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ": error: " in ln]
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "was written by 2 rank(s) with a global batch of 16; this run has 1 rank(s) and a global batch of 8" \
        in lines[0]
    assert (run / "checkpoints/latest.json").read_text() == before
