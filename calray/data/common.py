"""Pieces every real-data builder shares: root checks, list files, skipped-sample accounting,
and assembling train/val/test with a derived validation split when none is shipped."""

from __future__ import annotations

import csv
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from torch.utils.data import Dataset, Subset

from calray.data.base import DatasetSplits, derive_val_split
from calray.errors import ConfigError, DatasetError
from calray.data.noise import Attack, split_attacks


def require_root(cfg, dataset: str, script: str) -> Path:
    if not cfg.data.root:
        raise ConfigError(f"data.root: the {dataset} dataset needs a root directory (see docs/DATASETS.md)")
    root = Path(cfg.data.root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{dataset} root directory does not exist", root, script)
    return root


def require_file(path: Path, what: str, script: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"missing {what}", path, script)
    return path


def read_list(path: Path, script: str) -> list[tuple[int, list[str]]]:
    """Rows of a split/class list as (line number, fields).

    Lines holding `&` are split on it (the AVE release: `Class&ytid&quality&start&end`), other
    lines are read as CSV (OGM-GE lists). Blank lines are ignored; a UTF-8 BOM is tolerated.
    """
    require_file(path, "list file", script)
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            fields = line.split("&") if "&" in line else next(csv.reader([line]))
            rows.append((lineno, [x.strip() for x in fields]))
    return rows


class SkipLog:
    """Samples a split could not use: an error by default, otherwise counted and reported."""

    def __init__(self, policy: str, script: str):
        self.policy = policy
        self.script = script
        self.skipped: dict[str, list[dict]] = {}

    def missing(self, split: str, sample_id: str, path: Path, what: str) -> None:
        if self.policy == "error":
            raise DatasetError(
                f"{split} sample {sample_id!r}: missing {what} (set data.params.on_missing: skip to count and skip such samples)",
                path, self.script,
            )
        self.skipped.setdefault(split, []).append({"id": sample_id, "missing": what, "path": str(path)})

    def report(self) -> dict:
        out = {}
        for split, items in self.skipped.items():
            warnings.warn(f"{split}: skipped {len(items)} sample(s) with missing files, e.g. {items[0]['path']}",
                          stacklevel=3)
            out[split] = {"count": len(items), "examples": items[:20]}
        return out


def class_counts(labels: Sequence[int], class_names: Sequence[str]) -> dict[str, int]:
    c = Counter(int(v) for v in labels)
    return {name: c.get(i, 0) for i, name in enumerate(class_names)}


MakeDataset = Callable[[list, str, Attack], Dataset]


def assemble(cfg, dataset: str, records: dict[str, list | None], make: MakeDataset, labels_of: Callable[[list], list[int]],
             class_names: list[str], modalities: list[str], info: dict) -> DatasetSplits:
    """Build the three splits; without shipped validation records, carve a stratified val from train.

    The derived val reads the training records through an evaluation-mode view (no augmentation,
    the val split's attack), so only train carries augmentation and mode-`test` val stays clean.
    """
    attacks = split_attacks(cfg.noise, dataset)
    train = make(records["train"], "train", attacks["train"])
    test = make(records["test"], "test", attacks["test"])
    train_labels = labels_of(records["train"])
    if records.get("val") is not None:
        val = make(records["val"], "val", attacks["val"])
        val_labels = labels_of(records["val"])
        counts = {"train": class_counts(train_labels, class_names)}
    else:
        view = make(records["train"], "val", attacks["val"])
        train, _, val_info = derive_val_split(train, train_labels, cfg.data.val_fraction, cfg.data.seed)
        val = Subset(view, val_info["val_indices"])
        info.update(val_info)
        val_labels = [train_labels[i] for i in val_info["val_indices"]]
        kept = set(range(len(train_labels))) - set(val_info["val_indices"])
        counts = {"train": class_counts([train_labels[i] for i in sorted(kept)], class_names)}
    counts["val"] = class_counts(val_labels, class_names)
    counts["test"] = class_counts(labels_of(records["test"]), class_names)
    info["class_counts"] = counts
    info["sizes"] = {s: sum(c.values()) for s, c in counts.items()}
    info["noise"] = {s: a.describe() for s, a in attacks.items()}
    info.setdefault("dataset", dataset)
    return DatasetSplits(train=train, val=val, test=test, modalities=modalities, num_classes=len(class_names),
                         class_names=list(class_names), info=info)


def wanted_modalities(cfg, available: list[str]) -> list[str]:
    """The modalities a run reads (decoding the others would be wasted work)."""
    wanted = cfg.data.modalities or available
    unknown = [m for m in wanted if m not in available]
    if unknown:
        raise ConfigError(f"data.modalities: {unknown} not provided by {cfg.data.dataset!r} (it has {available})")
    return list(wanted)
