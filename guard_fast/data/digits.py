"""The bundled real dataset: scikit-learn's 1,797 handwritten digits as an ImageFolder of RGB PNGs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from guard_fast.runtime.errors import GuardFastError
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


def _png(image: np.ndarray, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").resize((size, size), Image.BICUBIC).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def check_own_folder(out: Path, expected: set[Path]) -> None:
    """prepare-digits writes only into an empty folder or its own: one holding its manifest, or (a killed first
    run, no manifest yet) only files it writes itself. Anything else is refused before a file is written."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        manifest = None
    if isinstance(manifest, dict) and manifest.get("dataset") == "digits" and "train_ids" in manifest:
        return
    names = {p.relative_to(out) for p in expected}
    foreign = [p for p in sorted(out.rglob("*"))
               if (p.is_file() or p.is_symlink()) and p.relative_to(out) not in names and p.name != "manifest.json"
               and not (p.name.startswith(".") and p.name.endswith(".tmp"))]
    if foreign or (out / "manifest.json").exists():
        shown = foreign[0] if foreign else out / "manifest.json"
        raise GuardFastError(f"--out {out} holds files that are not a digits dataset written by prepare-digits "
                             f"(e.g. {shown}); choose an empty or new folder (nothing was written)")


def prepare_digits(out: str | Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write out/{train,val}/<digit>/<index>.png (RGB, `size` px, bicubic upscale of the 8x8 originals).

    Idempotent and self-repairing: every image is rendered in memory and compared with the file on disk; only a
    missing, truncated or edited file is (atomically) rewritten, files our manifest does not list are removed, and
    the manifest is rewritten only when it changes. Prints how many files it repaired.
    """
    from sklearn.datasets import load_digits

    out = Path(out)
    manifest_path = out / "manifest.json"
    want = {"dataset": "digits", "size": size, "val_fraction": val_fraction, "seed": seed}
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    train_ids, val_ids = stratified_split(labels, val_fraction, seed)
    counts: dict[str, dict[str, int]] = {}
    expected = {out / split / str(labels[i]) / f"{i:04d}.png" for split, ids in (("train", train_ids),
                                                                                 ("val", val_ids)) for i in ids}
    check_own_folder(out, expected)
    repaired = 0
    for split, ids in (("train", train_ids), ("val", val_ids)):
        counts[split] = {}
        for i in ids:
            data = _png(images[i], size)
            path = out / split / str(labels[i]) / f"{i:04d}.png"
            if not path.is_file() or path.read_bytes() != data:
                repaired += path.exists()
                atomic_write(path, lambda f, data=data: f.write(data))
            counts[split][str(labels[i])] = counts[split].get(str(labels[i]), 0) + 1
    if manifest_path.is_file():  # the folder is ours: drop files that are not part of the dataset
        extra = [p for split in ("train", "val") for p in (out / split).rglob("*") if p.is_file() and p not in expected]
        for p in extra:
            p.unlink()
        repaired += len(extra)
    if repaired:
        print(f"{out}: repaired {repaired} damaged, edited or extra files")
    manifest = {**want, "num_images": len(labels), "train": len(train_ids), "val": len(val_ids), "counts": counts,
                "train_ids": train_ids.tolist(), "val_ids": val_ids.tolist()}
    try:
        unchanged = json.loads(manifest_path.read_text()) == manifest
    except (OSError, ValueError):
        unchanged = False
    if not unchanged:
        atomic_json(manifest_path, manifest)  # written last: its presence means the folder is complete
    return manifest
