"""Dataset registry and what every dataset returns.

A dataset builder takes the run config and returns `DatasetSplits`: train/val/test torch
datasets whose items are `(inputs, label)` with `inputs` a dict modality → tensor (or, for
text, a dict of tensors), plus metadata that the trainer saves with the run (the validation
index list, frame counts, skipped samples).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from pydantic import BaseModel, ValidationError
from torch.utils.data import Dataset, Subset

from calray.config import validation_error_message
from calray.errors import ConfigError
from calray.registry import DATASETS


@dataclass
class DatasetSplits:
    train: Dataset
    val: Dataset
    test: Dataset
    modalities: list[str]
    num_classes: int
    class_names: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # saved as data_info.json in the run dir


Builder = Callable[..., DatasetSplits]
def register_dataset(name: str, path_params: tuple[str, ...] = ()):
    """Register a dataset builder. `path_params`: its `data.params` keys that are filesystem paths
    relative to the working directory (not to data.root), made absolute wherever a run moves to
    another working directory (calray.config.absolute_paths)."""

    def deco(fn: Builder) -> Builder:
        fn.path_params = tuple(path_params)
        return DATASETS.register(name)(fn)

    return deco


def build_datasets(cfg) -> DatasetSplits:
    """Build the splits for `cfg` (a RunConfig), honouring `cfg.data.modalities`."""
    name = cfg.data.dataset
    splits = DATASETS.get(name)(cfg)  # the registry imports calray.data, which registers the built-ins
    if cfg.data.modalities:
        missing = [m for m in cfg.data.modalities if m not in splits.modalities]
        if missing:
            raise ConfigError(
                f"data.modalities: {missing} not provided by {name!r} (it has {splits.modalities})"
            )
        splits.modalities = list(cfg.data.modalities)
    return splits


def parse_params(model: type[BaseModel], params: dict, dataset: str) -> BaseModel:
    """Validate `data.params` with a dataset's own pydantic model; errors name `data.params.KEY`."""
    try:
        return model.model_validate(params or {})
    except ValidationError as e:
        raise ConfigError(validation_error_message(e, f"dataset {dataset!r}", prefix="data.params")) from None


def stratified_split(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of indices into (keep, held_out), both sorted.

    Each class contributes round(fraction·count) samples (at least one when the class has two
    or more), chosen by a seeded permutation.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        else:
            k = 0
        held.extend(rng.permutation(idx)[:k].tolist())
    held_arr = np.sort(np.asarray(held, dtype=np.int64))
    keep = np.setdiff1d(np.arange(len(labels)), held_arr)
    return keep, held_arr


def derive_val_split(train: Dataset, labels, fraction: float, seed: int) -> tuple[Dataset, Dataset, dict]:
    """Carve a stratified validation set out of `train`; returns (train, val, info)."""
    keep, held = stratified_split(labels, fraction, seed)
    digest = hashlib.sha256(json.dumps(held.tolist()).encode()).hexdigest()[:16]
    info = {
        "val_source": f"stratified {fraction:.0%} of train (seed {seed})",
        "val_indices": held.tolist(),
        "val_indices_sha256_16": digest,
    }
    return Subset(train, keep.tolist()), Subset(train, held.tolist()), info


def dataset_labels(ds: Dataset) -> list[int]:
    """Labels of a dataset without decoding inputs, when it exposes `labels`."""
    if isinstance(ds, Subset):
        base = dataset_labels(ds.dataset)
        return [base[i] for i in ds.indices]
    labels = getattr(ds, "labels", None)
    if labels is None:
        return [int(ds[i][1]) for i in range(len(ds))]
    return [int(v) for v in labels]
