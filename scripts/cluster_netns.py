"""Two simulated nodes on one machine: network namespaces joined by a veth pair, each node with its own hostname
(UTS namespace) and, where an experiment asks, its own disk (a tmpfs mounted in that node's mount namespace over the
same path). One torchrun agent per node, c10d rendezvous on node A, gloo on CPU, tiny digits squeezes.

Reruns the failure experiments of issue 28 and prints a Markdown table (docs/cluster.md quotes the last one). Times
count from the event (the kill, the link going down, the signal) or from the start where there is none.

    sudo .venv/bin/python scripts/cluster_netns.py [--out bench/results/cluster-netns]

Needs root, iproute2 (`ip netns`) and util-linux (`unshare`); not part of `make test`. Minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NODES = {"A": "10.77.0.1", "B": "10.77.0.2"}
TIMEOUT_S = 30
"""dist.timeout_s of every run: a lost node must end the job within this (plus start-up and exit)"""
TINY = ["--config", "configs/digits/squeeze.toml", "--model.width=4", "--data.image_size=16", "--data.batch_size=8",
        "--data.eval_batch_size=64", "--data.workers=0", "--optim.epochs=4", "--optim.warmup_epochs=0.5",
        "--optim.lr=0.05", "--output.log_every=1", "--output.ckpt_every=2", "--output.progress=false",
        "--objective.name=guard", "--objective.beta=0.5", "--val_batches=1", "--dist.cpu_threads=1",
        f"--dist.timeout_s={TIMEOUT_S}"]


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def setup_network() -> None:
    teardown_network()
    for n in NODES:
        sh("ip", "netns", "add", f"gf{n}")
        sh("ip", "-n", f"gf{n}", "link", "set", "lo", "up")
    sh("ip", "link", "add", "gfvA", "netns", "gfA", "type", "veth", "peer", "name", "gfvB", "netns", "gfB")
    for n, addr in NODES.items():
        sh("ip", "-n", f"gf{n}", "addr", "add", f"{addr}/24", "dev", f"gfv{n}")
        sh("ip", "-n", f"gf{n}", "link", "set", f"gfv{n}", "up")


def teardown_network() -> None:
    for n in NODES:
        subprocess.run(["ip", "netns", "del", f"gf{n}"], stderr=subprocess.DEVNULL)


def node(n: str, args: list[str], log: Path, port: int, *, private: str = "", ifname: bool = True) -> subprocess.Popen:
    """A torchrun agent (one process) in node n's namespaces, named node<n> with its own /etc/hosts; `private`: a
    path that gets node n's own tmpfs. ifname=False: no GLOO_SOCKET_IFNAME and an /etc/hosts that maps the node's own
    name to 127.0.0.1 (Debian's default), so gloo advertises loopback to the other node."""
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PATH": os.environ["PATH"]}
    if ifname:
        env["GLOO_SOCKET_IFNAME"] = f"gfv{n}"
    hosts = log.parent / f"hosts-{n}"
    hosts.write_text("127.0.0.1 localhost\n" + "".join(
        f"{'127.0.0.1' if (m == n and not ifname) else addr} node{m}\n" for m, addr in NODES.items()))
    # ifname=False: static rendezvous (--node_rank/--master_addr, as `deepspeed --no_ssh` does): c10d's would already
    # fail in the agents, which look for the endpoint among their own hostname's addresses
    rdzv = (["--rdzv_backend", "c10d", "--rdzv_endpoint", f"{NODES['A']}:{port}", "--rdzv_id", "netns"] if ifname
            else ["--node_rank", str(list(NODES).index(n)), "--master_addr", NODES["A"], "--master_port", str(port)])
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", *rdzv,
              "launchers/squeeze.py", *args]
    inner = f"hostname node{n}; mount --bind {shlex.quote(str(hosts))} /etc/hosts; "
    if private:
        inner += f"mount -t tmpfs tmpfs {shlex.quote(private)}; "
    inner += f"cd {shlex.quote(str(REPO))}; exec env -i " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    inner += " " + shlex.join(launch)
    cmd = ["ip", "netns", "exec", f"gf{n}", "unshare", "--uts", "--mount", "--propagation", "private",
           "sh", "-c", inner]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def watch(procs: list[subprocess.Popen], logs: list[Path], since: float, grace: float = 90,
          limit: float = 600) -> tuple[list[int | None], list[float | None], list[float | None]]:
    """Wait for both agents: (exit codes, seconds until each node's worker printed its error line or its agent
    ended, seconds until each agent ended). An agent still running `grace` s after both nodes' workers were done
    (torchrun's agent waits on the rendezvous store across a downed link) is killed: its exit code reads None."""
    n = len(procs)
    done: list[float | None] = [None] * n
    ended: list[float | None] = [None] * n
    while True:
        now = time.monotonic() - since
        for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
            if ended[i] is None and p.poll() is not None:
                ended[i] = round(now, 1)
            if done[i] is None and (ended[i] is not None or ": error: " in log.read_text()):
                done[i] = round(now, 1)
        if all(e is not None for e in ended):
            break
        if now > limit or (all(d is not None for d in done) and now - max(done) > grace):  # type: ignore[type-var]
            for i, p in enumerate(procs):
                if ended[i] is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            break
        time.sleep(0.2)
    return [p.returncode if e is not None else None for p, e in zip(procs, ended, strict=True)], done, ended


def newest_step(run: Path) -> int:
    try:
        return max((json.loads(x).get("step", 0) for x in (run / "metrics.jsonl").read_text().splitlines()),
                   default=0)
    except (OSError, ValueError):
        return 0


def wait_step(run: Path, step: int, procs: list[subprocess.Popen]) -> None:
    while newest_step(run) < step:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"the run ended before step {step}")
        time.sleep(0.05)


def worker_pids(agent: int) -> list[int]:
    """The agent's workers (`ip netns exec`, unshare and sh exec into the agent, so its pid is the Popen's)."""
    return [int(p) for p in Path(f"/proc/{agent}/task/{agent}/children").read_text().split()]


def lines(logs: list[Path]) -> list[str]:
    return [ln.split(": error: ", 1)[1] for log in logs for ln in log.read_text().splitlines() if ": error: " in ln]


def tracebacks(logs: list[Path]) -> int:
    return sum(log.read_text().count(f'File "{REPO / "guard_fast"}') for log in logs)


def experiment(name: str, root: Path, data: Path, port: int, *, action=None, b_data: Path | None = None,
               private_b: str = "", ifname: bool = True, extra: list[str] | None = None, run: Path | None = None
               ) -> dict:
    """Both nodes run the same squeeze (node B on `b_data` if given); `action(run, procs)` is the event."""
    folder = root / name
    folder.mkdir(parents=True)
    run = run or folder / "run"
    args = [*TINY, f"--output.dir={run}", *(extra or [])]
    logs = [folder / "nodeA.log", folder / "nodeB.log"]
    procs = [node("A", [*args, f"--data.path={data}"], logs[0], port, ifname=ifname),
             node("B", [*args, f"--data.path={b_data or data}"], logs[1], port, private=private_b, ifname=ifname)]
    acted = time.monotonic()
    if action is not None:
        action(run, procs)
        acted = time.monotonic()
    codes, done, ended = watch(procs, logs, acted)
    return {"experiment": name, "exit_codes": codes, "workers_done_s": done, "agents_ended_s": ended,
            "lines": lines(logs), "tracebacks": tracebacks(logs), "step": newest_step(run),
            "teacher": (run / "teacher.pt").exists(), "run": str(run)}


def link_down(run: Path, procs: list[subprocess.Popen]) -> None:
    wait_step(run, 3, procs)
    sh("ip", "-n", "gfB", "link", "set", "gfvB", "down")


def kill_b(run: Path, procs: list[subprocess.Popen]) -> None:
    wait_step(run, 3, procs)
    for pid in worker_pids(procs[1].pid):
        os.kill(pid, signal.SIGKILL)


def sigterm_both(run: Path, procs: list[subprocess.Popen]) -> None:
    wait_step(run, 3, procs)
    for p in procs:  # what SLURM does at the time limit: every task of the step gets SIGTERM
        for pid in worker_pids(p.pid):
            os.kill(pid, signal.SIGTERM)


def same_weights(a: str, b: str) -> bool:
    import torch

    x, y = (torch.load(Path(p) / "teacher.pt", weights_only=True) for p in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def run_all(root: Path) -> list[dict]:
    from guard_fast.data.digits import prepare_digits
    from tests.conftest import copy_subset

    prepare_digits(root / "digits", size=32, val_fraction=0.2, seed=0)
    data = copy_subset(root / "digits", root / "small", {"train": 8, "val": 2})
    (root / "nodata").mkdir()
    port = 29700
    base = experiment("shared disk (baseline)", root, data, port)
    rows = [base]
    name = "separate disks (node-local output.dir)"
    rows.append(experiment(name, root, data, port + 1, private_b=str(root / name)))
    rows.append(experiment("node B lacks the data (node-local data.path)", root, data, port + 2,
                           private_b=str(root / "nodata"), b_data=root / "nodata" / "small"))
    rows.append(experiment("rank on node B killed", root, data, port + 3, action=kill_b, extra=["--optim.epochs=50"]))
    rows.append(experiment("link down", root, data, port + 4, action=link_down, extra=["--optim.epochs=50"]))
    sh("ip", "-n", "gfB", "link", "set", "gfvB", "up")
    rows.append(experiment("own hostname resolves to 127.0.0.1, no GLOO_SOCKET_IFNAME", root, data, port + 5,
                           ifname=False))
    stopped = experiment("SIGTERM to every rank", root, data, port + 6, action=sigterm_both)
    rows.append(stopped)
    resumed = experiment("... then --resume to the end", root, data, port + 7, extra=["--resume"],
                         run=Path(stopped["run"]))
    resumed["same_weights_as_baseline"] = resumed["teacher"] and same_weights(resumed["run"], base["run"])
    rows.append(resumed)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| experiment | exit codes (A, B) | s to each node's error line / exit (A, B) | s to agents' exit (A, B) | "
           "worker tracebacks | newest step | outcome |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        msgs = "<br>".join(sorted({ln[:170] for ln in r["lines"]}))
        if r["teacher"]:
            msgs = "finished" + ("; weights == baseline bit for bit" if r.get("same_weights_as_baseline") else "")
        agents = ", ".join("killed" if e is None else str(e) for e in r["agents_ended_s"])
        out.append(f"| {r['experiment']} | {r['exit_codes']} | {r['workers_done_s']} | {agents} | {r['tracebacks']} "
                   f"| {r['step']} | {msgs} |")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/cluster-netns")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("cluster_netns: needs root (ip netns, mount)", file=sys.stderr)
        return 2
    setup_network()
    try:
        with tempfile.TemporaryDirectory(prefix="guard-fast-netns-") as tmp:
            rows = json.loads(json.dumps(run_all(Path(tmp))).replace(tmp, "<tmp>"))  # no machine paths in results
    finally:
        teardown_network()
    text = table(rows)
    print(text)
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    out.with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
