"""MTT and TESLA: distill a synthetic set by matching expert training trajectories (Cazenavette et al. 2022; Cui et
al. 2023), the Table 2 comparison rows.

Learnable: IPC images per class (normalized pixels; init = real: random real images of the class, MTT's and TESLA's
default pix_init; noise: standard normal in normalized space, their other choice) and the
student's inner learning rate alpha (initialized to lr_teacher). Each iteration draws `trajectories` (expert e, start
epoch t < max_start_epoch) pairs, runs syn_steps differentiable SGD steps from theta*_t on synthetic minibatches and
matches theta*_{t + expert_epochs} (guard_fast/distill/matching.py); SGD with momentum 0.5 on the images (lr_img) and
on alpha (lr_lr). method = mtt differentiates the unrolled loop (memory linear in syn_steps), method = tesla uses
TESLA's constant-memory gradient; labels = expert gives TESLA's soft labels (softmax of the target expert's logits).
GUARD(MTT) and GUARD(TESLA) are this computation on a buffer of experts trained with a GUARD objective
(guard_fast/distill/experts.py); expert_objective names the objective the run expects, and a buffer made with another
is refused.

Distribution: trajectory j of an iteration runs on rank j % world; the image and lr gradients are summed over ranks
and divided by `trajectories`, so every rank applies the same update. All randomness of iteration k comes from
generators seeded by (seed, k, j): the result does not depend on the world size, and a run restarted from its last
checkpoint (state.pt, every output.ckpt_every iterations) continues exactly as if never stopped.

As in the reference code, the images are never clipped (clamp = true clips them to the valid [0, 1] pixel range
after every update, our earlier behaviour) and the stored set is the float tensors (pixels.pt; the PNGs are their
8-bit view). DSA acts on the normalized images (dsa_space), TESLA's image gradient carries its code's coefficient
(tesla_exact; guard_fast/distill/matching.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from guard_fast.data.dsa import SPACES
from guard_fast.data.presets import resolve_dataset
from guard_fast.data.real import RealSet, load_real
from guard_fast.data.synthetic import content_hash, save_grid, to_uint8, write_synthetic
from guard_fast.distill.buffer import load_trajectory, read_buffer
from guard_fast.distill.matching import AUGMENTS, GRADS, FlatNet, build_augment, plan_steps, tesla_grads
from guard_fast.models import Classifier, ModelConfig, model_from_config
from guard_fast.regularizers.objectives import OBJECTIVES
from guard_fast.runtime import distributed as D
from guard_fast.runtime.bounds import NonNegative, Positive
from guard_fast.runtime.cluster import open_run
from guard_fast.runtime.config import DataConfig, DistConfig, OutputConfig
from guard_fast.runtime.distributed import DistInfo
from guard_fast.runtime.errors import ConfigError, GuardFastError, reading
from guard_fast.runtime.io import atomic_json, atomic_torch_save, saved_with_key
from guard_fast.runtime.rundir import RunDir
from guard_fast.runtime.runfolder import stage

METHODS = tuple(GRADS)
LABELS = ("hard", "expert")
INITS = ("real", "noise")
SOFT_LABELS_FILE = "soft_labels.pt"


def _convnet() -> ModelConfig:
    return ModelConfig(arch="convnet", width=128)


@dataclass
class MTTConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=_convnet)
    """the student network; must be the experts' (arch, width)"""
    dist: DistConfig = field(default_factory=DistConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(dir="runs/mtt"))
    buffer: str = "runs/experts"
    """the experts stage's output folder (buffer.json + experts/)"""
    expert_objective: str = "none"
    """the objective the buffer's experts must have been trained with (experts' objective.name): none = plain CE
    (MTT, TESLA), guard etc. = GUARD(MTT) / GUARD(TESLA); a buffer made with another is refused"""
    method: str = "mtt"
    """gradient computation: mtt (unrolled autograd, memory linear in syn_steps) or tesla (constant memory)"""
    labels: str = "hard"
    """hard (class ids) or expert (TESLA's soft labels: softmax of the target expert's logits on the images)"""
    ipc: int = 10
    """images per class to distill"""
    iterations: int = 5000
    """distillation iterations (MTT: 5000)"""
    syn_steps: int = 30
    """student SGD steps on synthetic minibatches per iteration (N)"""
    expert_epochs: int = 2
    """expert epochs M between the start and the target parameters"""
    max_start_epoch: int = 20
    """start epochs t are drawn from 0 .. max_start_epoch - 1 (as MTT's randint)"""
    lr_img: Positive = 1000.0
    """SGD learning rate of the normalized synthetic pixels"""
    lr_lr: Positive = 1e-5
    """SGD learning rate of the learnable inner learning rate"""
    lr_teacher: Positive = 0.01
    """initial inner learning rate alpha (the experts' SGD lr)"""
    momentum: NonNegative = 0.5
    """SGD momentum of both outer optimizers (MTT: 0.5)"""
    batch_syn: int = 0
    """synthetic images per inner step (0 = all of them, MTT's default)"""
    trajectories: int = 1
    """(expert, start epoch) samples per iteration, spread over ranks; gradients averaged (MTT: 1)"""
    augment: str = "dsa"
    """differentiable augmentation of every synthetic minibatch: none or dsa (MTT/TESLA use DSA)"""
    dsa_space: str = "normalized"
    """where DSA acts: normalized (MTT/TESLA's code: std units, mean-colour fill) or pixel ([0,1] pixels, black fill)"""
    init: str = "real"
    """real (random real images of the class; MTT/TESLA's default pix_init) or noise (standard normal in normalized
    space)"""
    tesla_exact: bool = False
    """method = tesla: apply the exact derivative of the matching loss to the images (twice the step of TESLA's code,
    whose distill.py:418 keeps half of it; published lr_img values assume the code's)"""
    clamp: bool = False
    """clip the images to the [0,1] pixel range after every update (the authors' code never does)"""
    grid_classes: int = 10
    """classes (rows) shown in grid.png"""
    stop_after: int = 0
    """stop after this many iterations as if killed (0 = run to the end; for tests)"""

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method = {self.method!r}: valid values are {', '.join(METHODS)}")
        if self.expert_objective not in OBJECTIVES:
            raise ConfigError(f"expert_objective = {self.expert_objective!r}: valid values are {', '.join(OBJECTIVES)}")
        if self.labels not in LABELS:
            raise ConfigError(f"labels = {self.labels!r}: valid values are {', '.join(LABELS)}")
        if self.augment not in AUGMENTS:
            raise ConfigError(f"augment = {self.augment!r}: valid values are {', '.join(AUGMENTS)}")
        if self.dsa_space not in SPACES:
            raise ConfigError(f"dsa_space = {self.dsa_space!r}: valid values are {', '.join(SPACES)}")
        if self.init not in INITS:
            raise ConfigError(f"init = {self.init!r}: valid values are {', '.join(INITS)}")
        if min(self.ipc, self.iterations, self.syn_steps, self.expert_epochs, self.max_start_epoch,
               self.trajectories) < 1:
            raise ConfigError("ipc, iterations, syn_steps, expert_epochs, max_start_epoch and trajectories must be "
                              ">= 1")
        if self.lr_img <= 0 or self.lr_lr < 0 or self.lr_teacher <= 0 or not 0 <= self.momentum < 1:
            raise ConfigError("lr_img and lr_teacher must be > 0, lr_lr >= 0, momentum in [0, 1)")
        if self.batch_syn < 0:
            raise ConfigError(f"batch_syn = {self.batch_syn}: must be >= 0 (0 = all images)")


def synth_key(cfg: MTTConfig, spec: dict[str, Any], buffer_key: str) -> str:
    """Hash of everything that determines the synthetic set (not the output folder, progress or world size)."""
    c = asdict(cfg)
    for k in ("output", "stop_after", "grid_classes", "buffer"):
        c.pop(k)
    c["dist"], c["spec"], c["buffer_key"] = {"seed": cfg.dist.seed}, spec, buffer_key
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stream(seed: int, it: int, j: int = 0) -> torch.Generator:
    """The generator of iteration `it`, trajectory `j` (independent of ranks and restarts)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + it) * 1_009 + j)


def init_images(real: RealSet, cfg: MTTConfig, model: Classifier) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """IPC images per class, class-major, normalized: (u (C*ipc, 3, S, S) float32, labels, real indices). init = real:
    random real images of the class; noise (MTT distill.py:116 unless pix_init = real): standard normal, index -1."""
    gen = torch.Generator().manual_seed(cfg.dist.seed)
    if cfg.init == "noise":
        n, size = len(real.classes) * cfg.ipc, real.pixels.shape[-1]
        labels = torch.arange(len(real.classes)).repeat_interleave(cfg.ipc)
        return torch.randn((n, real.pixels.shape[1], size, size), generator=gen), labels, [-1] * n
    picks = []
    for c, name in enumerate(real.classes):
        idx = real.class_indices(c)
        if cfg.ipc > len(idx):
            raise GuardFastError(f"ipc = {cfg.ipc} is larger than class {name!r} of the real train split "
                                 f"({len(idx)} images); use ipc <= {len(idx)}")
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:cfg.ipc]])
    chosen = torch.cat(picks)
    x = real.pixels[chosen].to(model.mean.device).float() / 255  # (C*ipc, 3, S, S) in [0, 1]
    return model.normalize(x), real.labels[chosen], chosen.tolist()


@torch.no_grad()
def expert_soft_labels(net: FlatNet, theta: torch.Tensor, u: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """TESLA's soft labels: softmax of the expert's logits at theta, (N, C)."""
    return torch.cat([F.softmax(net(theta, u[i:i + chunk]), dim=1) for i in range(0, len(u), chunk)])


class Trajectories:
    """The buffer's experts, loaded on first use (memory-mapped)."""

    def __init__(self, root: str, manifest: dict[str, Any], device: torch.device):
        self.root, self.manifest, self.device, self.cache = root, manifest, device, {}

    def pair(self, e: int, t: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        if e not in self.cache:
            self.cache[e] = load_trajectory(self.root, self.manifest, e)
        traj = self.cache[e]
        return traj[t].to(self.device), traj[t + m].to(self.device)


@stage("mtt")
def run_mtt(cfg: MTTConfig, info: DistInfo) -> dict[str, Any]:
    """Distill cfg.ipc images per class into output.dir (images/, manifest.json, grid.png, result.json; TESLA's soft
    labels in soft_labels.pt)."""
    run = open_run(cfg.output.dir, cfg, info=info)  # every rank agrees on the folder
    spec = resolve_dataset(cfg.data)
    model = model_from_config(cfg.model, spec, checkpoint="").to(info.device)
    net = FlatNet(model.body)
    manifest = read_buffer(cfg.buffer, {"dataset": cfg.data.dataset, "num_classes": spec.num_classes,
                                        "image_size": spec.image_size, "arch": cfg.model.arch,
                                        "width": cfg.model.width, "num_params": net.num_params},
                           cfg.expert_objective)
    if cfg.max_start_epoch - 1 + cfg.expert_epochs > manifest["epochs"]:
        raise ConfigError(f"max_start_epoch = {cfg.max_start_epoch} with expert_epochs = {cfg.expert_epochs} reaches "
                          f"epoch {cfg.max_start_epoch - 1 + cfg.expert_epochs}, beyond the buffer's "
                          f"{manifest['epochs']} epochs; use max_start_epoch <= "
                          f"{manifest['epochs'] - cfg.expert_epochs + 1}")
    real = load_real(cfg.data, "train")
    u0, labels, picked = init_images(real, cfg, model)
    key = synth_key(cfg, asdict(spec), manifest["key"])
    run.start()  # inputs checked: write the run's record
    state_path = run.path / "state.pt"
    lo = ((0 - model.mean) / model.std).to(info.device)  # (1, 3, 1, 1) valid normalized range per channel
    hi = ((1 - model.mean) / model.std).to(info.device)
    u = u0.to(info.device).requires_grad_(True)  # (C*ipc, 3, S, S) normalized
    syn_lr = torch.tensor(cfg.lr_teacher, device=info.device).requires_grad_(True)
    opt_img = torch.optim.SGD([u], lr=cfg.lr_img, momentum=cfg.momentum)
    opt_lr = torch.optim.SGD([syn_lr], lr=cfg.lr_lr, momentum=cfg.momentum)
    start_it = 0
    if saved_with_key(state_path, key):
        state = torch.load(state_path, map_location=info.device, weights_only=True)
        with reading(state_path, "mtt resume state"), torch.no_grad():
            u.copy_(state["images"]), syn_lr.copy_(state["syn_lr"])
            opt_img.load_state_dict(state["opt_img"]), opt_lr.load_state_dict(state["opt_lr"])
            start_it = int(state["iteration"])
    labels = labels.to(info.device)
    experts = Trajectories(cfg.buffer, manifest, info.device)
    grads = functools.partial(tesla_grads, exact=cfg.tesla_exact) if cfg.method == "tesla" else GRADS[cfg.method]
    augment = build_augment(cfg.augment, model.mean, model.std, space=cfg.dsa_space)
    batch = cfg.batch_syn or len(labels)

    def save_state(it: int) -> None:
        if info.is_main:
            atomic_torch_save(state_path, {"key": key, "iteration": it, "images": u.detach().cpu(),
                                           "syn_lr": syn_lr.detach().cpu(), "opt_img": opt_img.state_dict(),
                                           "opt_lr": opt_lr.state_dict()})

    bar = tqdm(total=cfg.iterations, initial=start_it, desc=cfg.method,
               disable=not (info.is_main and cfg.output.progress))
    losses: list[float] = []
    for it in range(start_it, cfg.iterations):
        if cfg.stop_after and it - start_it >= cfg.stop_after:
            bar.close()
            return {"stopped_after_iterations": it - start_it}
        g_img, g_lr = torch.zeros_like(u), torch.zeros_like(syn_lr)
        loss_sum = torch.zeros((), device=info.device)
        for j in range(info.rank, cfg.trajectories, info.world):
            gen = stream(cfg.dist.seed, it, j)
            e = int(torch.randint(manifest["num_experts"], (1,), generator=gen))
            t = int(torch.randint(cfg.max_start_epoch, (1,), generator=gen))
            start, target = experts.pair(e, t, cfg.expert_epochs)
            steps = plan_steps(len(labels), batch, cfg.syn_steps, gen, int(torch.randint(2**31, (1,), generator=gen)))
            y = expert_soft_labels(net, target, u.detach()) if cfg.labels == "expert" else labels
            loss, gi, gl = grads(net, u.detach(), y, syn_lr.detach(), start, target, steps, augment)
            g_img += gi
            g_lr += gl
            loss_sum += loss
        packed = D.all_reduce_sum(torch.cat([g_img.flatten(), g_lr.view(1), loss_sum.view(1)]))
        u.grad = packed[:u.numel()].view_as(u) / cfg.trajectories
        syn_lr.grad = packed[-2] / cfg.trajectories
        opt_img.step()
        opt_lr.step()
        if cfg.clamp:
            with torch.no_grad():
                u.copy_(torch.maximum(torch.minimum(u, hi), lo))
        bar.update(1)
        if (it + 1) % cfg.output.log_every == 0 or it + 1 == cfg.iterations:
            loss_avg = float(packed[-1]) / cfg.trajectories  # host sync: log interval only
            losses.append(loss_avg)
            run.log({"iteration": it + 1, "loss": loss_avg, "syn_lr": float(syn_lr.detach())})
            bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{float(syn_lr.detach()):.4g}")
        if cfg.output.ckpt_every and (it + 1) % cfg.output.ckpt_every == 0 and it + 1 < cfg.iterations:
            save_state(it + 1)
    bar.close()
    if not torch.isfinite(u).all() or not torch.isfinite(syn_lr):
        raise GuardFastError(f"{cfg.method}: the images or the learned lr became non-finite; lower lr_img or lr_lr")
    save_state(cfg.iterations)
    result: dict[str, Any] = {}
    if info.is_main:
        result = _write_set(run, cfg, model, net, experts, u.detach(), labels, float(syn_lr.detach()), real.classes,
                            picked, key, manifest, losses)
    D.barrier()
    return D.broadcast_object(result)


def _write_set(run: RunDir, cfg: MTTConfig, model: Classifier, net: FlatNet, experts: Trajectories, u: torch.Tensor,
               labels: torch.Tensor, syn_lr: float, classes: list[str], picked: list[int], key: str,
               manifest: dict[str, Any], losses: list[float]) -> dict[str, Any]:
    """The float images (pixels.pt) and their 8-bit view as the shared synthetic-set format; the learned lr (and
    TESLA's soft labels) in its manifest."""
    floats = model.denormalize(u)  # (N, 3, S, S) pixel units, unclamped
    pixels = to_uint8(floats)
    items = [{"label": int(c), "ipc_index": i % cfg.ipc, "init_real_index": r}
             for i, (c, r) in enumerate(zip(labels.tolist(), picked, strict=True))]
    meta = {"images_key": key, "ipc": cfg.ipc, "image_size": int(u.shape[-1]), "dataset": cfg.data.dataset,
            "method": cfg.method, "syn_lr": syn_lr, "iterations": cfg.iterations, "buffer_key": manifest["key"],
            "expert_objective": manifest.get("objective", {"name": "none"})}
    if cfg.labels == "expert":
        # the soft labels of the float images, from expert 0 at the latest target epoch the run matched
        epoch = cfg.max_start_epoch - 1 + cfg.expert_epochs
        _, theta = experts.pair(0, epoch - cfg.expert_epochs, cfg.expert_epochs)
        probs = expert_soft_labels(net, theta, u).cpu()
        h = content_hash(pixels, torch.tensor([it["label"] for it in items]))
        atomic_torch_save(run.path / SOFT_LABELS_FILE, {"content_hash": h, "probs": probs})
        meta["soft_labels"] = {"file": SOFT_LABELS_FILE, "expert": 0, "epoch": epoch,
                               "what": "softmax of the expert's logits, (N, C) float32 in manifest order"}
    meta["init"], meta["clamp"] = cfg.init, cfg.clamp
    out = write_synthetic(run.path, pixels, items, classes, meta, floats=floats)
    save_grid(run.path / "grid.png", pixels, labels.cpu(), cfg.grid_classes)
    result = {"images": len(items), "ipc": cfg.ipc, "method": cfg.method, "syn_lr": syn_lr,
              "content_hash": out["content_hash"], "loss_first": losses[0] if losses else None,
              "loss_last": losses[-1] if losses else None}
    atomic_json(run.path / "result.json", result)
    return result
