"""In-memory feature datasets: `synthetic` (imbalanced, class-conditional) and `features` (npz)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.utils.data import Dataset

from calray.data.base import DatasetSplits, derive_val_split, parse_params, register_dataset
from calray.errors import ConfigError, DatasetError


class FeatureDataset(Dataset):
    """Per-modality feature matrices (N×d float32) and integer labels.

    `transform(inputs, index)` may alter a sample (noise attacks); it receives copies.
    """

    def __init__(self, features: dict[str, np.ndarray], labels: np.ndarray,
                 transform: Callable[[dict, int], dict] | None = None):
        n = len(labels)
        for m, x in features.items():
            if len(x) != n:
                raise ValueError(f"modality {m!r}: {len(x)} rows but {n} labels")
        self.features = {m: torch.as_tensor(np.asarray(x, dtype=np.float32)) for m, x in features.items()}
        self.labels = [int(v) for v in np.asarray(labels)]
        self._label_tensor = torch.as_tensor(self.labels, dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        inputs = {m: x[i] for m, x in self.features.items()}
        if self.transform is not None:
            inputs = self.transform({m: v.clone() for m, v in inputs.items()}, i)
        return inputs, self.labels[i]

    def get_batch(self, indices: list[int]):
        """The collated batch of `indices` (see calray.data.batched): what stacking
        `self[i]` for each i gives, with one indexing per modality."""
        if self.transform is not None:  # noise is drawn per sample (seeded by its index)
            samples = [self[i] for i in indices]
            inputs = {m: torch.stack([s[0][m] for s in samples]) for m in self.features}
            return inputs, torch.as_tensor([s[1] for s in samples], dtype=torch.long)
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {m: x[idx] for m, x in self.features.items()}, self._label_tensor[idx]


def feature_noise_transform(cfg, split: str, modalities: list[str]):
    """Gaussian / salt-pepper noise on feature vectors for the tensor datasets, or None.

    Gaussian: x + N(0, (ε·std_scale)²) with std_scale default 0.1 (features are ~unit scale);
    salt-pepper: a density·ε/10 fraction of entries (so `density` at ε = 10) set to ± the sample's
    max |x| — our definition for feature vectors, scaled by ε like the Gaussian. Each sample is
    attacked with probability p_apply (default 0.5), drawn from a generator seeded by
    (noise seed, split, index) so the attack is the same every time the sample is read.
    """
    noise = cfg.noise
    if noise.kind == "none" or noise.eps == 0:
        return None
    if split != "test" and noise.mode != "train+test":  # `test` mode: train and val stay clean
        return None
    attacked = noise.modalities or modalities
    p_apply = 0.5 if noise.p_apply is None else noise.p_apply
    scale = 0.1 if noise.std_scale is None else noise.std_scale
    split_id = {"train": 0, "val": 1, "test": 2}[split]

    def apply(inputs: dict, i: int) -> dict:
        rng = np.random.default_rng([noise.seed, split_id, i])
        for m in attacked:
            if rng.random() >= p_apply:
                continue
            x = inputs[m]
            if noise.kind == "gaussian":
                x += torch.from_numpy(rng.normal(0.0, noise.eps * scale, size=tuple(x.shape)).astype(np.float32))
            else:
                mask = rng.random(tuple(x.shape)) < min(noise.density * noise.eps / 10.0, 1.0)
                sign = np.where(rng.random(tuple(x.shape)) < 0.5, -1.0, 1.0)
                peak = float(x.abs().max()) or 1.0
                x[torch.from_numpy(mask)] = torch.from_numpy((sign * peak).astype(np.float32))[torch.from_numpy(mask)]
        return inputs

    return apply


class SyntheticParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    modalities: list[str] = Field(default_factory=lambda: ["audio", "visual"])
    num_classes: int = Field(6, ge=2)
    dim: int = Field(32, ge=1)
    strengths: list[float] = Field(default_factory=lambda: [1.0, 0.35])  # per modality: dominant, weak
    noise_std: float = Field(1.0, gt=0.0)
    n_train: int = Field(2000, ge=10)
    n_val: int = Field(400, ge=2)
    n_test: int = Field(600, ge=2)

    @model_validator(mode="after")
    def _lengths(self):
        if len(self.strengths) != len(self.modalities):
            raise ValueError(f"strengths has {len(self.strengths)} values for {len(self.modalities)} modalities")
        return self


def make_synthetic(p: SyntheticParams, seed: int) -> dict[str, tuple[dict[str, np.ndarray], np.ndarray]]:
    """x_m = s_m·μ_{m,y} + σ·ε, ε ~ N(0, I), with class means μ_{m,k} random directions of norm 3.

    The signal-to-noise ratio of modality m is set by its strength s_m, so one modality
    dominates and another is weak but still informative. Deterministic from `seed`.
    """
    rng = np.random.default_rng(seed)
    means = {m: rng.normal(size=(p.num_classes, p.dim)) for m in p.modalities}
    for m in means:
        means[m] *= 3.0 / np.linalg.norm(means[m], axis=1, keepdims=True)
    out = {}
    for split, n in (("train", p.n_train), ("val", p.n_val), ("test", p.n_test)):
        y = rng.integers(0, p.num_classes, size=n)
        feats = {
            m: (s * means[m][y] + p.noise_std * rng.normal(size=(n, p.dim))).astype(np.float32)
            for m, s in zip(p.modalities, p.strengths)
        }
        out[split] = (feats, y.astype(np.int64))
    return out


@register_dataset("synthetic")
def build_synthetic(cfg) -> DatasetSplits:
    p = parse_params(SyntheticParams, cfg.data.params, "synthetic")
    data = make_synthetic(p, cfg.data.seed)
    splits = {
        s: FeatureDataset(f, y, feature_noise_transform(cfg, s, p.modalities)) for s, (f, y) in data.items()
    }
    return DatasetSplits(
        train=splits["train"], val=splits["val"], test=splits["test"], modalities=list(p.modalities),
        num_classes=p.num_classes,
        info={"generator": "synthetic", "strengths": dict(zip(p.modalities, p.strengths)), "dim": p.dim},
    )


def _load_npz(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile/ValueError/OSError for a truncated or non-npz file
        raise DatasetError(f"cannot read features file ({e})", path, "prepare_features.py") from None
    if "y" not in arrays:
        raise DatasetError("features file has no 'y' array", path)
    feats = {k[2:]: v for k, v in arrays.items() if k.startswith("x_")}
    if not feats:
        raise DatasetError("features file has no 'x_<modality>' arrays", path)
    for m, x in feats.items():
        if x.ndim != 2:
            raise DatasetError(f"x_{m} must be N×d, got shape {x.shape}", path)
        if not np.isfinite(x).all():
            raise DatasetError(f"x_{m} contains NaN or inf", path)
    return feats, arrays["y"].astype(np.int64)


@register_dataset("features")
def build_features(cfg) -> DatasetSplits:
    """Pre-extracted features: `<root>/{train,val,test}.npz` with `y` and `x_<modality>` (N×d)."""
    if not cfg.data.root:
        raise ConfigError("data.root: the features dataset needs a root directory")
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise DatasetError("features root does not exist", root)
    for split in ("train", "test"):
        if not (root / f"{split}.npz").is_file():
            raise DatasetError(f"missing {split}.npz", root / f"{split}.npz")
    train_f, train_y = _load_npz(root / "train.npz")
    test_f, test_y = _load_npz(root / "test.npz")
    modalities = sorted(train_f)
    if sorted(test_f) != modalities:
        raise DatasetError(f"test.npz modalities {sorted(test_f)} differ from train.npz {modalities}", root)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    info: dict = {}
    train = FeatureDataset(train_f, train_y, feature_noise_transform(cfg, "train", modalities))
    if (root / "val.npz").is_file():
        val_f, val_y = _load_npz(root / "val.npz")
        val = FeatureDataset(val_f, val_y, feature_noise_transform(cfg, "val", modalities))
        num_classes = max(num_classes, int(val_y.max()) + 1)
        info["val_source"] = str(root / "val.npz")
    else:
        # the held-out part must not carry training-mode noise unless the mode says so
        val_view = FeatureDataset(train_f, train_y, feature_noise_transform(cfg, "val", modalities))
        train, _, info = derive_val_split(train, train_y, cfg.data.val_fraction, cfg.data.seed)
        _, val, _ = derive_val_split(val_view, train_y, cfg.data.val_fraction, cfg.data.seed)
    test = FeatureDataset(test_f, test_y, feature_noise_transform(cfg, "test", modalities))
    return DatasetSplits(train=train, val=val, test=test, modalities=modalities,
                         num_classes=num_classes, info=info)
