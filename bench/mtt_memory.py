"""Peak memory and time per distillation iteration of MTT vs TESLA as syn_steps grows, in one run.

    python -m bench.mtt_memory [--steps 10 20 40 80] [--width 8] [--ipc 10] [--batch-syn 10] [--iters 3]

Each (method, syn_steps) runs in a fresh subprocess (so one setting's allocations cannot hide another's): a ConvNet
(depth 3, `--width`, 32 px, 10 classes), random start/target parameters, IPC x 10 random synthetic images, DSA on
every minibatch, then `--iters` iterations of the gradient computation (guard_fast/distill/matching.py: mtt_grads or
tesla_grads), after one discarded 1-step warm-up iteration (library and allocator start-up). Memory, per measured
iteration: on CUDA torch.cuda.max_memory_allocated minus the allocation before it; on CPU the process's RSS sampled
every millisecond by a thread (/proc/self/statm) during the iteration, peak minus the RSS right before it, i.e. what
the iteration added on top of the model, images and parameters; the largest over the iterations is reported. Time:
median and p20-p80 over the measured iterations, wall clock and process CPU time (the CPU time is the steadier number
on a shared machine). Writes results/mtt-tesla-memory.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch

from bench.common import RESULTS, summarize, write_results


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Samples this process's RSS every `interval` s in a thread between __enter__ and __exit__ (torch releases the
    GIL inside its ops, so the sampler runs while they do)."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.before = self.peak = rss_mib()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


def one_setting(method: str, syn_steps: int, width: int, ipc: int, batch_syn: int, iters: int, device: str) -> dict:
    """Runs inside the child process."""
    from guard_fast.distill.matching import GRADS, FlatNet, build_augment, plan_steps
    from guard_fast.models.convnet import ConvNet

    torch.manual_seed(0)
    dev = torch.device(device)
    net = FlatNet(ConvNet(10, width=width, depth=3, image_size=32).to(dev))
    start = net.flat()
    target = start + 0.01 * torch.randn_like(start)
    images = torch.randn(10 * ipc, 3, 32, 32, device=dev)
    labels = torch.arange(10, device=dev).repeat_interleave(ipc)
    mean = torch.full((1, 3, 1, 1), 0.3, device=dev)
    std = torch.full((1, 3, 1, 1), 0.35, device=dev)
    augment = build_augment("dsa", mean, std)
    lr = torch.tensor(0.01, device=dev)
    warm = plan_steps(len(labels), batch_syn, 1, torch.Generator().manual_seed(99), 0)
    GRADS[method](net, images, labels, lr, start, target, warm, augment)  # discarded warm-up
    walls, cpus, peaks = [], [], []
    for it in range(iters):
        steps = plan_steps(len(labels), batch_syn, syn_steps, torch.Generator().manual_seed(it), it * 1000)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        with PeakRSS() as rss:
            t0, c0 = time.perf_counter(), time.process_time()
            GRADS[method](net, images, labels, lr, start, target, steps, augment)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        if dev.type == "cuda":
            peaks.append((torch.cuda.max_memory_allocated() - before) / 2**20)
        else:
            peaks.append(rss.peak - rss.before)
    return {"method": method, "syn_steps": syn_steps, "peak_mib": max(peaks), "peaks_mib": peaks, "wall_s": walls,
            "cpu_s": cpus}


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for method in ("mtt", "tesla"):
        sub = [r for r in rows if r["method"] == method]
        xs = [r["syn_steps"] for r in sub]
        axes[0].plot(xs, [r["peak_mib"] for r in sub], "o-", label=method.upper())
        axes[1].plot(xs, [r["cpu_s"]["median"] for r in sub], "o-", label=method.upper())
    axes[0].set(xlabel="syn_steps", ylabel="peak memory added by one iteration (MiB)")
    axes[1].set(xlabel="syn_steps", ylabel="CPU seconds per iteration (median)")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mtt_memory")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40, 80])
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--batch-syn", type=int, default=10)
    p.add_argument("--iters", type=int, default=3, help="measured iterations per setting (after a 1-step warm-up)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        method, steps = a.child.split(":")
        print(json.dumps(one_setting(method, int(steps), a.width, a.ipc, a.batch_syn, a.iters, a.device)))
        return 0
    rows = []
    load = os.getloadavg()
    for steps in a.steps:  # methods interleaved per setting, so a change in machine load hits both alike
        for method in ("mtt", "tesla"):
            cmd = [sys.executable, "-m", "bench.mtt_memory", f"--child={method}:{steps}", f"--width={a.width}",
                   f"--ipc={a.ipc}", f"--batch-syn={a.batch_syn}", f"--iters={a.iters}", f"--device={a.device}"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            r["wall_s"], r["cpu_s"] = summarize(r["wall_s"]), summarize(r["cpu_s"])
            rows.append(r)
            print(f"{method} syn_steps {steps}: peak +{r['peak_mib']:.1f} MiB, cpu {r['cpu_s']['median']:.2f} s",
                  flush=True)
    by = {(r["method"], r["syn_steps"]): r for r in rows}
    lo, hi = min(a.steps), max(a.steps)
    summary = {
        "tesla_peak_growth": by[("tesla", hi)]["peak_mib"] / by[("tesla", lo)]["peak_mib"] - 1,
        "mtt_peak_growth": by[("mtt", hi)]["peak_mib"] / by[("mtt", lo)]["peak_mib"] - 1,
        "tesla_over_mtt_cpu_time": {s: by[("tesla", s)]["cpu_s"]["median"] / by[("mtt", s)]["cpu_s"]["median"]
                                    for s in a.steps},
    }
    table = [[r["method"].upper(), r["syn_steps"], round(r["peak_mib"], 1), r["cpu_s"]["median"],
              f"{r['cpu_s']['p20']:.3g}-{r['cpu_s']['p80']:.3g}", r["wall_s"]["median"]] for r in rows]
    notes = (f"Peak memory growth {lo} -> {hi} steps: TESLA {summary['tesla_peak_growth']:+.1%}, MTT "
             f"{summary['mtt_peak_growth']:+.1%}. TESLA/MTT CPU time per iteration: "
             + ", ".join(f"{s}: {v:.2f}x" for s, v in summary["tesla_over_mtt_cpu_time"].items())
             + f". Memory: {'torch.cuda.max_memory_allocated' if a.device == 'cuda' else 'RSS sampled every 1 ms'} "
             "during an iteration minus the memory before it (max over iterations), one fresh process per row, "
             "after a discarded 1-step warm-up. Load average "
             f"(1/5/15 min) at start: {tuple(round(v, 1) for v in load)} on {os.cpu_count()} cores (shared machine: "
             "wall times are contended, CPU times less so).\n\n![memory and time](mtt-tesla-memory.png)")
    config = {"steps": a.steps, "width": a.width, "ipc": a.ipc, "batch_syn": a.batch_syn, "iters": a.iters,
              "device": a.device, "network": "convnet depth 3, 32 px, 10 classes", "augment": "dsa"}
    write_results("mtt-tesla-memory", config, {"rows": rows, "summary": summary},
                  ["method", "syn_steps", "peak MiB", "CPU s/iter (median)", "CPU p20-p80", "wall s/iter"], table,
                  notes=notes, device=a.device)
    plot(rows, RESULTS / "mtt-tesla-memory.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
