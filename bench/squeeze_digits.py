"""GUARD vs plain teachers on the bundled digits: clean and PGD accuracy at several eps (one command).

    python -m bench.squeeze_digits [--epochs 8] [--width 32] [--betas 1e-4,0.5]

Trains a `none` teacher and one `guard` teacher per beta with the same budget (configs/digits/squeeze.toml), then
evaluates each on the whole digits val split with PGD-20 (step eps/4, random start) at eps 1, 2, 4, 8 /255.
Writes results/squeeze-digits.{json,md}.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from bench.common import markdown_table, write_results
from guard_fast.attacks.accuracy import accuracy
from guard_fast.data import build_loader
from guard_fast.data.digits import prepare_digits
from guard_fast.models import build_model
from guard_fast.runtime.config import DataConfig
from guard_fast.runtime.io import atomic_text

REPO = Path(__file__).resolve().parent.parent
EPS = [1 / 255, 2 / 255, 4 / 255, 8 / 255]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.squeeze_digits")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--betas", default="1e-4,0.5", help="guard beta values to train (comma-separated)")
    p.add_argument("--data", default="data/digits")
    p.add_argument("--runs", default="runs/squeeze-digits")
    p.add_argument("--out", default=str(REPO / "results"))
    p.add_argument("--readme", default="", help="a Markdown file whose <!-- squeeze-digits:begin/end --> block to "
                   "refresh ('' = none; the table lives in results/squeeze-digits.md)")
    args = p.parse_args(argv)
    prepare_digits(args.data)
    variants = {"none": ["--objective.name=none"]}
    for b in args.betas.split(","):
        variants[f"guard beta={b}"] = ["--objective.name=guard", f"--objective.beta={b}"]
    common = ["--config", str(REPO / "configs/digits/squeeze.toml"), f"--data.path={args.data}",
              f"--optim.epochs={args.epochs}", f"--model.width={args.width}", "--val_every=0",
              "--output.progress=false", "--output.overwrite=true"]  # a rerun retrains in place
    rows, results = [], {}
    val = build_loader(DataConfig(path=args.data, workers=0), "val")
    for name, extra in variants.items():
        out = Path(args.runs) / name.replace(" ", "_").replace("=", "")
        print(f"training {name} -> {out}", flush=True)
        subprocess.run([sys.executable, str(REPO / "launchers/squeeze.py"), *common, f"--output.dir={out}", *extra],
                       check=True)
        model = build_model("resnet18-cifar", 10, val.spec.mean, val.spec.std, args.width, str(out / "teacher.pt"))
        torch.manual_seed(0)
        acc = accuracy(model, val, EPS, pgd_steps=20)
        results[name] = acc
        rows.append([name, *[round(100 * v, 2) for v in acc.values()]])
        print(name, acc, flush=True)
    header = ["teacher", "clean %", *[f"PGD-20 {round(e * 255)}/255 %" for e in EPS]]
    notes = (f"Digits (1438 train / 359 val, 32 px), resnet18-cifar width {args.width}, {args.epochs} epochs SGD, "
             "identical seed and budget; PGD-20 with step eps/4 and a random start on the whole val split.")
    config = {k: v for k, v in vars(args).items() if k not in ("out", "readme")}  # no machine paths in results
    paths = write_results("squeeze-digits", config, results, header, rows, out_dir=args.out, notes=notes)
    print("wrote", *paths)
    if args.readme:
        update_readme(Path(args.readme), markdown_table(header, rows) + "\n\n" + notes)
    return 0


def update_readme(path: Path, block: str, name: str = "squeeze-digits") -> None:
    """Replace the text between <!-- name:begin --> and <!-- name:end --> with `block` (so the README shows what
    the command measured, never a typed-in table)."""
    text = path.read_text()
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        return
    head, rest = text.split(begin, 1)
    atomic_text(path, head + begin + "\n" + block + "\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    raise SystemExit(main())
