"""The distilled (synthetic) image set on disk: an ImageFolder of lossless PNGs plus `manifest.json`.

Layout written by recover: `<dir>/images/<class>/<class>_ipc<k>.png`, `<dir>/manifest.json`. The manifest holds the
class names, IPC, image size, one entry per image (file, label, IPC index, chunk, seed) and `content_hash`: a SHA-256
of the uint8 pixels and labels in manifest order. Relabel records that hash and the student refuses soft labels made
for a different image set. `images/` is a plain ImageFolder (torchvision, `guard-fast data to-ffcv`).

Float sets: the optimization-based distillers (DC, GUARD(DC), MTT, TESLA) also write `pixels.pt`, the optimized images
as float32 pixel-unit tensors, neither clamped to [0,1] nor rounded to 8 bits (none of the authors' codes does either:
their students train on the float tensors), with its own hash in the manifest (`float_pixels`). That file is the
stored set; the PNGs are its 8-bit view. `SyntheticSet.train_pixels(quantize)` gives students the floats, or the
8-bit PNG values with quantize = true (and always for sets without floats, such as recover's).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from guard_fast.data.folder import scan_folder
from guard_fast.runtime.config import DataConfig
from guard_fast.runtime.errors import GuardFastError, reading
from guard_fast.runtime.io import atomic_json, atomic_torch_save, atomic_write
from guard_fast.runtime.runfolder import inside

MANIFEST = "manifest.json"
FLOATS = "pixels.pt"


def content_hash(pixels: torch.Tensor, labels: torch.Tensor) -> str:
    """SHA-256 over uint8 pixels (N, 3, S, S) and int64 labels (N,), in order."""
    h = hashlib.sha256()
    h.update(pixels.contiguous().numpy().tobytes())
    h.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def float_hash(pixels: torch.Tensor, labels: torch.Tensor) -> str:
    """SHA-256 over float32 pixels (N, 3, S, S) and int64 labels (N,), in order."""
    h = hashlib.sha256()
    h.update(pixels.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0,1] float (..., 3, S, S) -> uint8, round to nearest."""
    return (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def write_png(path: Path, pixels: torch.Tensor) -> None:
    """uint8 (C, S, S) -> lossless PNG (atomic): RGB for C = 3, grayscale ("L") for C = 1."""
    hwc = pixels.permute(1, 2, 0).numpy()
    img = Image.fromarray(hwc[..., 0], mode="L") if hwc.shape[-1] == 1 else Image.fromarray(hwc, mode="RGB")
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def write_synthetic(root: Path, pixels: torch.Tensor, items: list[dict[str, Any]], classes: list[str],
                    meta: dict[str, Any], floats: torch.Tensor | None = None) -> dict[str, Any]:
    """Write every image, the float set `floats` (pixel units, (N, 3, S, S), if given) and then (last, atomically)
    the manifest. `items[i]` describes pixels[i] and gets a 'file' key. Returns the manifest."""
    labels = torch.tensor([it["label"] for it in items], dtype=torch.int64)
    for it, px in zip(items, pixels, strict=True):
        name = classes[it["label"]]
        it["file"] = f"images/{name}/{name}_ipc{it['ipc_index']:04d}.png"
        write_png(root / it["file"], px)
    if floats is not None:
        floats = floats.detach().float().cpu().contiguous()
        if floats.shape != pixels.shape:
            raise ValueError(f"float set {tuple(floats.shape)} vs 8-bit view {tuple(pixels.shape)}")
        fh = float_hash(floats, labels)
        atomic_torch_save(root / FLOATS, {"pixels": floats, "labels": labels, "hash": fh})
        meta = {**meta, "float_pixels": {"file": FLOATS, "hash": fh, "what": "float32 pixel units, unclamped, "
                                         "(N, 3, S, S) in manifest order: the optimized set"}}
    manifest = {**meta, "classes": classes, "num_images": len(items), "items": items,
                "content_hash": content_hash(pixels, labels)}
    atomic_json(root / MANIFEST, manifest)
    return manifest


def class_names(cfg: DataConfig, num_classes: int) -> list[str]:
    """The real train folder's class names when available (so folders line up with the real data), else 0000..."""
    train = Path(cfg.path) / "train"
    if train.is_dir():
        names, _ = scan_folder(train)
        if len(names) == num_classes:
            return names
    return [f"{c:04d}" for c in range(num_classes)]


def save_grid(path: Path, pixels: torch.Tensor, labels: torch.Tensor, max_classes: int, max_cols: int = 10) -> None:
    """grid.png: one row per class (the first `max_classes`), up to `max_cols` images each."""
    import torchvision.utils as vutils

    rows = []
    classes = sorted(set(labels.tolist()))[:max_classes]
    max_cols = min(max_cols, max(int((labels == c).sum()) for c in classes))
    for c in classes:
        imgs = pixels[labels == c][:max_cols]
        pad = torch.zeros((max_cols - len(imgs), *imgs.shape[1:]), dtype=imgs.dtype)
        rows.append(torch.cat([imgs, pad]))
    grid = vutils.make_grid(torch.cat(rows).float() / 255, nrow=max_cols, padding=2, pad_value=1.0)
    img = Image.fromarray(to_uint8(grid).permute(1, 2, 0).numpy())
    atomic_write(path, lambda f: img.save(f, format="PNG"))


@dataclass
class SyntheticSet:
    pixels: torch.Tensor  # (N, 3, S, S) uint8, manifest order
    labels: torch.Tensor  # (N,) int64
    manifest: dict[str, Any]
    floats: torch.Tensor | None = None  # (N, 3, S, S) float32 pixel units (pixels.pt), or None

    def train_pixels(self, quantize: bool = False) -> torch.Tensor:
        """What a student trains on, float (N, 3, S, S) in pixel units: the float set, or the 8-bit values / 255
        with `quantize` or when the set has no floats."""
        if self.floats is None or quantize:
            return self.pixels.float().div(255)
        return self.floats

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def image_size(self) -> int:
        return int(self.pixels.shape[-1])

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise GuardFastError(f"{path} not found: not a recovered image set (run guard-fast recover first)")
    with reading(path, "image-set manifest"):
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    return manifest


def load_synthetic(root: str | Path, num_classes: int | None = None, verify: bool = True) -> SyntheticSet:
    """Read the image set in manifest order. Checks: every file present and readable, IPC images per class, the
    class count (if given) and, with `verify`, that the pixels still hash to the manifest's content_hash."""
    root = Path(root)
    manifest = read_manifest(root)
    with reading(root / MANIFEST, "image-set manifest"):
        return _load_synthetic(root, manifest, num_classes, verify)


def _load_synthetic(root: Path, manifest: dict[str, Any], num_classes: int | None, verify: bool) -> SyntheticSet:
    classes, items = manifest["classes"], manifest["items"]
    if num_classes is not None and len(classes) != num_classes:
        raise GuardFastError(f"{root}/{MANIFEST}: {len(classes)} classes, but the data config has {num_classes} "
                             "(data.dataset / data.num_classes)")
    counts = np.bincount([it["label"] for it in items], minlength=len(classes))
    if (counts != manifest["ipc"]).any():
        bad = int(np.argmax(counts != manifest["ipc"]))
        raise GuardFastError(f"{root}/{MANIFEST}: class {classes[bad]!r} has {counts[bad]} images, expected ipc = "
                             f"{manifest['ipc']}")
    pixels = []
    for it in items:
        path = inside(root, it["file"], f"{root / MANIFEST}: item")  # no file is read from outside the set
        try:
            with Image.open(path) as img:
                gray = img.mode in ("L", "1", "I;16")  # a 1-channel set stays 1-channel
                arr = np.asarray(img.convert("L" if gray else "RGB"), dtype=np.uint8)
                pixels.append(torch.from_numpy((arr[..., None] if gray else arr).copy()))
        except (OSError, ValueError) as e:
            raise GuardFastError(f"{path}: cannot read recovered image ({e})") from None
    px = torch.stack(pixels).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([it["label"] for it in items], dtype=torch.int64)
    if verify and content_hash(px, labels) != manifest["content_hash"]:
        raise GuardFastError(f"{root}: images differ from {MANIFEST} (content_hash mismatch); rerun recover")
    return SyntheticSet(px, labels, manifest, load_floats(root, manifest, px.shape, labels, verify))


def load_floats(root: Path, manifest: dict[str, Any], shape: torch.Size, labels: torch.Tensor,
                verify: bool) -> torch.Tensor | None:
    """The set's pixels.pt (None if the manifest names none), checked against the manifest's hash and shape."""
    entry = manifest.get("float_pixels")
    if not entry:
        return None
    path = inside(root, entry["file"], f"{root / MANIFEST}: float_pixels")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GuardFastError(f"{path}: cannot load the float set ({type(e).__name__}: {e})") from None
    floats = blob["pixels"]
    if floats.shape != shape or (verify and float_hash(floats, labels) != entry["hash"]):
        raise GuardFastError(f"{path}: float images differ from {MANIFEST} (hash or shape mismatch); rerun the "
                             "distillation")
    return floats
