"""Wall time per attack per image with the paper's settings, so a full evaluation can be budgeted.

    python -m bench.attack_cost [--width 64] [--epochs 1] [--images 8] [--expensive-images 4] [--attack.KEY=VALUE]

A digits resnet18-cifar (32 px) is trained briefly (the cost of Square and AutoAttack depends on how many images
resist: both stop early on images they fool, so a random network would flatter them), then each attack of the
registry runs at eps 1/255 on val images the network classifies correctly - the only images guard-fast evaluate
attacks. Cheap attacks (PGD-100, CW, MIM) are timed `--reps` times on `--images` images, Square-5000 and AutoAttack
`--expensive-reps` times on `--expensive-images`; one discarded warm-up call each (on one image, 2-step/2-query
budget) comes first. Reported: seconds per attacked image, median and p20-p80 over repetitions, and the fraction of
attacked images still classified correctly. Nothing is extrapolated. Denormal floats are flushed to zero as guard-fast
evaluate does on CPU (evaluate.flush_denormal); one extra row times MIM with them kept, to show why.
Writes results/attack-cost.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch

from bench.common import RESULTS, summarize, write_results
from guard_fast.attacks.suite import ATTACKS, AttackConfig, build_attack, settings
from guard_fast.data import build_loader
from guard_fast.data.digits import prepare_digits
from guard_fast.models import build_model
from guard_fast.robustness.report import fmt_eps
from guard_fast.runtime.config import DataConfig, load_config

EXPENSIVE = ("square", "autoattack")
# Warm-up budget: the same code paths at a negligible cost.
WARMUP = {"pgd_steps": 2, "square_queries": 2, "aa_steps": 2, "aa_square_queries": 2, "aa_target_classes": 1,
          "cw_steps": 2, "mim_steps": 2}


def train_briefly(data: str, width: int, size: int, epochs: int) -> tuple[torch.nn.Module, dict]:
    """resnet18-cifar trained with Adam (lr 1e-3) on digits for `epochs` epochs (0 = random init)."""
    cfg = DataConfig(path=data, image_size=size, workers=0, batch_size=64)
    train = build_loader(cfg, "train")
    torch.manual_seed(0)
    model = build_model("resnet18-cifar", 10, train.spec.mean, train.spec.std, width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t = time.perf_counter()
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for x, y in train:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, {"epochs": epochs, "train_seconds": round(time.perf_counter() - t, 1)}


def clean_correct(model: torch.nn.Module, data: str, size: int, n: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The first n val images the model classifies correctly (any images if fewer are), and the val accuracy."""
    xs, ys, ok = [], [], []
    with torch.no_grad():
        for x, y in build_loader(DataConfig(path=data, image_size=size, workers=0, eval_batch_size=128), "val"):
            xs.append(x)
            ys.append(y)
            ok.append(model(x).argmax(1) == y)
    x, y, ok = torch.cat(xs), torch.cat(ys), torch.cat(ok)
    pick = ok.nonzero().flatten()[:n] if int(ok.sum()) >= n else torch.arange(n)
    return x[pick], y[pick], ok.float().mean().item()


def time_attack(model, name: str, cfg: AttackConfig, x: torch.Tensor, y: torch.Tensor, reps: int) -> dict:
    """Seconds per image over `reps` calls on (x, y), after one discarded warm-up call on one image."""
    warm = dataclasses.replace(cfg, **WARMUP)
    build_attack(name, model, warm, cfg.eps[0], 10, seed=0)(x[:1], y[:1])
    per_image, robust = [], []
    for rep in range(reps):
        torch.manual_seed(rep)
        attack = build_attack(name, model, cfg, cfg.eps[0], 10, seed=rep)
        t = time.perf_counter()
        adv = attack(x, y)
        per_image.append((time.perf_counter() - t) / len(y))
        with torch.no_grad():
            robust.append((model(adv).argmax(1) == y).float().mean().item())
    return {"seconds_per_image": summarize(per_image), "samples": per_image, "images": len(y),
            "still_correct": robust}


def _row(label: str, r: dict) -> list:
    s, reps = r["seconds_per_image"], len(r["samples"])
    return [label, r["images"], reps, round(s["median"], 3), f"{s['p20']:.3g}-{s['p80']:.3g}",
            f"{100 * sum(r['still_correct']) / reps:.0f}"]


def time_all(model, cfg: AttackConfig, x: torch.Tensor, y: torch.Tensor, args) -> tuple[dict, list]:
    """Every configured attack (denormals flushed), then MIM with denormals kept; (results, table rows)."""
    results, rows = {}, []
    for name in cfg.names:
        k, reps = (args.expensive_images, args.expensive_reps) if name in EXPENSIVE else (args.images, args.reps)
        print(f"timing {name} on {k} images x {reps}", flush=True)
        results[name] = time_attack(model, name, cfg, x[:k], y[:k], reps)
        rows.append(_row(ATTACKS[name].column, results[name]))
    if not args.no_denormal_row and "mim" in cfg.names:
        k = min(4, args.images)
        print(f"timing mim with denormals kept on {k} images x 2", flush=True)
        torch.set_flush_denormal(False)
        results["mim_denormals_kept"] = time_attack(model, "mim", cfg, x[:k], y[:k], 2)
        torch.set_flush_denormal(True)
        rows.append(_row("MIM, denormals kept", results["mim_denormals_kept"]))
    return results, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.attack_cost", epilog="Other --KEY=VALUE arguments set "
                                "attack settings (guard-fast evaluate's attack.KEY), e.g. --square_queries=100.")
    p.add_argument("--width", type=int, default=64, help="resnet18-cifar width (64 = ResNet-18)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--epochs", type=int, default=3, help="training epochs before timing (0 = random init)")
    p.add_argument("--images", type=int, default=8, help="images per timed call of PGD-100, CW, MIM")
    p.add_argument("--reps", type=int, default=3, help="timed calls of PGD-100, CW, MIM")
    p.add_argument("--expensive-images", type=int, default=4, help="images per timed call of Square, AutoAttack")
    p.add_argument("--expensive-reps", type=int, default=2, help="timed calls of Square, AutoAttack")
    p.add_argument("--no-denormal-row", action="store_true", help="skip the MIM row with denormals kept")
    p.add_argument("--data", default="data/digits")
    p.add_argument("--out", default=str(RESULTS))
    args, rest = p.parse_known_args(argv)
    cfg = load_config(AttackConfig, overrides=rest)
    prepare_digits(args.data)
    load_before = os.getloadavg()
    torch.set_flush_denormal(True)  # as guard-fast evaluate on CPU (its flush_denormal key)
    try:
        model, facts = train_briefly(args.data, args.width, args.size, args.epochs)
        x, y, val_acc = clean_correct(model, args.data, args.size, max(args.images, args.expensive_images))
        with torch.no_grad():
            t = time.perf_counter()
            model(x)
            clean = (time.perf_counter() - t) / len(y)
        attacks, rows = time_all(model, cfg, x, y, args)
    finally:
        torch.set_flush_denormal(False)
    results = {"clean_forward_seconds_per_image": clean, "val_accuracy": val_acc, "attacks": attacks,
               "settings": settings(cfg, 10)}
    header = ["attack", "images", "reps", "s / image (median)", "p20-p80", "% still correct"]
    notes = (f"resnet18-cifar width {args.width}, {args.size} px digits, trained {facts['epochs']} epoch(s) "
             f"(val accuracy {100 * val_acc:.1f}%); eps {fmt_eps(cfg.eps[0])}, "
             + ("the paper's settings (PGD-100 step eps/4, Square 5000 queries, AutoAttack standard with torchattacks' "
                "10 sub-attack steps, CW c 1e-4 / 50 steps, MIM 20 steps)" if not rest else
                "the paper's settings with overrides " + " ".join(rest))
             + f". Timed on clean-correct val images, batched as listed, denormals flushed to zero as guard-fast "
             f"evaluate does on CPU; clean forward {1000 * clean:.2f} ms/image. Square and AutoAttack stop early on "
             "images they fool, so their cost grows with robustness. Load average (1/5/15 min) before: "
             f"{tuple(round(v, 2) for v in load_before)}, after: {tuple(round(v, 2) for v in os.getloadavg())} "
             "(the CPU is shared).")
    config = {**{k: v for k, v in vars(args).items() if k not in ("out", "data")}, **facts, "eps": fmt_eps(cfg.eps[0]),
              "attack_overrides": " ".join(rest) or "none"}
    for path in write_results("attack-cost", config, results, header, rows, out_dir=args.out, notes=notes):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
