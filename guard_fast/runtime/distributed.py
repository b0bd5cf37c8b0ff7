"""Process-group setup that works the same under `deepspeed`, `torchrun` and plain `python` (1 process), and the
rules that make a multi-node job fail and stop as one job.

The launchers export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; with none set we run alone and
create no process group. gloo on CPU, NCCL on CUDA; every collective waits at most `dist.timeout_s`.

Failing as one job (docs/cluster.md):
- `agree(error)`: every rank passes its own setup error (or None) at the same point; if any rank failed, every rank
  raises one line naming the failed rank and its host. `setup_phase()` wraps rank-local setup work in it, and
  `decide_on_main(fn)` runs a decision on rank 0 and hands its result (or its error) to every rank.
- a peer lost mid-run (its process died, its node's link went down) surfaces as a gloo/NCCL error or a timeout;
  `lost_ranks(exc)` turns that into one line for the CLI.
- `StopRequest`: SIGTERM / SIGUSR1 (a scheduler's pre-timeout signal) only set a flag; the training loop agrees on
  it across ranks at an optimizer-step boundary, checkpoints and stops (runtime/loop.py).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from guard_fast.runtime.config import DistConfig
from guard_fast.runtime.errors import GuardFastError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class RankError(GuardFastError):
    """Another rank's error, raised on every rank (its exit code is the failed rank's)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


_TOPOLOGY: dict[str, Any] = {}
"""set by init_distributed: world size and every rank's host, read by the run folder's environment.json"""
_CONTROL: Any = None
"""a gloo group for small host-side agreements (stop flags) when the default group is NCCL"""


def pick_device(kind: str = "auto", local_rank: int = 0) -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("dist.device = 'cuda' but torch sees no CUDA device; use dist.device=cpu or auto")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def local_world_size(env: dict[str, str] | None = None) -> int:
    """Processes on this node: torchrun sets LOCAL_WORLD_SIZE, the DeepSpeed launcher LOCAL_SIZE."""
    env = os.environ if env is None else env
    return int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or env.get("WORLD_SIZE") or 1)


def cpu_threads(cfg: DistConfig, env: dict[str, str] | None = None) -> int:
    """Torch threads per rank: dist.cpu_threads, else this node's cores shared by this node's processes."""
    return cfg.cpu_threads or max(1, (os.cpu_count() or 1) // max(1, local_world_size(env)))


def init_distributed(cfg: DistConfig | None = None) -> DistInfo:
    """Join the process group the launcher set up (if any) and pick this rank's device."""
    global _CONTROL
    cfg = cfg or DistConfig()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # Several CPU ranks on one host would otherwise each start one thread per core and thrash.
        torch.set_num_threads(cpu_threads(cfg))
    if world > 1 and not dist.is_initialized():
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        # NCCL: a collective that fails or passes timeout_s tears the process down (the watchdog aborts it) instead
        # of leaving it blocked on the device; a lost node so ends the job within timeout_s.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=cfg.timeout_s),
                                device_id=device if device.type == "cuda" else None)
        timeout = timedelta(seconds=cfg.timeout_s)  # new groups do not inherit it (torch's default is 30 min)
        _CONTROL = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    info = DistInfo(rank=rank, world=world, local_rank=local_rank, device=device)
    me = {"rank": rank, "host": socket.gethostname(), "local_rank": local_rank, "pid": os.getpid(),
          "device": str(device), "torch_threads": torch.get_num_threads()}
    ranks = all_gather_objects(me)
    _TOPOLOGY.clear()
    _TOPOLOGY.update(world_size=world, nodes=len({r["host"] for r in ranks}), ranks=ranks)
    return info


def topology() -> dict[str, Any]:
    """World size, node count and every rank's host, local rank, device and threads (empty before init)."""
    return dict(_TOPOLOGY)


def host_of(r: int) -> str:
    ranks = _TOPOLOGY.get("ranks") or []
    return ranks[r]["host"] if r < len(ranks) else socket.gethostname()


def teardown() -> None:
    """Leave the job. Called from the launchers' `finally`: on a clean exit every rank first meets the others, so no
    rank leaves while a peer still sends to it. An in-process group of one (tests, one process) is destroyed so the
    next can start; a group of several processes is left as it is, because its process is about to end and
    launchers/cli.run ends it with os._exit: the C++ teardown of gloo's group at destroy or interpreter exit raced with
    the peers' exits and aborted a rank ("terminate called without an active exception") after a clean run."""
    global _CONTROL
    StopRequest.uninstall()
    if dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        if dist.get_world_size() == 1:
            dist.destroy_process_group()
            _CONTROL = None


def multi_process() -> bool:
    """True in a process that is one rank of several (launched by torchrun, deepspeed, srun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op alone). A host sync on CUDA when the caller reads the result."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ---------------------------------------------------------------------------------------------------------------
# Failing as one job


def _summary(e: BaseException) -> tuple[str, int]:
    """(one line, exit code) for an error to send to the other ranks."""
    if isinstance(e, GuardFastError):
        return str(e), e.exit_code
    text = str(e).splitlines()[0][:300] if str(e) else ""
    return f"{type(e).__name__}: {text}", 1


def agree(error: BaseException | None) -> None:
    """Collective: every rank calls it at the same point with its own error (or None). If any rank failed, every
    rank raises: the failed rank its own error, the others a RankError naming the first failed rank and its host."""
    if world_size() == 1:
        if error is not None:
            raise error
        return
    reports = all_gather_objects(None if error is None else _summary(error))
    failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
    if error is not None:
        raise error
    if failed:
        r, (line, code) = failed[0]
        raise RankError(f"rank {r} (host {host_of(r)}) failed: {line}", code)


@contextmanager
def setup_phase() -> Iterator[None]:
    """Rank-local setup work (no collectives inside): an error on any rank is raised on every rank at the end."""
    try:
        yield
    except Exception as e:
        agree(e)
        raise
    agree(None)


def decide_on_main(fn: Callable[[], Any]) -> Any:
    """Collective: rank 0 runs `fn`; every rank gets its result, or raises its error (one line naming rank 0)."""
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except Exception as e:
            error = e
    if world_size() == 1:
        if error is not None:
            raise error
        return result
    kind, payload = broadcast_object(("ok", result) if error is None else ("error", _summary(error)))
    if error is not None:
        raise error
    if kind == "error":
        raise RankError(f"rank 0 (host {host_of(0)}) failed: {payload[0]}", payload[1])
    return payload


LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out waiting",
        "gloo/transport", "NCCL", "Socket Timeout", "connect() timed out", "connectFullMesh")


def lost_ranks(e: BaseException) -> str | None:
    """One line for a collective that failed because another rank died, a node was lost or timeout_s passed;
    None for any other error."""
    text = str(e)
    if not (isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(s in text for s in LOST))):
        return None
    first, low = (text.splitlines()[0][:200] if text else type(e).__name__), text.lower()
    me = f"rank {rank() if dist.is_initialized() else os.environ.get('RANK', '0')} (host {socket.gethostname()})"
    if "connectfullmesh" in low:  # gloo's first connection between all ranks
        return (f"{me}: could not connect to the other ranks; a node whose hostname resolves to 127.0.0.1 advertises "
                "that: set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to the interface between the nodes "
                f"(docs/cluster.md): {first}")
    why = ("no answer within dist.timeout_s" if "timed out" in low or "timeout" in low
           else "another rank's process ended")
    return f"{me}: lost the other ranks ({why}; a failed rank prints its own error, a lost node none): {first}"


class StopRequest:
    """SIGTERM and SIGUSR1 (SLURM's pre-timeout signal, `--signal=USR1@120`) set a flag instead of killing the
    process; `agreed()` is a collective that is True on every rank once any rank got one. Installed while a
    training loop runs (other stages keep the default: a signal ends them and their caches resume)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
    received: int = 0
    _previous: dict[int, Any] = {}

    @classmethod
    def install(cls) -> None:
        cls.received = 0
        for s in cls.SIGNALS:
            if s not in cls._previous:
                cls._previous[s] = signal.signal(s, cls._handler)

    @classmethod
    def uninstall(cls) -> None:
        for s, previous in cls._previous.items():
            signal.signal(s, previous)
        cls._previous.clear()

    @classmethod
    def _handler(cls, signum: int, frame: Any) -> None:
        cls.received = signum

    @classmethod
    def agreed(cls) -> int:
        """The signal any rank received (0 = none). Host-side: a gloo all-reduce of one int, no device sync."""
        if world_size() == 1:
            return cls.received
        flag = torch.tensor([cls.received], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_CONTROL)
        return int(flag)
