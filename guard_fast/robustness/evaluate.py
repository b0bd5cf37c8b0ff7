"""Evaluate: clean and attacked accuracy of checkpoints (teacher or student), sharded over ranks, with a report.

Accuracy under attack counts an image only if it is classified correctly clean AND under attack, so it can never
exceed clean accuracy; only clean-correct images are attacked (the others cannot count). Randomness is reseeded per
(attack, eps, batch) from dist.seed; the loader deals whole batches of the 1-rank order to ranks, so every batch -
and hence every per-image result - is the same for any world size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from tqdm import tqdm

from guard_fast.attacks.suite import ATTACKS, AttackConfig, build_attack, settings
from guard_fast.data import build_loader
from guard_fast.data.loader import split_path
from guard_fast.data.presets import DatasetSpec
from guard_fast.models import Classifier, ModelConfig, model_from_config, prepare_model
from guard_fast.robustness.report import bar_chart, default_labels, evaluation_rows, markdown_report, row_metrics
from guard_fast.runtime import distributed as D
from guard_fast.runtime.cluster import open_run
from guard_fast.runtime.config import DataConfig, DistConfig, OutputConfig
from guard_fast.runtime.distributed import DistInfo, setup_phase
from guard_fast.runtime.errors import ConfigError, GuardFastError
from guard_fast.runtime.io import atomic_json, atomic_text
from guard_fast.runtime.rundir import environment
from guard_fast.runtime.runfolder import stage


@dataclass
class EvaluateConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(dir="runs/evaluate"))
    attack: AttackConfig = field(default_factory=AttackConfig)
    checkpoints: list[str] = field(default_factory=list)
    """state dicts to evaluate, one report row each (empty = model.checkpoint)"""
    labels: list[str] = field(default_factory=list)
    """report row names, one per checkpoint (empty = the shortest distinct tails of the checkpoint paths)"""
    num_images: int = 0
    """val images to evaluate: a seeded subset of this many, sharded over ranks (0 = the whole val split)"""
    subset_seed: int = 0
    """seed of the subset choice (the same images for every world size)"""
    flush_denormal: bool = True
    """on CPU, flush denormal floats to zero while evaluating: gradients through images with flat black backgrounds
    (digits) can go denormal; measured 6.7x slower PGD on a badly trained digits net, 1.2x on a trained one
    (bench/results/attack-cost.md); values below 1e-38 do not move an argmax"""

    def checkpoint_paths(self) -> list[str]:
        return list(self.checkpoints) or ([self.model.checkpoint] if self.model.checkpoint else [])

    def validate(self) -> None:
        if self.checkpoints and self.model.checkpoint:
            raise ConfigError("set checkpoints or model.checkpoint, not both")
        if self.labels and len(self.labels) != len(self.checkpoints or [self.model.checkpoint]):
            raise ConfigError(f"labels: {len(self.labels)} names for {len(self.checkpoint_paths())} checkpoints")
        if self.num_images < 0:
            raise ConfigError(f"num_images = {self.num_images}: must be >= 0 (0 = the whole val split)")
        if self.dist.precision != "fp32":
            raise ConfigError(f"dist.precision = {self.dist.precision!r}: attacks run in fp32; set dist.precision=fp32")


def batch_seed(seed: int, job: int, batch: int) -> int:
    """Seed of attack job `job` (1-based over (attack, eps)) on global batch `batch`: independent of world size."""
    return ((seed * 1_000_003 + job) * 1_000_033 + batch) % 2**62


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attack_jobs(cfg: AttackConfig) -> list[tuple[str, float | None]]:
    """(attack, eps) pairs in report order; eps-free attacks (CW) once with eps None."""
    return [(n, e) for n in cfg.names for e in (cfg.eps if ATTACKS[n].uses_eps else [None])]


def evaluate_model(model: torch.nn.Module, loader: Iterable, attack_cfg: AttackConfig, num_classes: int,
                   info: DistInfo | None = None, seed: int = 0, progress: bool = False,
                   desc: str = "evaluate") -> dict[str, Any]:
    """Clean and attacked accuracy of `model` ([0,1] inputs) over this rank's batches, counts summed over ranks.

    Returns {"num_images", "world", "results": [{"attack", "norm", "eps", "correct", "total", "accuracy",
    "seconds", "seconds_per_image"}, ...]} with the clean record first. seconds: wall time of the slowest rank;
    seconds_per_image: rank-seconds per evaluated image (the budget unit). Batch k of rank r is taken to be batch
    k * world + r of the 1-rank order (true for build_loader(..., shard_block=batch size)); attacks are seeded from
    that index. The model is attacked in eval mode and left in its previous mode.
    """
    device = next(model.parameters()).device
    info = info or DistInfo(0, 1, 0, device)
    jobs = attack_jobs(attack_cfg)
    counts = torch.zeros(len(jobs) + 2, dtype=torch.float64, device=device)  # [clean, jobs..., images]
    seconds = [0.0] * (len(jobs) + 1)
    total_steps = len(loader) * (len(jobs) + 1) if hasattr(loader, "__len__") else None
    bar = tqdm(total=total_steps, desc=desc, disable=not (progress and info.is_main), leave=False)
    was_training = model.training
    model.eval()
    try:
        for k, (x, y) in enumerate(loader):  # x: (B, 3, H, W) in [0, 1]
            batch = k * info.world + info.rank
            t = time.perf_counter()
            with torch.no_grad():
                correct = model(x).argmax(1) == y  # (B,)
            _sync(device)
            seconds[0] += time.perf_counter() - t
            counts[0] += correct.sum()
            counts[-1] += len(y)
            bar.update(1)
            xc, yc = x[correct], y[correct]  # only clean-correct images can count as robust
            for j, (name, eps) in enumerate(jobs, start=1):
                bar.set_postfix_str(name if eps is None else f"{name}@{eps * 255:.3g}/255")
                t = time.perf_counter()
                if len(yc):
                    s = batch_seed(seed, j, batch)
                    torch.manual_seed(s)  # PGD's random start; Square/APGD/FAB reseed from `s` themselves
                    whole = attack_cfg.couples_batch(name)  # the batch-L1 MIM sees the whole batch, as the authors'
                    adv = build_attack(name, model, attack_cfg, eps or 0.0, num_classes, s)(*((x, y) if whole
                                                                                           else (xc, yc)))
                    with torch.no_grad():
                        hit = model(adv).argmax(1) == (y if whole else yc)
                        counts[j] += (hit & correct).sum() if whole else hit.sum()
                _sync(device)  # host sync: per attack and batch, for honest wall times
                seconds[j] += time.perf_counter() - t
                bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    D.all_reduce_sum(counts)
    per_rank = D.all_gather_objects(seconds)
    counts = counts.tolist()  # host sync: once per evaluation
    total = int(counts[-1])
    if total == 0:
        raise GuardFastError("no images to evaluate: the val split (or its subset) is empty")
    results = []
    for j, (name, eps) in enumerate([("clean", None), *jobs]):
        results.append({"attack": name, "norm": ATTACKS[name].norm if name in ATTACKS else None, "eps": eps,
                        "correct": int(counts[j]), "total": total, "accuracy": counts[j] / total,
                        "seconds": max(r[j] for r in per_rank),
                        "seconds_per_image": sum(r[j] for r in per_rank) / total})
    return {"num_images": total, "world": info.world, "results": results}


def notes(cfg: AttackConfig) -> list[str]:
    """What a reader of the report must know about the attacks' semantics."""
    out = ["Accuracy under attack counts an image only if it is classified correctly clean and under attack.",
           "Attacks see the [0,1] model (normalization inside it), in eval mode; eps in [0,1] pixel units."]
    if "autoattack" in cfg.names:
        steps = cfg.aa_steps if cfg.aa_version == "standard" else 10
        out.append(f"AutoAttack ({cfg.aa_version}) ran its APGD/FAB sub-attacks at {steps} steps. torchattacks' "
                   "AutoAttack runs them at 10 steps; the original AutoAttack (Croce & Hein 2020) uses 100 "
                   "(attack.aa_steps=100).")
    if "cw" in cfg.names:
        out.append("CW is an L2 attack without eps: it ran once per checkpoint and is shown under every eps.")
    if "pgd100" in cfg.names or "mim" in cfg.names:
        out.append(f"Step sizes scale with eps: PGD alpha = {cfg.pgd_alpha_frac:g} * eps, MIM alpha = "
                   f"{cfg.mim_alpha_frac:g} * eps (the paper's 0.25/255 and 1/255 at eps 1/255).")
    return out


def load_model(cfg: EvaluateConfig, spec: DatasetSpec, path: str) -> Classifier:
    """The configured network with `path` loaded strictly; a mismatch names the file and what was expected."""
    try:
        return model_from_config(cfg.model, spec, path)
    except GuardFastError as e:
        raise GuardFastError(f"{e} (expected model.arch = {cfg.model.arch}, model.width = {cfg.model.width}, "
                             f"{spec.num_classes} classes from data.dataset/data.num_classes)") from None


@stage("evaluate")
def run_evaluate(cfg: EvaluateConfig, info: DistInfo) -> dict[str, Any]:
    """Evaluate every checkpoint; rank 0 writes output.dir/{evaluation.json, evaluation.md, robustness.png}.
    Returns the evaluation dict (the content of evaluation.json)."""
    if not cfg.checkpoint_paths():  # checked here, not in validate(): the pipeline fills checkpoints in
        raise ConfigError("checkpoints: nothing to evaluate; pass --checkpoints=a.pt,b.pt")
    run = open_run(cfg.output.dir, cfg, info=info)  # every rank agrees on the folder
    with setup_phase():  # rank-local work: an error on any rank stops every rank with one line
        val = build_loader(cfg.data, "val", rank=info.rank, world=info.world, device=info.device,
                           subset=cfg.num_images, subset_seed=cfg.subset_seed, shard_block=cfg.data.eval_batch_size)
        if val.num_samples == 0:
            raise GuardFastError(f"{split_path(cfg.data, 'val')}: no images to evaluate")
        spec = val.spec
        paths = cfg.checkpoint_paths()
        labels = cfg.labels or default_labels(paths)
        models = [load_model(cfg, spec, p) for p in paths]  # every checkpoint must load before any attack runs
    run.start()  # inputs checked: write the run's record
    t0 = time.time()
    checkpoints = []
    flush = cfg.flush_denormal and info.device.type == "cpu"
    torch.set_flush_denormal(flush)  # process-wide; this process is the launcher's, restored below
    try:
        for path, label, model in zip(paths, labels, models, strict=True):
            model = prepare_model(model.to(info.device), cfg.model)
            res = evaluate_model(model, val, cfg.attack, spec.num_classes, info, seed=cfg.dist.seed,
                                 progress=cfg.output.progress, desc=f"evaluate {label}")
            checkpoints.append({"label": label, "checkpoint": path, **res})
            run.log({"checkpoint": label, **{f"{r['attack']}@{r['eps']:.6g}" if r["eps"] else r["attack"]:
                                             r["accuracy"] for r in res["results"]}})
    finally:
        torch.set_flush_denormal(False)  # torch's default
    eps = cfg.attack.eps if any(ATTACKS[n].uses_eps for n in cfg.attack.names) else []  # [] = CW only
    rows = evaluation_rows(checkpoints, eps)
    evaluation = {
        "dataset": {"name": spec.name, "split": "val", "num_classes": spec.num_classes, "image_size": spec.image_size,
                    "images": checkpoints[0]["num_images"], "split_images": val.split_samples,
                    "subset_seed": cfg.subset_seed},
        "model": {"arch": cfg.model.arch, "width": cfg.model.width},
        "eps": list(eps),
        "attacks": settings(cfg.attack, spec.num_classes),
        "notes": notes(cfg.attack),
        "world": info.world,
        "seconds": time.time() - t0,
        "checkpoints": checkpoints,
        "rows": rows,
        "metrics": [row_metrics(r) for r in rows],
        "environment": environment(info.device),
    }
    if info.is_main:
        atomic_json(run.path / "evaluation.json", evaluation)
        atomic_text(run.path / "evaluation.md", markdown_report(evaluation))
        bar_chart(rows, run.path / "robustness.png", title=spec.name)
    return evaluation
