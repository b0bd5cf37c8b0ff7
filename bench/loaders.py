"""Images/s of the ffcv and torch loaders, side by side in one run, on the data we train on.

--dataset photos (default): random 256 px crops of scikit-learn's two sample photographs (china.jpg, flower.jpg),
written once as a JPEG ImageFolder (2 classes, one per photograph) and as a .beton (JPEG mode).
--dataset digits: the bundled digits train split exactly as the demo trains on it (`prepare-digits`: 1,438 RGB PNGs
of 32 px, 10 classes) and its .beton in raw mode (what `guard-fast data to-ffcv` writes by default).
Both loaders decode, RandomResizedCrop to --size, flip, and produce float [0,1] batches; epochs alternate between the
backends so drift hits both alike.

    python -m bench.loaders [--dataset photos|digits] [--files 2000] [--size 224] [--batch 64] [--workers 2] [--reps 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.common import summarize, write_results
from guard_fast.data import build_loader
from guard_fast.runtime.config import DataConfig
from guard_fast.runtime.io import atomic_write


def make_jpeg_folder(root: Path, files: int, crop: int = 256, seed: int = 0) -> Path:
    """root/{train}/<photo>/<i>.jpg: `files` random crops in total (idempotent: reuses a complete folder)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    done = root / f".complete-{files}-{crop}-{seed}"
    if done.exists():
        return root
    photos = load_sample_images()
    rng = np.random.default_rng(seed)
    for i in range(files):
        c = i % len(photos.images)
        img = photos.images[c]  # (427, 640, 3) uint8
        top = rng.integers(0, img.shape[0] - crop + 1)
        left = rng.integers(0, img.shape[1] - crop + 1)
        tile = Image.fromarray(img[top:top + crop, left:left + crop])
        atomic_write(root / "train" / Path(photos.filenames[c]).stem / f"{i:05d}.jpg",
                     lambda f, t=tile: t.save(f, format="JPEG", quality=90))
    done.touch()
    return root


def epoch_rate(loader) -> float:
    """Images/s over one full epoch (the first batch included: workers are already warm after the warm-up)."""
    n = 0
    t0 = time.perf_counter()
    for x, _ in loader:
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loaders", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=("photos", "digits"), default="photos", help="which data (see above)")
    p.add_argument("--data", default="", help="cache folder for the images and the .beton (default data/bench-DATASET)")
    p.add_argument("--files", type=int, default=2000, help="number of 256 px JPEG crops")
    p.add_argument("--size", type=int, default=0, help="output side in pixels (default 224 photos, 32 digits)")
    p.add_argument("--batch", type=int, default=64, help="images per batch")
    p.add_argument("--workers", type=int, default=2, help="decode workers (processes for torch, threads for ffcv)")
    p.add_argument("--reps", type=int, default=3, help="measured epochs per backend (after one warm-up epoch)")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)

    from guard_fast.data.ffcv_backend import write_beton

    digits = args.dataset == "digits"
    args.size = args.size or (32 if digits else 224)
    root = Path(args.data or f"data/bench-{args.dataset}")
    if digits:
        from guard_fast.data.digits import prepare_digits

        if not (root / "train").is_dir():
            prepare_digits(root, size=32, val_fraction=0.2, seed=0)
    else:
        make_jpeg_folder(root, args.files)
    beton = root / "beton"
    if not (beton / "train.beton").exists():
        write_beton(root / "train", beton / "train.beton", mode="raw" if digits else "jpg", jpeg_quality=90,
                    workers=args.workers)
    common = dict(dataset="digits" if digits else "imagefolder", num_classes=10 if digits else 2,
                  image_size=args.size, batch_size=args.batch, workers=args.workers)
    loaders = {"torch": build_loader(DataConfig(path=str(root), backend="torch", **common), "train"),
               "ffcv": build_loader(DataConfig(path=str(beton), backend="ffcv", **common), "train")}
    samples: dict[str, list[float]] = {k: [] for k in loaders}
    for rep in range(args.reps + 1):
        for name, loader in loaders.items():  # interleaved: both backends see the same machine conditions
            loader.set_epoch(rep)
            rate = epoch_rate(loader)
            if rep > 0:  # epoch 0 is warm-up (worker start, numba compilation)
                samples[name].append(rate)
            print(f"rep {rep} {name}: {rate:.0f} img/s")
    stats = {k: summarize(v) for k, v in samples.items()}
    ratio = stats["ffcv"]["median"] / stats["torch"]["median"]
    rows = [[k, round(s["median"], 1), f"{s['p20']:.1f}-{s['p80']:.1f}", s["n"]] for k, s in stats.items()]
    config = {k: v for k, v in vars(args).items() if k not in ("out", "data")}
    if digits:
        data = f"the digits train split ({loaders['torch'].num_samples} RGB PNGs, 32 px; .beton in raw mode)"
    else:
        data = f"{args.files} random 256 px JPEG (q90) crops of scikit-learn's two sample photographs"
    notes = (f"ffcv / torch images/s: {ratio:.2f}x. Data: {data}; train pipeline RandomResizedCrop({args.size}) + "
             f"flip -> float [0,1]; {args.workers} workers (processes for torch, threads for ffcv).")
    kw = {"out_dir": args.out} if args.out else {}
    name = "loaders" if args.dataset == "photos" else f"loaders-{args.dataset}"
    paths = write_results(name, config, {"samples": samples, "stats": stats, "ffcv_over_torch": ratio},
                          ["backend", "images/s (median)", "p20-p80", "epochs"], rows, notes=notes, **kw)
    print(notes)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
