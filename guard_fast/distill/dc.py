"""DC (Zhao, Mopuri & Bilen, ICLR 2021): dataset condensation by gradient matching; GUARD(DC) (paper Algorithm 1).

Per outer iteration a fresh network (seeded by (seed, iteration)); per outer-loop step, for every class c:
gradients w.r.t. the network parameters of the real loss on a real batch of class c (batch_real images) and of CE on
the synthetic images of class c; matching distance (`match_distance`, DC's 'ours') summed over classes; one SGD step
on the synthetic images; then (except after the last step) inner_loop epochs of SGD on the synthetic set.

GUARD(DC) (`guard = true`): the real loss is CE + lam * R with R the curvature term of paper Eq. 11 on the real
batch (`guard_real_loss`), following the authors' main_CURE.py (yumozi/dataset_condensation): z = h sign(g) /
||sign(g)||_2 per image (g the input gradient of the batch-mean eval CE, in [0,1] pixel space),
R = mean_i ||grad_x ce(x+z)_i - grad_x ce(x)_i||_2 of batch-mean CE (each gradient carries 1/B, as in
docs/spec.md section 2, guard-curvature), evaluated in eval mode. Values: main_CURE.py was committed with h = 3,
lamda = 500 (2c46bd6) and changed in "Change default values for CURE" (7a38c42) to h = 0.6, lamda = 100, still the
newest version; the paper and the repository state no run script. Our defaults are the newest committed values,
h = 0.6 and lam = 100.

DSA (`dsa = true`; Zhao & Bilen, ICML 2021; VICO-UoE/DatasetCondensation main.py --method DSA): per class and
matching step one DSA draw (guard_fast/data/dsa.py, one parameter value for the whole batch) is applied to the real
batch and to the class's synthetic images alike (main.py:185-188 call DiffAugment twice with the same seed, whose
Siamese mode copies image 0's parameters to every image, utils.py:495-520), in `dsa_space` (VICO: normalized), before
both losses; every inner-loop batch gets a draw per image (main.py:215, utils.py:309-311). GUARD(DSA) (`dsa` and
`guard`) adds R on the augmented real batch: our composition (main_CURE.py runs DSA and CURE as exclusive methods).

Spaces (`space`): which tensor the synthetic images are. "pixel" is main_CURE.py's, the code behind the paper's
Table 5 for both DC and GUARD(DC) (`--method DC` and `--method CURE` of the same script): data loaded without
normalization (utils.py:55), every network Normalize-then-ConvNet (main_CURE.py:149, 173), so the images are raw
pixel-unit tensors (noise init randn, mean 0 and std 1 in pixel units, main_CURE.py:98) and each SGD step moves
pixels by lr_img times the pixel gradient. "normalized" is VICO-UoE/DatasetCondensation's original DC (main.py:88,
100; data normalized at load, utils.py:52): the images are normalized tensors, and one step moves pixels std^2 (about
0.04 on CIFAR-10) times as far. In both the real batch and R are computed on [0,1] pixels through the model's own
normalization, which equals the normalized-space network on normalized data. Neither code clamps or quantizes the
images (clamp = true clips them to [0,1] pixels after every step, our earlier behaviour); the stored set is the
float tensors (pixels.pt), the PNGs their 8-bit view.

Where we differ from the reference and why:
- every random choice (network init, real batches, inner-loop shuffles) comes from seeds derived from (seed,
  iteration, step, class): rank-count independent and resumable (the reference uses the global RNG);
- the network is put back in train mode after R (the reference leaves it in eval mode until the next inner epoch;
  no difference for the instance-norm ConvNet, which has no running statistics);
- networks with BatchNorm are refused (the reference freezes BN statistics on a real batch first; not implemented);
- z's helper is local: guard_fast.squeeze is a stage package, and no stage imports another.

Distribution: classes are dealt to ranks (c % world == rank; independent given the network); each rank's image
gradient is non-zero only on its own classes' rows, so the all-reduced sum is exact and every rank takes the same
image step; the inner-loop training runs identically on every rank. Rank 0 checkpoints (images + momentum) every
ckpt_every iterations; a rerun resumes from there and reproduces the uninterrupted run.

The settings (`DCConfig`, DC's loop table) are guard_fast/distill/dc_config.py.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from guard_fast.attacks.pgd import pgd
from guard_fast.data import build_loader
from guard_fast.data.dsa import apply_dsa_in, sample_dsa
from guard_fast.data.presets import resolve_dataset
from guard_fast.data.synthetic import class_names, save_grid, to_uint8, write_synthetic
from guard_fast.distill.dc_config import CPU_CHUNK, DCConfig
from guard_fast.distill.gradmatch import guard_real_loss, match_distance
from guard_fast.distill.imagestate import resume_state, save_state, saved_cpu, seeded
from guard_fast.models import Classifier, model_from_config
from guard_fast.runtime import distributed as D
from guard_fast.runtime.cluster import open_run
from guard_fast.runtime.distributed import DistInfo
from guard_fast.runtime.errors import ConfigError, GuardFastError
from guard_fast.runtime.io import atomic_json, atomic_torch_save
from guard_fast.runtime.runfolder import stage


def chunk_size(cfg: DCConfig, device: torch.device, batch: int) -> int:
    """Images per forward/backward pass: cfg.chunk, or (0) CPU_CHUNK on a CPU and the whole batch elsewhere."""
    return cfg.chunk or (CPU_CHUNK if device.type == "cpu" else batch)


def real_gradients(cfg: DCConfig, net: Classifier, params: list[torch.Tensor], x: torch.Tensor,
                   y: torch.Tensor) -> list[torch.Tensor]:
    """Gradients w.r.t. `params` of the real batch's loss (CE, or CE + lam R with guard), summed over passes of
    chunk_size images: the one-pass gradient up to float rounding."""
    total: list[torch.Tensor] = []
    size = chunk_size(cfg, x.device, len(x))
    for xs, ys in zip(x.split(size), y.split(size), strict=True):
        loss, _ = guard_real_loss(net, xs, ys, cfg.lam, cfg.h, guard=cfg.guard, batch=len(x))
        grads = torch.autograd.grad(loss, params)
        total = [g.detach() for g in grads] if not total else [t.add_(g) for t, g in zip(total, grads, strict=True)]
    return total


def images_key(cfg: DCConfig, spec: dict[str, Any]) -> str:
    """Hash of everything that determines the images (not output, progress, checkpoint cadence or world size)."""
    c = asdict(cfg)
    for k in ("output", "stop_after", "grid_classes", "ckpt_every", "chunk"):
        c.pop(k)
    c["dist"], c["spec"] = {"seed": cfg.dist.seed}, spec
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_real(cfg: DCConfig, num_classes: int, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """The whole train split, resized without augmentation, as one (N_c, 3, S, S) tensor per class; every rank
    loads all of it (a rank needs any class's images for init)."""
    loader = build_loader(cfg.data, "train", train=False, drop_last=False, rank=0, world=1, device="cpu")
    xs, ys = zip(*((x, y) for x, y in loader), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    per_class = [x[y == c].to(device, dtype) for c in range(num_classes)]
    names = loader.classes
    for c, imgs in enumerate(per_class):
        if len(imgs) == 0:
            raise GuardFastError(f"{cfg.data.path}: class {names[c]!r} has no images in the train split")
        if cfg.init == "real" and len(imgs) < cfg.ipc:
            raise GuardFastError(f"ipc = {cfg.ipc} exceeds the {len(imgs)} train images of class {names[c]!r} "
                                 "(init = real needs ipc distinct images per class)")
    return per_class


def init_images(cfg: DCConfig, real: list[torch.Tensor], model: Classifier, size: int,
                dtype: torch.dtype) -> torch.Tensor:
    """(C * ipc, 3, S, S) in the units of cfg.space, class-major."""
    num_classes, device = len(real), real[0].device
    if cfg.init == "noise":
        return torch.randn((num_classes * cfg.ipc, model.channels, size, size), generator=seeded(cfg.dist.seed, 1),
                           dtype=dtype).to(device)
    picks = torch.cat([real[c][torch.randperm(len(real[c]), generator=seeded(cfg.dist.seed, 2, c))[:cfg.ipc]]
                       for c in range(num_classes)])  # (C * ipc, 3, S, S) in [0, 1]
    return (picks if cfg.space == "pixel" else model.normalize(picks)).to(dtype)


def syn_logits(cfg: DCConfig, net: Classifier, u: torch.Tensor) -> torch.Tensor:
    """The network on synthetic images u: net(u) normalizes pixel-space images, net.body takes normalized ones."""
    return net(u) if cfg.space == "pixel" else net.body(u)


def to_pixels(cfg: DCConfig, net: Classifier, u: torch.Tensor) -> torch.Tensor:
    """Synthetic images in pixel units (unclamped)."""
    return u if cfg.space == "pixel" else net.denormalize(u)


@torch.no_grad()
def clamp_images(cfg: DCConfig, net: Classifier, u: torch.Tensor) -> None:
    """clamp = true: clip u in place to the [0,1] pixel range (its normalized image in normalized space)."""
    if not cfg.clamp:
        return
    if cfg.space == "pixel":
        u.clamp_(0, 1)
    else:
        u.copy_(net.normalize(net.denormalize(u).clamp(0, 1)))


def fresh_network(cfg: DCConfig, spec, it: int, device: torch.device, dtype: torch.dtype) -> Classifier:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.dist.seed * 1_000_003 + it)
        net = model_from_config(cfg.model, spec)
    return net.to(device, dtype).train()


def outer_iteration(cfg: DCConfig, info: DistInfo, net: Classifier, u: torch.Tensor, opt: torch.optim.Optimizer,
                    real: list[torch.Tensor], it: int) -> torch.Tensor:
    """One outer iteration on a fresh network; returns the (rank-summed) mean matching loss per class and step."""
    outer, inner = cfg.loops()
    num_classes, ipc = len(real), cfg.ipc
    params = list(net.parameters())
    labels = torch.arange(num_classes, device=u.device).repeat_interleave(ipc)
    total = u.new_zeros(())
    for ol in range(outer):
        loss = u.new_zeros(())
        for c in range(info.rank, num_classes, info.world):  # this rank's classes
            pick = torch.randperm(len(real[c]), generator=seeded(cfg.dist.seed, 3, it, ol, c))[:cfg.batch_real]
            x_real = real[c][pick]  # (batch_real, 3, S, S) in [0,1]
            y_real = torch.full((len(x_real),), c, device=u.device)
            if cfg.attack == "pgd":
                x_real = pgd(net, x_real, y_real, cfg.attack_eps, cfg.attack_alpha, cfg.attack_steps,
                             random_start=True, generator=seeded(cfg.dist.seed, 5, it, ol, c))
            u_c = u[c * ipc:(c + 1) * ipc]  # (ipc, 3, S, S) in the units of cfg.space
            if cfg.dsa:  # siamese: ONE draw (n = 1) for both batches (VICO main.py:185-188, same seed twice)
                draw = sample_dsa(seeded(cfg.dist.seed, 6, it, ol, c), cfg.dsa_strategy, *u.shape[2:])
                x_real = augment(cfg, net, x_real, draw, "pixel")
                u_c = augment(cfg, net, u_c, draw, cfg.space)
            gw_real = real_gradients(cfg, net, params, x_real, y_real)
            loss_syn = F.cross_entropy(syn_logits(cfg, net, u_c), labels[c * ipc:(c + 1) * ipc])
            gw_syn = torch.autograd.grad(loss_syn, params, create_graph=True)
            loss = loss + match_distance(list(gw_syn), gw_real)
        opt.zero_grad(set_to_none=False)
        if loss.requires_grad:  # a rank with no class (world > classes) contributes zeros
            loss.backward()
        D.all_reduce_sum(u.grad)  # disjoint rows per rank: the sum is exact
        opt.step()
        clamp_images(cfg, net, u)
        total = total + loss.detach()
        if ol == outer - 1:
            break
        train_network(cfg, net, u.detach(), labels, it, ol, inner)
    return D.all_reduce_sum(total) / (num_classes * outer)


def augment(cfg: DCConfig, net: Classifier, x: torch.Tensor, draw, given: str) -> torch.Tensor:
    """`draw` applied in cfg.dsa_space to x given in space `given` ("pixel" or "normalized"); result in `given`."""
    return apply_dsa_in(x, draw, cfg.dsa_space, given, net.mean, net.std)


def train_network(cfg: DCConfig, net: Classifier, u: torch.Tensor, labels: torch.Tensor, it: int, ol: int,
                  inner: int) -> None:
    """inner epochs of plain SGD (lr_net) on the synthetic set, seeded shuffles; identical on every rank. With dsa,
    every batch gets DSA with one draw per image (VICO main.py:215 -> utils.py:309-311, seed -1). A batch's gradient
    is accumulated over passes of chunk_size images (its batch-mean CE, up to float rounding)."""
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)
    net.train()
    for il in range(inner):
        order = torch.randperm(len(u), generator=seeded(cfg.dist.seed, 4, it, ol, il)).to(u.device)
        for b, ids in enumerate(order.split(cfg.batch_train)):
            x = u[ids]
            if cfg.dsa:
                draw = sample_dsa(seeded(cfg.dist.seed, 7, it, ol, il, b), cfg.dsa_strategy, *u.shape[2:], len(ids))
                x = augment(cfg, net, x, draw, cfg.space)
            opt.zero_grad(set_to_none=True)
            size = chunk_size(cfg, u.device, len(ids))
            for xs, ys in zip(x.split(size), labels[ids].split(size), strict=True):
                (F.cross_entropy(syn_logits(cfg, net, xs), ys, reduction="sum") / len(ids)).backward()
            opt.step()


@stage("dc")
def run_dc(cfg: DCConfig, info: DistInfo) -> dict[str, Any]:
    """Condense the train split into cfg.ipc images per class: output.dir/{images/, manifest.json, grid.png,
    images.pt (the float images), state.pt (resume), result.json}."""
    run = open_run(cfg.output.dir, cfg, info=info)  # every rank agrees on the folder
    spec = resolve_dataset(cfg.data)
    dtype = torch.float64 if cfg.float64 else torch.float32
    key = images_key(cfg, asdict(spec))
    probe = model_from_config(cfg.model, spec)
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in probe.modules()):
        raise ConfigError(f"model.arch = {cfg.model.arch!r} has BatchNorm; DC here supports networks without "
                          "running statistics (convnet, convnet-d4, convnet-d5)")
    real = load_real(cfg, spec.num_classes, info.device, dtype)
    probe = probe.to(info.device, dtype)
    u = init_images(cfg, real, probe, spec.image_size, dtype).requires_grad_(True)
    u.grad = torch.zeros_like(u)
    opt = torch.optim.SGD([u], lr=cfg.lr_img, momentum=cfg.momentum_img)
    run.start()  # inputs checked: write the run's record
    state_path = run.path / "state.pt"
    start = resume_state(state_path, key, u, opt, info.device, "dc resume state")
    cpu0 = time.process_time() - saved_cpu(state_path)  # earlier sittings' CPU counts: result.json's cpu_s is the total
    bar = tqdm(total=cfg.iterations, initial=start, desc=method_name(cfg),
               disable=not (info.is_main and cfg.output.progress))
    for it in range(start, cfg.iterations):
        if cfg.stop_after and it - start >= cfg.stop_after:
            bar.close()
            return {"stopped_at_iteration": it}
        net = fresh_network(cfg, spec, it, info.device, dtype)
        loss = outer_iteration(cfg, info, net, u, opt, real, it)
        bar.update(1)
        if (it + 1) % cfg.output.log_every == 0 or it + 1 == cfg.iterations:
            value = float(loss)  # host sync: log interval
            run.log({"iteration": it + 1, "match_loss": value})
            bar.set_postfix(match=f"{value:.3g}")
        if cfg.ckpt_every and (it + 1) % cfg.ckpt_every == 0 and it + 1 < cfg.iterations:
            save_state(info, state_path, key, u, opt, it + 1, cpu_s=time.process_time() - cpu0)
    bar.close()
    result: dict[str, Any] = {}
    if info.is_main:
        result = write_result(cfg, run.path, u, probe, spec.num_classes, spec.image_size, key,
                              cpu_s=time.process_time() - cpu0)
    D.barrier()
    return D.broadcast_object(result)


def method_name(cfg: DCConfig) -> str:
    """DC, DSA, GUARD(DC) or GUARD(DSA)."""
    name = "DSA" if cfg.dsa else "DC"
    return f"GUARD({name})" if cfg.guard else name


def write_result(cfg: DCConfig, root: Path, u: torch.Tensor, model: Classifier, num_classes: int, size: int,
                 key: str, cpu_s: float) -> dict[str, Any]:
    """Synthetic-set format (images/, pixels.pt, manifest.json) + grid.png + images.pt (the optimized tensors, in
    the units of cfg.space) + result.json (rank 0; cpu_s: rank 0's CPU seconds over every sitting of the run)."""
    x = to_pixels(cfg, model, u.detach()).cpu()  # (N, 3, S, S) pixel units, unclamped
    labels = torch.arange(num_classes).repeat_interleave(cfg.ipc)
    atomic_torch_save(root / "images.pt", {"key": key, "images": u.detach().cpu(), "labels": labels,
                                           "space": cfg.space})
    items = [{"label": c, "ipc_index": k} for c in range(num_classes) for k in range(cfg.ipc)]
    pixels = to_uint8(x)
    meta = {"images_key": key, "ipc": cfg.ipc, "image_size": size, "dataset": cfg.data.dataset,
            "method": method_name(cfg), "iterations": cfg.iterations, "init": cfg.init,
            "space": cfg.space, "clamp": cfg.clamp}
    manifest = write_synthetic(root, pixels, items, class_names(cfg.data, num_classes), meta, floats=x)
    save_grid(root / "grid.png", pixels, labels, cfg.grid_classes)
    result = {"images": len(items), "ipc": cfg.ipc, "classes": num_classes, "guard": cfg.guard, "dsa": cfg.dsa,
              "content_hash": manifest["content_hash"], "cpu_s": round(cpu_s, 3)}
    atomic_json(root / "result.json", result)
    return result
