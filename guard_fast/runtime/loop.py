"""What every training loop shares: construction and the loop tail.

`build_trainer` builds optimizer -> scheduler -> DeepSpeed engine -> checkpointer and resumes; the caller's loop is
then only its own forward and loss:

    for epoch, offset in trainer.epochs():
        for x, y in <this epoch's batches from offset>:
            loss, stats = ...
            trainer.engine.backward(loss)
            trainer.engine.step()
            if trainer.step_done(loss, stats, len(y)):
                return trainer.stopped()
        trainer.end_epoch(epoch)
    trainer.finish("teacher.pt", result)

`step_done` is the tail: a lazy non-finite check of the loss and every stat (one device-side `where`, read only at
log/checkpoint/finish points and agreed over ranks), progress bar, metrics at `log_every`, checkpoints at `ckpt_every`
on accumulation boundaries, `stop_after`, and a stop request (SIGTERM / SIGUSR1) agreed over ranks at an accumulation
boundary: checkpoint, then `Preempted`. Nothing is written from a non-finite state: every checkpoint and the final save
check first.

A logged line holds the global batch's loss and stats (the mean over ranks of the logged micro-step), images/s over all
ranks, seconds per micro-step and the peak memory of the busiest rank since the last line (CUDA: max allocated;
CPU: peak RSS of the process); `output.loggers` copies it to TensorBoard / CSV (runtime/metrics.py).
"""

from __future__ import annotations

import resource
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from tqdm import tqdm

from guard_fast.runtime import distributed as D
from guard_fast.runtime.checkpoint import Checkpointer
from guard_fast.runtime.config import DistConfig, OutputConfig
from guard_fast.runtime.distributed import DistInfo, StopRequest
from guard_fast.runtime.engine import OptimConfig, build_engine, build_optimizer, build_scheduler
from guard_fast.runtime.errors import GuardFastError
from guard_fast.runtime.io import atomic_json
from guard_fast.runtime.metrics import MetricSinks
from guard_fast.runtime.rundir import RunDir
from guard_fast.runtime.weights import save_checkpoint

NO_BAD = 2**62
"""first_bad's 'none yet', above any step: the ranks agree on the smallest bad step with one MIN all-reduce"""


class Preempted(GuardFastError):
    """Stopped by SIGTERM / SIGUSR1 after writing a checkpoint; `--resume` continues. Exit code 128 + SIGTERM."""

    exit_code = 128 + signal.SIGTERM


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: peak allocated since the last call (then reset); CPU: the process's peak resident set so far."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@dataclass
class Trainer:
    engine: Any
    scheduler: Any
    ckpt: Checkpointer
    run: RunDir
    info: DistInfo
    output: OutputConfig
    grad_accum: int
    steps_per_epoch: int
    """micro-steps per epoch"""
    total: int
    """micro-steps of the whole run"""
    stop_after: int
    bar: tqdm
    sinks: MetricSinks
    step: int = 0
    first_bad: torch.Tensor = field(default=None)  # type: ignore[assignment]
    """0-dim long: the first micro-step whose loss or stats were non-finite (NO_BAD = none yet); read lazily"""
    _t_log: float = field(default_factory=time.time)
    _n_log: int = 0
    _steps_log: int = 0

    def __post_init__(self) -> None:
        if self.first_bad is None:
            self.first_bad = torch.full((), NO_BAD, dtype=torch.long, device=self.info.device)

    def epochs(self) -> Iterator[tuple[int, int]]:
        """(epoch, micro-steps of it already done) until the run is complete; a resumed epoch starts at its offset."""
        while self.step < self.total:
            yield divmod(self.step, self.steps_per_epoch)

    def check_finite(self) -> None:
        """Collective: the first non-finite micro-step on any rank stops every rank with the same line."""
        bad = int(D.all_reduce_min(self.first_bad.clone()))  # host sync: only at log/checkpoint/epoch/finish points
        if bad < NO_BAD:
            last = self.ckpt.latest()
            raise GuardFastError(f"non-finite loss at step {bad} (epoch {bad // self.steps_per_epoch}); stopped. Last "
                                 f"good checkpoint: {last['tag'] if last else 'none'} in {self.ckpt.folder}")

    def log_step(self, values: torch.Tensor, names: list[str]) -> dict[str, Any]:
        """Collective: the global batch's loss and stats (mean over ranks), throughput, step time, peak memory."""
        packed = torch.cat([values, values.new_tensor([self._n_log])])  # (len(names) + 1,)
        D.all_reduce_sum(packed)
        memory = D.all_reduce_max(torch.tensor([peak_memory_gib(self.info.device)], device=self.info.device))
        totals = packed.tolist()  # host sync: log interval
        elapsed = time.time() - self._t_log
        rec = {"step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch,
               "lr": self.scheduler.get_last_lr()[0],
               **{k: v / self.info.world for k, v in zip(names, totals[:-1], strict=True)},
               "images_per_s": totals[-1] / elapsed, "step_time_s": elapsed / self._steps_log,
               "peak_memory_gib": round(float(memory), 4), "world_size": self.info.world}
        self.log(rec)
        self._t_log, self._n_log, self._steps_log = time.time(), 0, 0
        return rec

    def log(self, rec: dict[str, Any]) -> None:
        self.run.log(rec)
        self.sinks.write({"time": time.time(), **rec})

    def step_done(self, loss: torch.Tensor, stats: dict[str, torch.Tensor], images: int) -> bool:
        """Call after engine.step(); True when the run must stop now (stop_after). Raises Preempted after a
        checkpoint when any rank got SIGTERM / SIGUSR1."""
        values = torch.stack([loss.detach().float(), *(v.detach().float() for v in stats.values())])
        bad = ~torch.isfinite(values).all()
        self.first_bad = torch.where((self.first_bad == NO_BAD) & bad, self.step, self.first_bad)
        self.step += 1
        self._n_log += images
        self._steps_log += 1
        self.bar.update(1)
        if self.step % self.output.log_every == 0:
            self.check_finite()
            rec = self.log_step(values, ["loss", *stats])
            shown = {k: f"{rec[k]:.3g}" for k in ("loss", *stats)}
            self.bar.set_postfix(**shown, img_s=f"{rec['images_per_s']:.0f}", lr=f"{rec['lr']:.2e}")
        boundary = self.step % self.grad_accum == 0
        if boundary and self.output.ckpt_every and self.step % self.output.ckpt_every == 0:
            self.save()
        if boundary and (signum := StopRequest.agreed()):
            self.save()
            self.bar.close()
            StopRequest.uninstall()
            raise Preempted(f"stopped by {signal.Signals(signum).name} after step {self.step}: checkpoint "
                            f"{self.ckpt.latest()['tag']} written in {self.ckpt.folder}; rerun with --resume")
        if self.stop_after and self.step >= self.stop_after:
            self.bar.close()
            StopRequest.uninstall()
            return True
        return False

    def stopped(self) -> dict[str, Any]:
        return {"stopped_at": self.step}

    def save(self) -> None:
        """A checkpoint of the current state, only if every step so far was finite."""
        self.check_finite()
        self.ckpt.save(self.step, {"epoch": (self.step - 1) // self.steps_per_epoch})

    def end_epoch(self, epoch: int) -> None:
        """Epoch end: check, and checkpoint if on an accumulation boundary (a checkpoint mid-accumulation would lose
        the accumulated gradients)."""
        self.check_finite()
        if self.step % self.grad_accum == 0:
            self.save()

    def validation_due(self, epoch: int, every: int) -> bool:
        """Validate after the last epoch, and after every `every`-th one (0 = only the last)."""
        return epoch + 1 == self.total // self.steps_per_epoch or bool(every and (epoch + 1) % every == 0)

    def log_validation(self, epoch: int, metrics: dict[str, float]) -> None:
        self.log({"step": self.step, "epoch": epoch, **{f"val_{k}": v for k, v in metrics.items()}})
        if self.info.is_main:
            tqdm.write(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def finish(self, filename: str, result: dict[str, Any]) -> dict[str, Any]:
        """Final check, then (rank 0) the weights-only model file and result.json in the run folder."""
        self.check_finite()
        self.bar.close()
        StopRequest.uninstall()
        if self.info.is_main:
            save_checkpoint(self.engine.module, self.run.path / filename)
            atomic_json(self.run.path / "result.json", result)
        return result


def build_trainer(model: torch.nn.Module, optim: OptimConfig, dist: DistConfig, output: OutputConfig, *,
                  micro_batch: int, steps_per_epoch: int, run: RunDir, info: DistInfo, resume: bool,
                  stop_after: int, desc: str, rng_seed: int | None = None) -> Trainer:
    """optimizer -> scheduler (per optimizer step) -> DeepSpeed engine -> checkpointer -> (seed) -> resume.

    `rng_seed` seeds the global torch RNG after construction and before resuming (a resumed run restores the RNG
    state saved with the checkpoint instead). Rank 0 decides the resume point (and that its world size and global
    batch match this run's); every rank loads that checkpoint; a failure on any rank stops every rank."""
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, steps_per_epoch // optim.grad_accum)
    engine = build_engine(model, optimizer, scheduler, dist, optim, micro_batch, info.device)
    ckpt = Checkpointer(run.path / "checkpoints", engine)
    if rng_seed is not None:
        torch.manual_seed(rng_seed)
    step = 0
    point = D.decide_on_main(ckpt.resumable_point) if resume else None
    if point is not None:
        with D.setup_phase():
            ckpt.check_files(point)
        step = ckpt.load(point)[0]
        if info.is_main:
            print(f"resumed from step {step}")

    def start() -> None:
        run.start()  # inputs checked, checkpoint loaded: the run starts; only now is its record written

    D.decide_on_main(start)
    if resume:
        run.resumed_at(step)
    sinks = MetricSinks(run.path, output.loggers, info.is_main, step if resume else None)
    StopRequest.install()
    total = optim.epochs * steps_per_epoch
    bar = tqdm(total=total, initial=step, desc=desc, disable=not (info.is_main and output.progress))
    return Trainer(engine, scheduler, ckpt, run, info, output, optim.grad_accum, steps_per_epoch, total, stop_after,
                   bar, sinks, step)
