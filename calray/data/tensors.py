"""In-memory feature datasets: `synthetic` (imbalanced, class-conditional) and `features` (npz)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.utils.data import Dataset

from calray.data.base import DatasetSplits, derive_val_split, parse_params, register_dataset, stratified_split
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

    Gaussian: x + N(0, (ε·std_scale)²) with std_scale default 0.1 (features are ~unit scale:
    `synthetic` by construction; `features` are standardised with train statistics before this
    runs, so there ε·std_scale is in units of one training std);
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


# Raw features are flagged (when `standardize` is off) if a modality's max |x| over the training
# rows exceeds this, or if the largest per-modality overall std is this many times the smallest:
# a real multi-view set has one view reaching 17,000 next to pixel averages in 0–6, and trained raw
# its weak view stayed at chance.
EXTREME_SCALE = 100.0


class FeaturesParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    standardize: bool = True  # per-modality z-score with the statistics of the rows trained on


def standardization_stats(feats: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-feature mean and population std (ddof 0) in float64 of each modality's rows.

    A constant feature (max == min) gets std 1, so it maps to 0 instead of dividing by zero.
    """
    mean, std = {}, {}
    for m, x in feats.items():
        x = np.asarray(x, dtype=np.float64)
        mean[m] = x.mean(axis=0)
        s = x.std(axis=0)
        std[m] = np.where(x.max(axis=0) == x.min(axis=0), 1.0, s)
    return mean, std


def standardize(feats: dict[str, np.ndarray], mean: dict, std: dict) -> dict[str, np.ndarray]:
    """(x − mean) / std per modality, computed in float64 and stored as float32."""
    return {m: ((np.asarray(x, dtype=np.float64) - mean[m]) / std[m]).astype(np.float32) for m, x in feats.items()}


def extreme_scale_warnings(feats: dict[str, np.ndarray]) -> list[str]:
    """Messages for modalities whose raw scale would dominate training (rule: EXTREME_SCALE)."""
    fix = "set data.params.standardize: true to z-score every modality with train statistics"
    out = []
    for m, x in sorted(feats.items()):
        peak = float(np.abs(x).max()) if x.size else 0.0
        if peak > EXTREME_SCALE:
            out.append(f"features: modality {m!r} is unstandardised and reaches max |x| = {peak:.4g} "
                       f"on the training rows (over {EXTREME_SCALE:g}); {fix}")
    spread = {m: float(np.asarray(x, dtype=np.float64).std()) for m, x in feats.items() if x.size}
    spread = {m: v for m, v in spread.items() if v > 0}  # an all-constant modality has no scale to compare
    if len(spread) >= 2:
        big, small = max(spread, key=spread.get), min(spread, key=spread.get)
        ratio = spread[big] / spread[small]
        if ratio > EXTREME_SCALE:
            out.append(f"features: modality {big!r} (overall std {spread[big]:.4g}) is {ratio:.4g}× the scale of "
                       f"{small!r} (std {spread[small]:.4g}; over {EXTREME_SCALE:g}×) and unstandardised; {fix}")
    return out


def _read_feature_files(cfg):
    """(root, train, val or None, test) as (features by modality, labels), checked for shape."""
    if not cfg.data.root:
        raise ConfigError("data.root: the features dataset needs a root directory")
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise DatasetError("features root does not exist", root)
    for split in ("train", "test"):
        if not (root / f"{split}.npz").is_file():
            raise DatasetError(f"missing {split}.npz", root / f"{split}.npz")
    train, test = _load_npz(root / "train.npz"), _load_npz(root / "test.npz")
    val = _load_npz(root / "val.npz") if (root / "val.npz").is_file() else None
    modalities = sorted(train[0])
    for name, split in (("test", test), ("val", val)):
        if split is not None and sorted(split[0]) != modalities:
            raise DatasetError(f"{name}.npz modalities {sorted(split[0])} differ from train.npz {modalities}", root)
    return root, train, val, test


def _scaling(fit: dict[str, np.ndarray], enabled: bool, source: str):
    """(info, f): f z-scores a split with the statistics of `fit` (the rows trained on), or returns
    it unchanged when standardisation is off — then extreme scales are warned about."""
    if enabled:
        mean, std = standardization_stats(fit)
        info = {"standardize": {"enabled": True, "source": source, "mean": {m: v.tolist() for m, v in mean.items()},
                                "std": {m: v.tolist() for m, v in std.items()}}}
        return info, lambda feats: standardize(feats, mean, std)
    info: dict = {"standardize": {"enabled": False}}
    messages = extreme_scale_warnings(fit)
    for msg in messages:
        warnings.warn(msg, stacklevel=3)
    if messages:
        info["warnings"] = messages
    return info, lambda feats: feats


@register_dataset("features")
def build_features(cfg) -> DatasetSplits:
    """Pre-extracted features: `<root>/{train,val,test}.npz` with `y` and `x_<modality>` (N×d).

    With `standardize` (default) every split is z-scored per feature with the statistics of the
    rows trained on — train.npz minus a derived validation part — since real feature files mix
    scales; the noise transform then acts on the standardised values.
    """
    p = parse_params(FeaturesParams, cfg.data.params, "features")
    root, (train_f, train_y), val, (test_f, test_y) = _read_feature_files(cfg)
    modalities = sorted(train_f)
    val_f, val_y = val if val is not None else (None, None)
    if val is not None:
        fit_rows = np.arange(len(train_y))
    else:  # the rows derive_val_split keeps below (same labels, fraction and seed)
        fit_rows, _ = stratified_split(train_y, cfg.data.val_fraction, cfg.data.seed)
    held = "" if val is not None else f"; the {len(train_y) - len(fit_rows)} held-out validation rows excluded"
    info, scale = _scaling({m: x[fit_rows] for m, x in train_f.items()}, p.standardize,
                           f"train rows (N={len(fit_rows)}{held})")
    train_f, test_f = scale(train_f), scale(test_f)
    val_f = scale(val_f) if val_f is not None else None
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    train = FeatureDataset(train_f, train_y, feature_noise_transform(cfg, "train", modalities))
    if val_f is not None:
        val = FeatureDataset(val_f, val_y, feature_noise_transform(cfg, "val", modalities))
        num_classes = max(num_classes, int(val_y.max()) + 1)
        info["val_source"] = str(root / "val.npz")
    else:
        # the held-out part must not carry training-mode noise unless the mode says so
        val_view = FeatureDataset(train_f, train_y, feature_noise_transform(cfg, "val", modalities))
        train, _, val_info = derive_val_split(train, train_y, cfg.data.val_fraction, cfg.data.seed)
        _, val, _ = derive_val_split(val_view, train_y, cfg.data.val_fraction, cfg.data.seed)
        assert train.indices == fit_rows.tolist(), "standardisation rows differ from the derived train rows"
        info.update(val_info)
    test = FeatureDataset(test_f, test_y, feature_noise_transform(cfg, "test", modalities))
    return DatasetSplits(train=train, val=val, test=test, modalities=modalities,
                         num_classes=num_classes, info=info)
