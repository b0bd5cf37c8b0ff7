"""A tiny ImageNet-shaped ImageFolder: `classes` folders of 224 px JPEGs cut from scikit-learn's two photographs.

Used by `make gpu-check` (a synthetic ImageNet-shaped .beton for the squeeze smoke, no network) and by the toy-size
preset tests. Labels carry no signal (each class mixes crops of both photographs): this data exercises shapes, codecs
and code paths, not learning.

    python -m bench.toy_imagenet --out DIR [--classes 10] [--train 4] [--val 2] [--size 224]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def make_imagenet_folder(root: str | Path, classes: int = 10, train_per_class: int = 4, val_per_class: int = 2,
                         size: int = 224, seed: int = 0) -> Path:
    """root/{train,val}/n%08d/<i>.JPEG (quality 90), random size x size crops; returns root."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    root = Path(root)
    photos = load_sample_images().images  # two (427, 640, 3) uint8 photographs
    if size > min(p.shape[0] for p in photos):
        raise ValueError(f"size {size}: the photographs are 427 px high; use <= 427")
    rng = np.random.default_rng(seed)
    for split, k in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(k):
                img = photos[(c + i) % len(photos)]
                top = int(rng.integers(0, img.shape[0] - size + 1))
                left = int(rng.integers(0, img.shape[1] - size + 1))
                Image.fromarray(img[top:top + size, left:left + size]).save(folder / f"{i}.JPEG", quality=90)
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.toy_imagenet", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (gets train/ and val/)")
    p.add_argument("--classes", type=int, default=10, help="class folders")
    p.add_argument("--train", type=int, default=4, help="train images per class")
    p.add_argument("--val", type=int, default=2, help="val images per class")
    p.add_argument("--size", type=int, default=224, help="image side in pixels")
    args = p.parse_args(argv)
    make_imagenet_folder(args.out, args.classes, args.train, args.val, args.size)
    print(f"wrote {args.classes} classes x ({args.train} train + {args.val} val) {args.size} px JPEGs -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
