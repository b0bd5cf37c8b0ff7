"""Datasets and loaders: presets, the bundled digits data, ImageFolder (torch) and FFCV backends."""

from guard_fast.data.loader import Loader, build_loader
from guard_fast.data.presets import DATASETS, DatasetSpec, resolve_dataset

__all__ = ["DATASETS", "DatasetSpec", "Loader", "build_loader", "resolve_dataset"]
