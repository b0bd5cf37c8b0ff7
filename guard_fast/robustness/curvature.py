"""Curvature: the loss landscape around real samples, per model (paper Sec. 4.2 and Fig. 2), sharded over ranks.

For each real val image x (in [0,1] pixel space, the space the attacks use) and its label y, with L(x) = CE(f(x), y):
- lambda_max: the largest eigenvalue of the input Hessian H = d^2 L / dx^2 (3*S*S x 3*S*S), by power iteration on
  Hessian-vector products H v = d(g . v)/dx (double backward through g = dL/dx). Start: a standard normal vector
  seeded by (dist.seed, the image's position in the evaluated set), so it does not depend on the world size or the
  batch. Stop rule, per image: |lam_t - lam_{t-1}| <= tol * |lam_t| for the Rayleigh quotient lam_t = v_t . H v_t
  (||v_t|| = 1), or max_iters Hessian-vector products. Power iteration finds the eigenvalue of largest |lambda|;
  for our models (ReLU networks: piecewise linear in x, BatchNorm in eval mode, average pooling) H = J^T (diag(p) -
  p p^T) J is positive semi-definite, so that is the largest eigenvalue.
- eigenvalues (top_k > 1): the next ones by deflation, power iteration on P H P with P the projector onto the
  complement of the eigenvectors found so far (each iterate re-orthogonalized), in decreasing |lambda|.
- fd_curvature: GUARD's finite difference ||g(x + z) - g(x)|| / ||z|| with GUARD's own step (docs/spec.md section 2):
  z_u = h (g_u + 1e-7) / (||g_u|| + 1e-7) in normalized-input space (g_u = std * g, u = (x - mean) / std), i.e. the
  pixel step z = std * z_u; gradients and ||z|| are in [0,1] pixel units, so it is comparable with lambda_max (it
  lies between g^T H g / ||g||^2 and lambda_max when H is constant along the step). x + z is not clamped to [0,1].
- grad_rayleigh: ghat^T H ghat with ghat = g / ||g|| (the h -> 0 limit of the curvature along the gradient);
  grad_norm: ||g||; cos_grad_top: |cos(g, v_1)| (an eigenvector's sign is arbitrary), how good the paper's
  gradient-for-eigenvector surrogate is at that image.

Per-image Hessians are computed for a whole batch at once from the Hessian of sum_i L_i(x_i): that Hessian is
block-diagonal over images only if the network treats images independently, which holds in eval mode (BatchNorm uses
its running statistics), so every model is measured in eval mode. Each image stops iterating on its own, so its
numbers do not depend on the rest of its batch; batches are dealt to ranks as whole batches of the 1-rank order, so
1 and N ranks give the same numbers.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.nn import functional as F
from tqdm import tqdm

from guard_fast.data import build_loader
from guard_fast.data.loader import split_path
from guard_fast.models import ModelConfig, model_from_config
from guard_fast.robustness.curvature_report import METRICS, comparisons, quantiles, summarize, write_outputs
from guard_fast.robustness.report import default_labels
from guard_fast.runtime import distributed as D
from guard_fast.runtime.bounds import Positive
from guard_fast.runtime.cluster import open_run
from guard_fast.runtime.config import DataConfig, DistConfig, OutputConfig
from guard_fast.runtime.distributed import DistInfo
from guard_fast.runtime.errors import ConfigError, GuardFastError
from guard_fast.runtime.rundir import environment
from guard_fast.runtime.runfolder import stage

DTYPES = {"float64": torch.float64, "float32": torch.float32}
@dataclass
class CurvatureConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(dir="runs/curvature"))
    checkpoints: list[str] = field(default_factory=list)
    """state dicts to measure, one distribution each (empty = model.checkpoint)"""
    labels: list[str] = field(default_factory=list)
    """names, one per checkpoint (empty = the shortest distinct tails of the checkpoint paths)"""
    groups: list[str] = field(default_factory=list)
    """figure column of each checkpoint, one per checkpoint, e.g. teacher,teacher,student,student (empty = one)"""
    num_images: int = 24
    """val images per model: a seeded subset of this many, sharded over ranks (0 = the whole val split); measured
    1.1-1.4 s per image for a width-16 digits ResNet-18 on a contended 2-core CPU, so 4 models take about 2 minutes"""
    subset_seed: int = 0
    """seed of the subset choice (the same images for every world size)"""
    batch_size: int = 16
    """images per Hessian-vector-product batch per rank (the double-backward graph of a batch is kept alive)"""
    top_k: int = 1
    """eigenvalues per image, largest |lambda| first (1 = lambda_max only; more by deflation, k power iterations)"""
    tol: Positive = 1e-3
    """power iteration stops when the Rayleigh quotient changes by <= tol * |lambda| between iterations"""
    max_iters: int = 100
    """Hessian-vector products per eigenvalue at most (an image that hits it is reported as not converged)"""
    h: Positive = 3.0
    """GUARD's step length for fd_curvature, L2 norm in normalized-input units (the squeeze objective's h)"""
    dtype: str = "float64"
    """float64 or float32: precision of the measurement; float32 loses Hessians below ~1e-6 of the loss scale to
    rounding (confident images have tiny curvature), float64 costs about 2x on CPU"""
    flush_denormal: bool = True
    """on CPU, flush denormal floats to zero (double backward through flat digit backgrounds goes denormal)"""

    def checkpoint_paths(self) -> list[str]:
        return list(self.checkpoints) or ([self.model.checkpoint] if self.model.checkpoint else [])

    def validate(self) -> None:
        if self.checkpoints and self.model.checkpoint:
            raise ConfigError("set checkpoints or model.checkpoint, not both")
        n = len(self.checkpoint_paths())
        if self.labels and len(self.labels) != n:
            raise ConfigError(f"labels: {len(self.labels)} names for {n} checkpoints")
        if self.groups and len(self.groups) != n:
            raise ConfigError(f"groups: {len(self.groups)} names for {n} checkpoints")
        if self.num_images < 0:
            raise ConfigError(f"num_images = {self.num_images}: must be >= 0 (0 = the whole val split)")
        if self.batch_size < 1 or self.top_k < 1 or self.max_iters < 1:
            raise ConfigError("batch_size, top_k and max_iters must be >= 1")
        if not 0.0 < self.tol < 1.0:
            raise ConfigError(f"tol = {self.tol}: must be in (0, 1), e.g. 1e-3")
        if not self.h > 0.0:
            raise ConfigError(f"h = {self.h}: must be > 0 (GUARD's step, normalized-input L2 units)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype = {self.dtype!r}: valid values are {', '.join(DTYPES)}")


@dataclass
class PipelineCurvatureConfig(CurvatureConfig):
    """The pipeline's `curvature` section: the command's settings plus which models get a curvature stage."""

    enabled: bool = False
    """run a curvature stage for each model in `models` after the students are evaluated"""
    models: list[str] = field(default_factory=lambda: ["students", "teachers"])
    """which networks to measure: students (each method's student), teachers (each squeeze teacher)"""

    def validate(self) -> None:
        super().validate()
        bad = sorted(set(self.models) - {"students", "teachers"})
        if bad or not self.models:
            raise ConfigError(f"curvature.models = {self.models}: valid values are students, teachers")

    def stage_config(self) -> CurvatureConfig:
        """The plain stage config (without enabled/models, which must not enter a stage's cache key)."""
        names = CurvatureConfig.__dataclass_fields__
        return CurvatureConfig(**{k: copy.deepcopy(getattr(self, k)) for k in names})


# ----------------------------------------------------------------------------------------------------------------
# The linear algebra, batched: every tensor is (B, ...) with one independent problem per leading index


def _bdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(1)  # (B,)


def _bcol(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *[1] * (like.dim() - 1))  # (B,) -> (B, 1, ..., 1)


def _project(v: torch.Tensor, basis: Sequence[torch.Tensor]) -> torch.Tensor:
    """v minus its components along the orthonormal vectors in basis (per image)."""
    for u in basis:
        v = v - _bcol(_bdot(v, u), v) * u
    return v


def _unit(v: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """v / ||v|| per image; images with v = 0 (a zero Hessian) keep `fallback`."""
    n = v.flatten(1).norm(dim=1)
    return torch.where(_bcol(n > 0, v), v / _bcol(n.clamp_min(torch.finfo(v.dtype).tiny), v), fallback)


def power_iteration(hvp: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, tol: float, max_iters: int,
                    basis: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor]:
    """Dominant eigenpair of P H P per image (P projects out `basis`; none = H itself).

    hvp(v) = H v for a batch of vectors v (B, ...) with a block-diagonal H (one block per image). Returns
    (lam (B,), v (B, ...) unit, iterations (B,) int, converged (B,) bool). lam_t = v_t . (P H P v_t); an image stops
    updating once |lam_t - lam_{t-1}| <= tol * |lam_t|, so its result does not depend on the other images.
    """
    v = _unit(_project(v0, basis), v0)
    lam = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    iters = torch.zeros(v.shape[0], dtype=torch.long, device=v.device)
    active = torch.ones(v.shape[0], dtype=torch.bool, device=v.device)
    for t in range(max_iters):
        w = _project(hvp(v), basis)  # (B, ...)
        new = _bdot(v, w)  # Rayleigh quotient, ||v|| = 1
        done = (new - lam).abs() <= tol * new.abs() if t > 0 else torch.zeros_like(active)
        lam = torch.where(active, new, lam)
        v = torch.where(_bcol(active, v), _unit(w, v), v)
        iters += active
        active &= ~done
        if not bool(active.any()):  # host sync: once per Hessian-vector product
            break
    return lam, _unit(_project(v, basis), v), iters, ~active


def top_eigenpairs(hvp: Callable[[torch.Tensor], torch.Tensor], starts: torch.Tensor, tol: float,
                   max_iters: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The k = starts.shape[0] eigenvalues of largest |lambda| per image, by deflation. starts: (k, B, ...) start
    vectors. Returns (eigenvalues (B, k), eigenvectors [k x (B, ...)], iterations (B, k), converged (B, k))."""
    lams, vecs, iters, conv = [], [], [], []
    for start in starts:
        lam, v, it, ok = power_iteration(hvp, start, tol, max_iters, vecs)
        lams.append(lam), vecs.append(v), iters.append(it), conv.append(ok)
    return torch.stack(lams, 1), vecs, torch.stack(iters, 1), torch.stack(conv, 1)


def guard_step(g: torch.Tensor, std: torch.Tensor | float, h: float) -> torch.Tensor:
    """GUARD's perturbation as a [0,1]-pixel displacement: z_u = h (g_u + 1e-7) / (||g_u|| + 1e-7) with the
    normalized-input gradient g_u = std * g (u = (x - mean) / std), mapped back by z = std * z_u. g: (B, C, H, W)."""
    g_u = g * std
    z_u = h * (g_u + 1e-7) / (_bcol(g_u.flatten(1).norm(dim=1), g_u) + 1e-7)
    return z_u * std


def measure_batch(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, starts: torch.Tensor,
                  tol: float, max_iters: int, h: float, std: torch.Tensor | float = 1.0) -> dict[str, torch.Tensor]:
    """Every per-image quantity of the module docstring for one batch.

    loss_fn(x) -> per-image losses (B,), each depending on its own image only (a model in eval mode); x: (B, ...);
    starts: (k, B, ...) power-iteration starts. Returns tensors with leading dim B."""
    x = x.detach().requires_grad_(True)
    loss = loss_fn(x)  # (B,)
    (g,) = torch.autograd.grad(loss.sum(), x, create_graph=True)  # (B, ...) dL_i/dx_i: images independent

    def hvp(v: torch.Tensor) -> torch.Tensor:  # H v = d(g . v)/dx, one double backward, the graph of g reused
        return torch.autograd.grad(g, x, grad_outputs=v, retain_graph=True)[0]

    lams, vecs, iters, conv = top_eigenpairs(hvp, starts, tol, max_iters)
    gd = g.detach()
    gnorm = gd.flatten(1).norm(dim=1)
    tiny = torch.finfo(gd.dtype).tiny
    ghat = gd / _bcol(gnorm.clamp_min(tiny), gd)
    grad_rayleigh = _bdot(ghat, hvp(ghat))
    cos = _bdot(gd, vecs[0]).abs() / (gnorm * vecs[0].flatten(1).norm(dim=1)).clamp_min(tiny)
    z = guard_step(gd, std, h)
    xz = (x.detach() + z).requires_grad_(True)
    (gz,) = torch.autograd.grad(loss_fn(xz).sum(), xz)
    fd = (gz - gd).flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1)
    return {"loss": loss.detach(), "eigenvalues": lams, "lambda_max": lams[:, 0], "iterations": iters,
            "converged": conv, "grad_norm": gnorm, "grad_rayleigh": grad_rayleigh, "cos_grad_top": cos,
            "fd_curvature": fd, "fd_step": z.flatten(1).norm(dim=1)}


def start_vectors(seed: int, positions: Iterable[int], k: int, shape: Sequence[int], dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """(k, B, *shape) standard normal power-iteration starts; image `p`'s come from a generator seeded by (seed, p)."""
    out = [torch.randn(k, *shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + p), dtype=torch.float64)
           for p in positions]
    return torch.stack(out, 1).to(device=device, dtype=dtype)


def measure_model(model: torch.nn.Module, loader: Iterable, cfg: CurvatureConfig, info: DistInfo | None = None,
                  progress: bool = False, desc: str = "curvature") -> dict[str, Any]:
    """Per-image curvature records of `model` ([0,1] inputs) over every rank's batches, gathered in position order.

    Batch k of rank r is batch k * world + r of the 1-rank order (build_loader(..., shard_block=cfg.batch_size));
    an image's position in the evaluated set is that batch index * cfg.batch_size + its row. The model is measured
    in eval mode, in cfg.dtype, and left as it was. Returns {"images", "records", "seconds", "seconds_per_image"}."""
    device = next(model.parameters()).device
    info = info or DistInfo(0, 1, 0, device)
    dtype = DTYPES[cfg.dtype]
    was_training, old_dtype = model.training, next(model.parameters()).dtype
    model.eval().to(dtype)  # eval: BatchNorm per image, so the batch Hessian is block-diagonal over images
    std = getattr(model, "std", 1.0)
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(loader) if hasattr(loader, "__len__") else None, desc=desc,
               disable=not (progress and info.is_main), leave=False)
    t0 = time.perf_counter()
    try:
        for k, (x, y) in enumerate(loader):  # x: (B, 3, H, W) in [0, 1]
            first = (k * info.world + info.rank) * cfg.batch_size
            positions = range(first, first + len(y))
            x = x.to(dtype)
            starts = start_vectors(cfg.dist.seed, positions, cfg.top_k, x.shape[1:], dtype, device)

            def loss_fn(xb: torch.Tensor, y=y) -> torch.Tensor:
                return F.cross_entropy(model(xb), y, reduction="none")  # (B,)

            out = measure_batch(loss_fn, x, starts, cfg.tol, cfg.max_iters, cfg.h, std)
            with torch.no_grad():
                correct = model(x).argmax(1) == y
            out = {k2: v.tolist() for k2, v in out.items()}  # host sync: once per batch
            for i, p in enumerate(positions):
                rec = {"position": p, "label": int(y[i]), "correct": bool(correct[i])}
                rec.update({k2: v[i] for k2, v in out.items()})
                records.append(rec)
            bar.update(1)
    finally:
        bar.close()
        model.to(old_dtype).train(was_training)
    seconds = time.perf_counter() - t0
    per_rank = D.all_gather_objects((records, seconds))
    records = sorted((r for recs, _ in per_rank for r in recs), key=lambda r: r["position"])
    if not records:
        raise GuardFastError("no images to measure: the val split (or its subset) is empty")
    return {"images": len(records), "records": records, "seconds": max(s for _, s in per_rank),
            "seconds_per_image": sum(s for _, s in per_rank) / len(records)}


# ----------------------------------------------------------------------------------------------------------------
# The stage


@stage("curvature")
def run_curvature(cfg: CurvatureConfig, info: DistInfo) -> dict[str, Any]:
    """Measure every checkpoint; rank 0 writes output.dir/{curvature.json, curvature.md, curvature.png}. Returns the
    content of curvature.json."""
    paths = cfg.checkpoint_paths()
    if not paths:  # checked here, not in validate(): the pipeline fills checkpoints in
        raise ConfigError("checkpoints: nothing to measure; pass --checkpoints=a.pt,b.pt")
    run = open_run(cfg.output.dir, cfg, info=info)  # every rank agrees on the folder
    val = build_loader(cfg.data, "val", rank=info.rank, world=info.world, device=info.device,
                       batch_size=cfg.batch_size, subset=cfg.num_images, subset_seed=cfg.subset_seed,
                       shard_block=cfg.batch_size)
    if val.num_samples == 0:
        raise GuardFastError(f"{split_path(cfg.data, 'val')}: no images to measure")
    spec = val.spec
    labels = cfg.labels or default_labels(paths)
    groups = cfg.groups or [""] * len(paths)
    models = []
    for p in paths:  # every checkpoint must load before any measurement runs
        try:
            models.append(model_from_config(cfg.model, spec, p))
        except GuardFastError as e:
            raise GuardFastError(f"{e} (expected model.arch = {cfg.model.arch}, model.width = {cfg.model.width}, "
                                 f"{spec.num_classes} classes)") from None
    run.start()  # inputs checked: write the run's record
    t0 = time.time()
    results = []
    torch.set_flush_denormal(cfg.flush_denormal and info.device.type == "cpu")  # process-wide, restored below
    try:
        for path, label, group, model in zip(paths, labels, groups, models, strict=True):
            res = measure_model(model.to(info.device), val, cfg, info, progress=cfg.output.progress,
                                desc=f"curvature {label}")
            res["summary"] = summarize(res["records"])
            results.append({"label": label, "group": group, "checkpoint": path, **res})
            run.log({"checkpoint": label, **{k: res["summary"][k]["median"] for k in METRICS}})
    finally:
        torch.set_flush_denormal(False)  # torch's default
    result = {
        "dataset": {"name": spec.name, "split": "val", "num_classes": spec.num_classes, "image_size": spec.image_size,
                    "images": results[0]["images"], "split_images": val.split_samples, "subset_seed": cfg.subset_seed},
        "model": {"arch": cfg.model.arch, "width": cfg.model.width},
        "settings": {"tol": cfg.tol, "max_iters": cfg.max_iters, "top_k": cfg.top_k, "h": cfg.h, "dtype": cfg.dtype,
                     "seed": cfg.dist.seed, "batch_size": cfg.batch_size, "space": "[0,1] pixels"},
        "world": info.world,
        "seconds": time.time() - t0,
        "fd_step_median": quantiles([r["fd_step"] for m in results for r in m["records"]])["median"],
        "models": results,
        "comparisons": comparisons(results),
        "environment": environment(info.device),
    }
    if info.is_main:
        write_outputs(result, run.path)
    return result
