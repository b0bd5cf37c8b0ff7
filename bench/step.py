"""Time per training iteration and peak memory of every squeeze objective, measured side by side in one process.

A training iteration is what squeeze does per batch: `loss, stats = objective(model, x, y)`, backward, optimizer step,
zero_grad. Every method shares ONE model and ONE optimizer (so parameters, gradients and optimizer state count the
same for all of them in the memory figures) and a fixed synthetic batch (uniform pixels, random labels: the loader is
benchmarked separately). Methods run interleaved: each repetition runs one step of every method in a fixed order, so
machine drift (other jobs on a shared CPU, GPU clocks) hits them alike.

Per method: `warmup` discarded steps (compilation happens in the first), the last of them measured for memory, then
`reps` timed steps.
- Time: CUDA events around the step on CUDA (one host sync per sample, to read the timer), `time.perf_counter` on CPU.
- Memory on CUDA: `torch.cuda.max_memory_allocated` over the memory step, the peak reset just before it.
- Memory on CPU: torch has no allocator statistics for CPU, so the memory step runs under the profiler with
  `profile_memory=True`, whose allocator events (+bytes / -bytes, time-stamped) give the exact curve of live tensor
  bytes during the step; its peak plus the bytes live at the step's start (parameters, buffers, optimizer state, the
  batch) is the CPU analogue of max_memory_allocated. It is deterministic for a given op sequence (unlike RSS, which
  also counts the interpreter, libraries and allocator caching, and would need a process per method to reset) and
  counts what the method holds, not how the allocator behaves. It misses scratch memory that oneDNN allocates
  outside torch's allocator; that scratch is small and similar for all methods.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm import tqdm

from guard_fast.models import Classifier, ModelConfig, build_model
from guard_fast.regularizers.objectives import (
    BN_STATS,
    DOUBLE_BACKWARD,
    GUARD_STRATEGIES,
    OBJECTIVES,
    ObjectiveConfig,
    build_objective,
)
from guard_fast.runtime.config import DistConfig
from guard_fast.runtime.errors import ConfigError

DEFAULT_METHODS = ["none", "guard", "guard-curvature", "grad-norm", "pgd-at", "fgsm-rs", "trades"]
BN_STATS_OBJECTIVES = ("guard", "guard-curvature", "grad-norm")  # objectives whose rows depend on bench.bn_stats
VARIANTS = ("eager", "compiled")
MIB = 2**20


@dataclass
class BenchSection:
    objectives: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    """objectives to measure, in this order within each repetition (none is always measured: ratios refer to it)"""
    guard_strategies: list[str] = field(default_factory=list)
    """strategies of the guard objective, one row each; empty = every registered strategy"""
    bn_stats: list[str] = field(default_factory=lambda: ["updated"])
    """BatchNorm statistics of the regularizers (objective.bn_stats: updated, snapshot), one row per value for guard,
    guard-curvature and grad-norm"""
    pgd_steps: list[int] = field(default_factory=lambda: [10])
    """attack steps K of pgd-at, one row per K"""
    variants: list[str] = field(default_factory=lambda: ["eager"])
    """eager and/or compiled (torch.compile of the model body; objectives needing double backward stay eager-only)"""
    image_size: int = 32
    """side of the square synthetic input, pixels"""
    num_classes: int = 10
    """classes of the synthetic labels (the width of the last layer)"""
    batch_size: int = 64
    """images per rank per step"""
    warmup: int = 1
    """discarded steps per method before timing (compilation happens in the first); the last is the memory step"""
    reps: int = 3
    """timed steps per method; each repetition runs every method once (interleaved)"""
    threads: int = 0
    """CPU torch threads during the measurement (0 = what init_distributed set: the cores per rank)"""
    cpu_timer: str = "wall"
    """CPU only: wall (time.perf_counter) or process (time.process_time, CPU seconds of this process: on a shared
    machine it leaves out the time spent waiting for a core; use one torch thread, or spinning threads count too)"""
    lr: float = 0.01
    """SGD learning rate of the benchmarked step (momentum 0.9): irrelevant to speed, kept small so weights stay sane"""
    name: str = ""
    """stem of the result files; empty = bench-<device>-<arch>-<size>px-b<batch>-<precision>[-<world>ranks]"""
    out_dir: str = "bench/results"
    """folder of the JSON, Markdown and PNG results"""
    plot: bool = True
    """also write a PNG bar chart (time/iter and peak memory per method with ratio labels)"""

    def validate(self) -> None:
        unknown = [m for m in self.objectives if m not in OBJECTIVES]
        if unknown:
            raise ConfigError(f"bench.objectives: unknown {unknown}; valid: {', '.join(OBJECTIVES)}")
        bad = [s for s in self.guard_strategies if s not in GUARD_STRATEGIES]
        if bad:
            raise ConfigError(f"bench.guard_strategies: unknown {bad}; valid: {', '.join(GUARD_STRATEGIES)}")
        if not self.bn_stats or any(m not in BN_STATS for m in self.bn_stats):
            raise ConfigError(f"bench.bn_stats = {self.bn_stats}: choose one or more of {', '.join(BN_STATS)}")
        bad_v = [v for v in self.variants if v not in VARIANTS]
        if bad_v or not self.variants:
            raise ConfigError(f"bench.variants = {self.variants}: choose one or more of {', '.join(VARIANTS)}")
        if any(k < 1 for k in self.pgd_steps) or not self.pgd_steps:
            raise ConfigError(f"bench.pgd_steps = {self.pgd_steps}: give one or more step counts >= 1")
        if self.warmup < 1 or self.reps < 1:
            raise ConfigError("bench.warmup and bench.reps must be >= 1 (the last warm-up step measures memory)")
        if "compiled" in self.variants and self.warmup < 2:
            raise ConfigError("bench.warmup must be >= 2 with the compiled variant, so that the memory step is "
                              "not the compiling one")
        if self.threads < 0:
            raise ConfigError("bench.threads must be >= 0 (0 = the cores per rank)")
        if self.cpu_timer not in ("wall", "process"):
            raise ConfigError(f"bench.cpu_timer = {self.cpu_timer!r}: valid values are wall, process")
        if self.image_size < 8 or self.batch_size < 1 or self.num_classes < 2:
            raise ConfigError("bench.image_size >= 8, bench.batch_size >= 1 and bench.num_classes >= 2 required")


@dataclass
class BenchConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """network (arch, width, channels_last); model.compile is not used here: set bench.variants instead"""
    dist: DistConfig = field(default_factory=DistConfig)
    """device, precision (fp32 or bf16 autocast), DeepSpeed ZeRO stage for the multi-rank mode, seed"""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """hyperparameters shared by all methods (eps, beta, h, ...); the name, guard strategy and PGD steps are set per
    row from the bench section"""
    bench: BenchSection = field(default_factory=BenchSection)
    """what to measure and how often"""

    def validate(self) -> None:
        if self.model.compile:
            raise ConfigError("model.compile is not used by the benchmark; list bench.variants = [\"eager\", "
                              "\"compiled\"] to measure both")


@dataclass(frozen=True)
class Method:
    """One row of the benchmark: an objective configuration and whether the model body is compiled."""

    label: str  # "guard[reuse,updated]", "pgd-at[K=10]+compile"
    objective: str  # objective name, a key of OBJECTIVES
    variant: str  # eager | compiled
    cfg: ObjectiveConfig
    bn_stats: str | None = None  # the regularizer's BatchNorm statistics; None for objectives without a regularizer

    @property
    def strategy(self) -> str | None:
        return self.cfg.strategy if self.objective == "guard" else None


def expand_methods(cfg: BenchConfig) -> tuple[list[Method], list[str]]:
    """Rows to measure, in run order, and a note per skipped (objective, variant) pair."""
    names = ["none"] + [m for m in cfg.bench.objectives if m != "none"]
    strategies = cfg.bench.guard_strategies or list(GUARD_STRATEGIES)
    rows: list[Method] = []
    skipped: list[str] = []
    for variant in cfg.bench.variants:
        suffix = "+compile" if variant == "compiled" else ""
        for name in names:
            if variant == "compiled" and name in DOUBLE_BACKWARD:
                skipped.append(f"{name}{suffix}: needs double backward, which torch.compile cannot compile")
                continue
            base = dataclasses.replace(cfg.objective, name=name)
            if name in BN_STATS_OBJECTIVES:
                for bn in cfg.bench.bn_stats:
                    with_bn = dataclasses.replace(base, bn_stats=bn)
                    if name == "guard":
                        rows += [Method(f"guard[{s},{bn}]{suffix}", name, variant,
                                        dataclasses.replace(with_bn, strategy=s), bn) for s in strategies]
                    else:
                        rows.append(Method(f"{name}[{bn}]{suffix}", name, variant, with_bn, bn))
            elif name == "pgd-at":
                rows += [Method(f"pgd-at[K={k}]{suffix}", name, variant, dataclasses.replace(base, steps=k))
                         for k in cfg.bench.pgd_steps]
            else:
                rows.append(Method(f"{name}{suffix}", name, variant, base))
    return rows, skipped


def compiled_view(model: Classifier) -> Classifier:
    """A Classifier sharing `model`'s parameters whose body is torch.compile'd (objectives call `.body` directly, so
    the body is what must be compiled). Sharing keeps one set of weights, gradients and optimizer state for all rows."""
    view = Classifier(torch.compile(model.body), model.mean.flatten().tolist(), model.std.flatten().tolist())
    return view.to(model.mean.device)


class StepRunner:
    """One training iteration of one method: objective, backward, optimizer step, zero_grad."""

    def __init__(self, method: Method, model: Classifier, optimizer: torch.optim.Optimizer | None, engine: Any,
                 precision: str, device: torch.device):
        self.method = method
        self.model = model
        self.objective = build_objective(method.cfg)
        self.optimizer = optimizer
        self.engine = engine  # DeepSpeed engine in the multi-rank mode, else None (plain torch SGD step)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                         else contextlib.nullcontext())

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with self.autocast:
            loss, _ = self.objective(self.model, x, y)  # stats unused: no host sync in the step
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()  # also zeroes the gradients
        else:
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def time_step(fn: Callable[[], None], device: torch.device, cpu_timer: str = "wall") -> float:
    """Seconds of one call: CUDA events on CUDA (synchronizes once to read them), on CPU perf_counter (wall) or
    process_time (CPU seconds of this process)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()  # host sync: the measurement itself
        return start.elapsed_time(end) / 1e3
    clock = time.process_time if cpu_timer == "process" else time.perf_counter
    t0 = clock()
    fn()
    return clock() - t0


def live_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and shared parameters counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _profiled_peak_bytes(fn: Callable[[], None]) -> int:
    """Peak of live tensor bytes allocated during `fn`, above those live at its start, from the CPU profiler's
    allocator events (each a signed byte count with a timestamp)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def memory_step(fn: Callable[[], None], device: torch.device, static: int) -> dict[str, float]:
    """Run one step and return its peak memory in MiB (`static`: bytes live at the step's start, used on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mib": peak / MIB, "static_mib": base / MIB, "step_mib": (peak - base) / MIB}
    step = _profiled_peak_bytes(fn)
    return {"peak_mib": (static + step) / MIB, "static_mib": static / MIB, "step_mib": step / MIB}


def run_benchmark(cfg: BenchConfig, device: torch.device, engine_factory: Callable | None = None,
                  show_progress: bool = True) -> dict[str, Any]:
    """Measure every row of `expand_methods(cfg)` on `device`; returns raw per-row samples for this rank.

    engine_factory(model, optimizer) -> DeepSpeed engine, given in the multi-rank mode; None = plain torch steps."""
    b = cfg.bench
    if b.threads and device.type == "cpu":
        torch.set_num_threads(b.threads)
    torch.manual_seed(cfg.dist.seed)
    model = build_model(cfg.model.arch, b.num_classes, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                        width=cfg.model.width).to(device)
    if cfg.model.channels_last:  # as the stages do: channels_last inputs, contiguous weights (DeepSpeed needs them)
        model.channels_last = True
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    optimizer = torch.optim.SGD(model.parameters(), lr=b.lr, momentum=0.9)
    engine = engine_factory(model, optimizer) if engine_factory is not None else None
    gen = torch.Generator().manual_seed(cfg.dist.seed)
    x = torch.rand(b.batch_size, 3, b.image_size, b.image_size, generator=gen).to(device, memory_format=fmt)
    y = torch.randint(0, b.num_classes, (b.batch_size,), generator=gen).to(device)

    rows, skipped = expand_methods(cfg)
    views = {"eager": model}
    if "compiled" in b.variants:
        views["compiled"] = compiled_view(model)
    runners = [StepRunner(m, views[m.variant], optimizer, engine, cfg.dist.precision, device) for m in rows]

    # One plain step first, so the optimizer state (momentum) exists before any method is measured and counts as
    # static memory for all of them alike.
    runners[0](x, y)
    samples: dict[str, list[float]] = {m.label: [] for m in rows}
    memory: dict[str, dict[str, float]] = {}
    errors: dict[str, str] = {}
    total = (b.warmup + b.reps) * len(rows)
    with tqdm(total=total, desc="bench", disable=not show_progress, dynamic_ncols=True) as bar:
        for rep in range(b.warmup + b.reps):
            for runner in runners:
                label = runner.method.label
                bar.set_postfix_str(label)
                bar.update()
                if label in errors:
                    continue
                step = lambda r=runner: r(x, y)  # noqa: E731
                try:
                    if rep == b.warmup - 1:
                        static = live_bytes([*model.parameters(), *model.buffers(), x, y,
                                             *_optimizer_tensors(optimizer, engine)])
                        memory[label] = memory_step(step, device, static)
                    elif rep < b.warmup:
                        step()
                    else:
                        samples[label].append(time_step(step, device, b.cpu_timer))
                except Exception as e:  # one failing method must not lose the other rows' figures
                    errors[label] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return {"rows": rows, "skipped": skipped, "samples": samples, "memory": memory, "errors": errors}


def _optimizer_tensors(optimizer: torch.optim.Optimizer, engine: Any) -> list[torch.Tensor]:
    opt = engine.optimizer if engine is not None else optimizer
    state = getattr(opt, "state", {})
    return [v for s in state.values() if isinstance(s, dict) for v in s.values() if isinstance(v, torch.Tensor)]
