"""Datasets: the registry and the built-in loaders (importing this registers them)."""

from calray.data.base import DATASETS, DatasetSplits, build_datasets, register_dataset
from calray.data import tensors  # noqa: F401  (synthetic, features)
from calray.data import cremad, av, nyud2, mvsa  # noqa: F401  (cremad, ks, ave, nyud2, mvsa_single)

__all__ = ["DATASETS", "DatasetSplits", "build_datasets", "register_dataset"]
