"""The soft-label files relabel writes and the student reads (below both stages).

`<root>/labels.json` describes the set (view config, image content_hash, teacher, epochs); `<root>/labels/epoch_<e>.pt`
holds one epoch's view plan and the teacher's fp16 logits (or top-k values and indices).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from guard_fast.data.synthetic import SyntheticSet
from guard_fast.data.views import EpochPlan, ViewConfig
from guard_fast.runtime.errors import GuardFastError, reading

LABELS = "labels.json"


def epoch_path(root: str | Path, epoch: int) -> Path:
    return Path(root) / "labels" / f"epoch_{epoch:05d}.pt"


class StoredLabels:
    """Reader for relabel's output, checked against the image set and view config the student uses."""

    def __init__(self, root: str | Path, images: SyntheticSet, views: ViewConfig, epochs: int):
        self.root = Path(root)
        path = self.root / LABELS
        if not path.is_file():
            raise GuardFastError(f"{path} not found: run guard-fast relabel first (or set soft_labels = 'online')")
        with reading(path, "soft-label record"):
            self.meta = json.loads(path.read_text())
            self._check(path, images, views, epochs)

    def _check(self, path: Path, images: SyntheticSet, views: ViewConfig, epochs: int) -> None:
        if self.meta["images_hash"] != images.content_hash:
            raise GuardFastError(f"{path}: soft labels were produced for a different image set "
                                 f"(images_hash {self.meta['images_hash'][:12]} vs {images.content_hash[:12]}); "
                                 "rerun relabel on these images")
        if self.meta["views_key"] != views.key():
            raise GuardFastError(f"{path}: soft labels use views {self.meta['views']}, the student config has "
                                 f"{asdict(views)}; make the [views] sections equal")
        if epochs > self.meta["epochs"]:
            raise GuardFastError(f"{path}: {self.meta['epochs']} epochs of soft labels, but optim.epochs = {epochs}")
        self.num_classes = int(self.meta["num_classes"])

    def epoch(self, e: int) -> tuple[EpochPlan, torch.Tensor]:
        """(plan, logits float (V, C)) of epoch e; top-k files expand to -inf outside the stored classes."""
        path = epoch_path(self.root, e)
        try:
            rec = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as ex:
            raise GuardFastError(f"{path}: unreadable soft-label file ({type(ex).__name__}); rerun relabel") from None
        with reading(path, "soft-label file"):
            return self._epoch(path, rec)

    def _epoch(self, path: Path, rec: dict) -> tuple[EpochPlan, torch.Tensor]:
        if rec.get("key") != self.meta["key"]:
            raise GuardFastError(f"{path}: written by another relabel configuration; rerun relabel")
        plan = EpochPlan.from_dict(rec)
        if "logits" in rec:
            logits = rec["logits"].float()
        else:
            logits = torch.full((len(plan.order), self.num_classes), float("-inf"))
            logits.scatter_(1, rec["topk_indices"].long(), rec["topk_values"].float())
        if logits.shape != (len(plan.order), self.num_classes):
            raise GuardFastError(f"{path}: logits of shape {tuple(logits.shape)}, expected "
                                 f"({len(plan.order)}, {self.num_classes}); rerun relabel")
        return plan, logits
