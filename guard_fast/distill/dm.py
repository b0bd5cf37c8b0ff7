"""DM (Zhao & Bilen, WACV 2023): dataset condensation by distribution matching.

Per iteration a freshly initialized network (seeded by (seed, iteration)), not trained, its parameters frozen; for
every class c a real batch of the class (batch_real images) and the class's synthetic images get the same DSA draw
(one parameter value for both batches: siamese), both are embedded by the network's features before the classifier
(ConvNet.embed: the flattened last pooled feature map), and the loss adds the squared L2 distance between the two
mean embeddings; one SGD step on the synthetic images per iteration, on the sum over classes.

What we follow: VICO-UoE/DatasetCondensation main_DM.py (53f63a6), its ConvNet branch (`'BN' not in args.model`,
:149-163): fresh net in train mode with requires_grad off (:139-144), real embedding detached (:160), loss
sum((mean_real - mean_syn)^2) summed over classes (:163), SGD(lr_img, momentum 0.5) (:102), one step per iteration
(:191-193). Defaults are its argparse defaults (:21-28): init real, lr_img 1.0 (the README's command for CIFAR-10
IPC 1/10/50), batch_real 256, 20000 iterations, DSA color_crop_cutout_flip_scale_rotate; the images are normalized
tensors (data normalized at load, utils.py:52) and DSA acts on them (space = normalized, dsa_space = normalized).
Neither clamps nor quantizes: the stored set is the float tensors (pixels.pt), the PNGs their 8-bit view.

Where we differ and why:
- every random choice (network init, real batches, DSA draws) comes from seeds derived from (seed, iteration,
  class): rank-count independent and resumable (the reference seeds DSA from the wall clock, main_DM.py:156);
- networks with BatchNorm (main_DM.py's ConvNetBN branch, :165-187, which embeds all classes in one batch) and
  networks without a ConvNet `features` block are refused;
- the real batch is held in [0,1] pixels and normalized by the model's own mean/std, which equals the reference's
  normalized-at-load data.

DM trains no network, so it has no GUARD variant: GUARD's term is a regularizer of a network's training (SRe2L's
teacher) or of a matched real-batch loss (DC, DSA); DM matches embeddings of untrained networks.

Distribution: classes are dealt to ranks (c % world == rank); each rank's image gradient is non-zero only on its own
classes' rows, so the all-reduced sum is exact and every rank takes the same step. Rank 0 checkpoints (images +
momentum) every ckpt_every iterations; a rerun resumes from there and reproduces the uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from guard_fast.data.dsa import SPACES as DSA_SPACES
from guard_fast.data.dsa import STRATEGY, apply_dsa_in, check_strategy, sample_dsa
from guard_fast.data.presets import resolve_dataset
from guard_fast.data.real import load_real
from guard_fast.data.synthetic import class_names, save_grid, to_uint8, write_synthetic
from guard_fast.distill.imagestate import resume_state, save_state, seeded
from guard_fast.models import Classifier, ModelConfig, model_from_config
from guard_fast.runtime import distributed as D
from guard_fast.runtime.bounds import NonNegative, Positive
from guard_fast.runtime.cluster import open_run
from guard_fast.runtime.config import DataConfig, DistConfig, OutputConfig
from guard_fast.runtime.distributed import DistInfo
from guard_fast.runtime.errors import ConfigError, GuardFastError
from guard_fast.runtime.io import atomic_json, atomic_torch_save
from guard_fast.runtime.runfolder import stage

INITS = ("real", "noise")
SPACES = ("normalized", "pixel")


@dataclass
class DMConfig:
    data: DataConfig = field(default_factory=DataConfig)
    """the real dataset (its train split is matched; loaded once into memory at the preset's size)"""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="convnet", width=128))
    """the network sampled fresh every iteration, only its features used (DM: ConvNet width 128)"""
    dist: DistConfig = field(default_factory=DistConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(dir="runs/dm"))
    ipc: int = 10
    """synthetic images per class"""
    init: str = "real"
    """real (random real images of the class: main_DM.py's default) or noise (standard normal in the units of
    `space`)"""
    space: str = "normalized"
    """what the images are: normalized ((x - mean) / std tensors: main_DM.py) or pixel (raw pixel-unit tensors)"""
    clamp: bool = False
    """clip the images to the [0,1] pixel range after every step (main_DM.py does not)"""
    iterations: int = 20000
    """image steps, each with a fresh network (main_DM.py: 20000)"""
    lr_img: Positive = 1.0
    """SGD learning rate of the synthetic images, in the units of `space` (main_DM.py: 1.0; README: 1 for CIFAR-10
    IPC 1/10/50, 10 for IPC >= 100)"""
    momentum_img: NonNegative = 0.5
    """SGD momentum of the synthetic images (main_DM.py: 0.5)"""
    batch_real: int = 256
    """real images per class per iteration (all of the class if it has fewer)"""
    dsa: bool = True
    """the same DSA draw on each class's real and synthetic batch (main_DM.py: on unless --dsa_strategy none)"""
    dsa_strategy: str = STRATEGY
    """DSA groups joined by '_' (main_DM.py: color_crop_cutout_flip_scale_rotate)"""
    dsa_space: str = "normalized"
    """where DSA acts: normalized (main_DM.py: data normalized at load) or pixel ([0,1] pixels)"""
    ckpt_every: int = 100
    """iterations between checkpoints of the images (rank 0; a rerun resumes from the newest)"""
    float64: bool = False
    """run in float64 (tests: exact 1 vs 2 rank parity)"""
    grid_classes: int = 10
    """classes (rows) shown in grid.png"""
    stop_after: int = 0
    """stop after this many iterations of this run as if killed (0 = run to the end; for tests)"""

    def validate(self) -> None:
        if min(self.ipc, self.iterations, self.batch_real) < 1:
            raise ConfigError("ipc, iterations and batch_real must be >= 1")
        if self.init not in INITS:
            raise ConfigError(f"init = {self.init!r}: valid values are {', '.join(INITS)}")
        if self.space not in SPACES:
            raise ConfigError(f"space = {self.space!r}: valid values are {', '.join(SPACES)}")
        if self.dsa_space not in DSA_SPACES:
            raise ConfigError(f"dsa_space = {self.dsa_space!r}: valid values are {', '.join(DSA_SPACES)}")
        try:
            check_strategy(self.dsa_strategy)
        except ValueError as e:
            raise ConfigError(f"dsa_strategy: {e}") from None
        if min(self.ckpt_every, self.stop_after) < 0:
            raise ConfigError("ckpt_every and stop_after must be >= 0")
        if self.lr_img <= 0 or self.momentum_img < 0:
            raise ConfigError("lr_img must be > 0 and momentum_img >= 0")


def embed(net: Classifier, v: torch.Tensor) -> torch.Tensor:
    """The body's features before the classifier on normalized input v: (B, 3, S, S) -> (B, F) (ConvNet.embed)."""
    return net.body.features(v).flatten(1)


def to_normalized(cfg: DMConfig, net: Classifier, u: torch.Tensor) -> torch.Tensor:
    """Synthetic images u (units of cfg.space) as normalized tensors."""
    return net.normalize(u) if cfg.space == "pixel" else u


def dm_loss(cfg: DMConfig, net: Classifier, u: torch.Tensor, real: list[torch.Tensor], it: int,
            classes: range) -> torch.Tensor:
    """sum over `classes` of ||mean_i embed(real_c)_i - mean_j embed(syn_c)_j||^2 (graph to u), DSA draw per
    (iteration, class) shared by both batches."""
    ipc, size = cfg.ipc, u.shape[2:]
    loss = u.new_zeros(())
    for c in classes:
        pick = torch.randperm(len(real[c]), generator=seeded(cfg.dist.seed, 3, it, c))[:cfg.batch_real]
        x_real = real[c][pick.to(real[c].device)].to(u.dtype) / 255  # (batch_real, 3, S, S) in [0, 1]
        u_c = u[c * ipc:(c + 1) * ipc]  # (ipc, 3, S, S) in the units of cfg.space
        if cfg.dsa:  # siamese: one draw (n = 1) for both batches (main_DM.py:155-158, same seed twice)
            draw = sample_dsa(seeded(cfg.dist.seed, 6, it, c), cfg.dsa_strategy, *size)
            x_real = apply_dsa_in(x_real, draw, cfg.dsa_space, "pixel", net.mean, net.std)
            u_c = apply_dsa_in(u_c, draw, cfg.dsa_space, cfg.space, net.mean, net.std)
        with torch.no_grad():
            e_real = embed(net, net.normalize(x_real))  # (batch_real, F), detached (main_DM.py:160)
        e_syn = embed(net, to_normalized(cfg, net, u_c))  # (ipc, F)
        loss = loss + ((e_real.mean(0) - e_syn.mean(0)) ** 2).sum()
    return loss


def fresh_network(cfg: DMConfig, spec, it: int, device: torch.device, dtype: torch.dtype) -> Classifier:
    """A newly initialized network, train mode, parameters frozen (main_DM.py:139-142)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.dist.seed * 1_000_003 + it)
        net = model_from_config(cfg.model, spec)
    net = net.to(device, dtype).train()
    net.requires_grad_(False)
    return net


def dm_step(cfg: DMConfig, info: DistInfo, net: Classifier, u: torch.Tensor, opt: torch.optim.Optimizer,
            real: list[torch.Tensor], it: int) -> torch.Tensor:
    """One iteration: this rank's classes' loss, backward, all-reduced gradient, one SGD step; returns the
    rank-summed loss divided by the number of classes (main_DM.py:197)."""
    loss = dm_loss(cfg, net, u, real, it, range(info.rank, len(real), info.world))
    opt.zero_grad(set_to_none=False)
    if loss.requires_grad:  # a rank with no class (world > classes) contributes zeros
        loss.backward()
    D.all_reduce_sum(u.grad)  # disjoint rows per rank: the sum is exact
    opt.step()
    if cfg.clamp:
        with torch.no_grad():
            u.copy_(u.clamp(0, 1) if cfg.space == "pixel" else net.normalize(net.denormalize(u).clamp(0, 1)))
    return D.all_reduce_sum(loss.detach()) / len(real)


def images_key(cfg: DMConfig, spec: dict[str, Any]) -> str:
    """Hash of everything that determines the images (not output, progress, checkpoint cadence or world size)."""
    c = asdict(cfg)
    for k in ("output", "stop_after", "grid_classes", "ckpt_every"):
        c.pop(k)
    c["dist"], c["spec"] = {"seed": cfg.dist.seed}, spec
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_network(cfg: DMConfig, probe: Classifier) -> None:
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in probe.modules()):
        raise ConfigError(f"model.arch = {cfg.model.arch!r} has BatchNorm; DM here follows main_DM.py's ConvNet "
                          "branch (convnet, convnet-d4, convnet-d5)")
    if not (hasattr(probe.body, "features") and hasattr(probe.body, "classifier")):
        raise ConfigError(f"model.arch = {cfg.model.arch!r}: DM embeds with a ConvNet's features before the "
                          "classifier (convnet, convnet-d4, convnet-d5)")


def init_images(cfg: DMConfig, real: list[torch.Tensor], net: Classifier, size: int,
                dtype: torch.dtype) -> torch.Tensor:
    """(C * ipc, 3, S, S) in the units of cfg.space, class-major."""
    num_classes, device = len(real), real[0].device
    if cfg.init == "noise":
        return torch.randn((num_classes * cfg.ipc, 3, size, size), generator=seeded(cfg.dist.seed, 1),
                           dtype=dtype).to(device)
    picks = torch.cat([real[c][torch.randperm(len(real[c]), generator=seeded(cfg.dist.seed, 2, c))[:cfg.ipc]]
                       for c in range(num_classes)]).to(dtype) / 255  # (C * ipc, 3, S, S) in [0, 1]
    return picks if cfg.space == "pixel" else net.normalize(picks)


def per_class(cfg: DMConfig, num_classes: int, device: torch.device) -> list[torch.Tensor]:
    """The train split as one uint8 (N_c, 3, S, S) tensor per class on `device`; every rank holds all of it."""
    data = load_real(cfg.data, "train")
    out = [data.pixels[data.labels == c].to(device) for c in range(num_classes)]
    for c, imgs in enumerate(out):
        if len(imgs) == 0 or (cfg.init == "real" and len(imgs) < cfg.ipc):
            raise GuardFastError(f"{cfg.data.path}: class {data.classes[c]!r} has {len(imgs)} train images; DM needs "
                                 f"at least one{f' and ipc = {cfg.ipc} for init = real' if cfg.init == 'real' else ''}")
    return out


@stage("dm")
def run_dm(cfg: DMConfig, info: DistInfo) -> dict[str, Any]:
    """Condense the train split into cfg.ipc images per class: output.dir/{images/, manifest.json, pixels.pt,
    grid.png, images.pt (the optimized tensors), state.pt (resume), result.json}."""
    run = open_run(cfg.output.dir, cfg, info=info)  # every rank agrees on the folder
    spec = resolve_dataset(cfg.data)
    dtype = torch.float64 if cfg.float64 else torch.float32
    key = images_key(cfg, asdict(spec))
    probe = model_from_config(cfg.model, spec)
    check_network(cfg, probe)
    real = per_class(cfg, spec.num_classes, info.device)
    probe = probe.to(info.device, dtype)
    u = init_images(cfg, real, probe, spec.image_size, dtype).requires_grad_(True)
    u.grad = torch.zeros_like(u)
    opt = torch.optim.SGD([u], lr=cfg.lr_img, momentum=cfg.momentum_img)
    run.start()  # inputs checked: write the run's record
    state_path = run.path / "state.pt"
    start = resume_state(state_path, key, u, opt, info.device, "dm resume state")
    bar = tqdm(total=cfg.iterations, initial=start, desc="dm", disable=not (info.is_main and cfg.output.progress))
    for it in range(start, cfg.iterations):
        if cfg.stop_after and it - start >= cfg.stop_after:
            bar.close()
            return {"stopped_at_iteration": it}
        net = fresh_network(cfg, spec, it, info.device, dtype)
        loss = dm_step(cfg, info, net, u, opt, real, it)
        bar.update(1)
        if (it + 1) % cfg.output.log_every == 0 or it + 1 == cfg.iterations:
            value = float(loss)  # host sync: log interval
            run.log({"iteration": it + 1, "match_loss": value})
            bar.set_postfix(match=f"{value:.3g}")
        if cfg.ckpt_every and (it + 1) % cfg.ckpt_every == 0 and it + 1 < cfg.iterations:
            save_state(info, state_path, key, u, opt, it + 1)
    bar.close()
    result: dict[str, Any] = {}
    if info.is_main:
        result = write_result(cfg, run.path, u, probe, spec.num_classes, spec.image_size, key)
    D.barrier()
    return D.broadcast_object(result)


def write_result(cfg: DMConfig, root: Path, u: torch.Tensor, model: Classifier, num_classes: int, size: int,
                 key: str) -> dict[str, Any]:
    """Synthetic-set format (images/, pixels.pt, manifest.json) + grid.png + images.pt + result.json (rank 0)."""
    x = (u.detach() if cfg.space == "pixel" else model.denormalize(u.detach())).cpu()  # (N, 3, S, S) pixels
    labels = torch.arange(num_classes).repeat_interleave(cfg.ipc)
    atomic_torch_save(root / "images.pt", {"key": key, "images": u.detach().cpu(), "labels": labels,
                                           "space": cfg.space})
    items = [{"label": c, "ipc_index": k} for c in range(num_classes) for k in range(cfg.ipc)]
    pixels = to_uint8(x)
    meta = {"images_key": key, "ipc": cfg.ipc, "image_size": size, "dataset": cfg.data.dataset, "method": "DM",
            "iterations": cfg.iterations, "init": cfg.init, "space": cfg.space, "clamp": cfg.clamp}
    manifest = write_synthetic(root, pixels, items, class_names(cfg.data, num_classes), meta, floats=x)
    save_grid(root / "grid.png", pixels, labels, cfg.grid_classes)
    result = {"images": len(items), "ipc": cfg.ipc, "classes": num_classes, "content_hash": manifest["content_hash"]}
    atomic_json(root / "result.json", result)
    return result
