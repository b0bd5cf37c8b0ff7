"""The bundled real dataset: scikit-learn's 1,797 handwritten digits as an ImageFolder of RGB PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from guard_fast.runtime.io import atomic_json, atomic_write


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded shuffle; the first round(n * val_fraction) go to val. Returns sorted (train, val) ids."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        ids = np.flatnonzero(labels == c)
        ids = ids[rng.permutation(len(ids))]
        k = int(round(len(ids) * val_fraction))
        val.append(ids[:k])
        train.append(ids[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def prepare_digits(out: str | Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write out/{train,val}/<digit>/<index>.png (RGB, `size` px, bicubic upscale of the 8x8 originals).

    Idempotent: a folder whose manifest matches (size, val_fraction, seed) is left as it is.
    """
    from sklearn.datasets import load_digits

    out = Path(out)
    manifest_path = out / "manifest.json"
    want = {"dataset": "digits", "size": size, "val_fraction": val_fraction, "seed": seed}
    if manifest_path.is_file():
        have = json.loads(manifest_path.read_text())
        if all(have.get(k) == v for k, v in want.items()):
            return have
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    train_ids, val_ids = stratified_split(labels, val_fraction, seed)
    counts: dict[str, dict[str, int]] = {}
    for split, ids in (("train", train_ids), ("val", val_ids)):
        counts[split] = {}
        for i in ids:
            img = Image.fromarray(images[i], mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
            path = out / split / str(labels[i]) / f"{i:04d}.png"
            atomic_write(path, lambda f, img=img: img.save(f, format="PNG"))
            counts[split][str(labels[i])] = counts[split].get(str(labels[i]), 0) + 1
    manifest = {**want, "num_images": len(labels), "train": len(train_ids), "val": len(val_ids), "counts": counts,
                "train_ids": train_ids.tolist(), "val_ids": val_ids.tolist()}
    atomic_json(manifest_path, manifest)  # written last: its presence means the folder is complete
    return manifest
