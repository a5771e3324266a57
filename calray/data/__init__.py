"""Datasets: the registry and the built-in loaders (importing this registers them)."""

from calray.data.base import DATASETS, DatasetSplits, build_datasets, register_dataset
from calray.data import tensors  # noqa: F401  (synthetic, features)

__all__ = ["DATASETS", "DatasetSplits", "build_datasets", "register_dataset"]
