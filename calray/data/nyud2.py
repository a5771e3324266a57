"""NYU Depth V2 scene recognition in the QMF layout (dataset name `nyud2`).

```
<root>/train/<class>/*.png   each PNG holds RGB (left half) and depth (right half) side by side
<root>/test/<class>/*.png
<root>/val/<class>/*.png     optional (params.val_dir); otherwise val is derived from train
```
Classes are the sorted class folders of train (10 in the QMF release); a test/val class that
train lacks is an error, never a silently shifted index (QMF indexes each split's folders on
their own). Modalities `rgb` (3×S×S) and `depth` (3×S×S as QMF reads the PNG as RGB, or 1×S×S
with `depth_channels: 1`).

Transforms follow QMF: halves wider than S are resized to L×L (bicubic); train Resize(L) +
RandomCrop(S) + horizontal flip, evaluation Resize(S); QMF's normalisation constants. Unlike
QMF, the train crop and flip are the same for RGB and depth (QMF draws them independently,
misaligning the pair). Attacks act on the uint8 halves after the geometric transform (for the
test split: after Resize(S), as QMF).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from calray.data.base import parse_params, register_dataset
from calray.data.common import assemble, require_root, wanted_modalities
from calray.data.media import open_image, to_tensor
from calray.errors import ConfigError, DatasetError
from calray.data.noise import Attack

SCRIPT = "prepare_nyud2.py"
MODALITIES = ["rgb", "depth"]
QMF_MEAN = (0.4951, 0.3601, 0.4587)
QMF_STD = (0.1474, 0.1950, 0.1646)


class Nyud2Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_size: int = Field(224, ge=8)  # QMF FINE_SIZE
    load_size: int = Field(256, ge=8)  # QMF LOAD_SIZE
    depth_channels: Literal[1, 3] = 3
    train_dir: str = "train"
    val_dir: str | None = None
    test_dir: str = "test"


def scan_split(directory: Path, classes: list[str] | None, script: str) -> tuple[list[str], list[tuple[str, int]], int]:
    """(class names, [(png path, label)], number of non-PNG files ignored), all in sorted order."""
    if not directory.is_dir():
        raise DatasetError("missing split directory", directory, script)
    found = sorted(d.name for d in directory.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = found
        if not classes:
            raise DatasetError("no class folders", directory, script)
    else:
        extra = [c for c in found if c not in classes]
        if extra:
            raise DatasetError(f"class folder(s) {extra} are not among train's classes {classes}", directory, script)
    samples, ignored = [], 0
    for label, name in enumerate(classes):
        folder = directory / name
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.suffix.lower() == ".png":
                samples.append((str(f), label))
            elif not f.name.startswith("."):
                ignored += 1
    if not samples:
        raise DatasetError("no PNG files found", directory, script)
    return classes, samples, ignored


class Nyud2Dataset(Dataset):
    def __init__(self, samples: list[tuple[str, int]], *, split: str, params: Nyud2Params, attack: Attack,
                 modalities: list[str]):
        self.samples = samples
        self.labels = [y for _, y in samples]
        self.split = split
        self.train = split == "train"
        self.p = params
        self.attack = attack
        self.modalities = modalities

    def __len__(self) -> int:
        return len(self.samples)

    def halves(self, i: int):
        """QMF's AlignedConcDataset: split at w/2, resize halves wider than S to L×L (bicubic)."""
        from PIL import Image

        path = self.samples[i][0]
        pair = open_image(path, SCRIPT)
        w, h = pair.size
        w2 = w // 2
        if w2 < 1:
            raise DatasetError(f"image of width {w} cannot hold an RGB|depth pair", path, SCRIPT)
        rgb, depth = pair.crop((0, 0, w2, h)), pair.crop((w2, 0, w, h))
        if w2 > self.p.image_size:
            size = (self.p.load_size, self.p.load_size)
            rgb, depth = rgb.resize(size, Image.BICUBIC), depth.resize(size, Image.BICUBIC)
        if self.p.depth_channels == 1:
            depth = depth.convert("L")
        return rgb, depth

    def geometric(self, rgb, depth):
        from PIL import Image

        s, load = self.p.image_size, self.p.load_size
        if not self.train:
            return rgb.resize((s, s), Image.BILINEAR), depth.resize((s, s), Image.BILINEAR)
        rgb, depth = rgb.resize((load, load), Image.BILINEAR), depth.resize((load, load), Image.BILINEAR)
        top = int(torch.randint(0, load - s + 1, (1,)).item()) if load > s else 0
        left = int(torch.randint(0, load - s + 1, (1,)).item()) if load > s else 0
        box = (left, top, left + s, top + s)
        rgb, depth = rgb.crop(box), depth.crop(box)
        if torch.rand(1).item() < 0.5:
            rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            depth = depth.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return rgb, depth

    def __getitem__(self, i: int):
        rgb, depth = self.geometric(*self.halves(i))
        inputs = {}
        if "rgb" in self.modalities:
            img = self.attack.image(np.asarray(rgb), "rgb", i)
            inputs["rgb"] = to_tensor(img, QMF_MEAN, QMF_STD)
        if "depth" in self.modalities:
            img = self.attack.image(np.asarray(depth), "depth", i)
            if self.p.depth_channels == 1:  # one channel: the mean of QMF's three constants
                inputs["depth"] = to_tensor(img, (float(np.mean(QMF_MEAN)),), (float(np.mean(QMF_STD)),))
            else:
                inputs["depth"] = to_tensor(img, QMF_MEAN, QMF_STD)
        return inputs, self.samples[i][1]


@register_dataset("nyud2")
def build_nyud2(cfg):
    p = parse_params(Nyud2Params, cfg.data.params, "nyud2")
    if p.load_size < p.image_size:
        raise ConfigError(f"data.params.load_size ({p.load_size}) must be at least image_size ({p.image_size})")
    root = require_root(cfg, "nyud2", SCRIPT)
    modalities = wanted_modalities(cfg, MODALITIES)
    classes, train, ignored_train = scan_split(root / p.train_dir, None, SCRIPT)
    _, test, ignored_test = scan_split(root / p.test_dir, classes, SCRIPT)
    records = {"train": train, "test": test, "val": None}
    ignored = {"train": ignored_train, "test": ignored_test}
    if p.val_dir is not None:
        _, records["val"], ignored["val"] = scan_split(root / p.val_dir, classes, SCRIPT)

    def make(samples, split, attack):
        return Nyud2Dataset(samples, split=split, params=p, attack=attack, modalities=modalities)

    info = {"dataset": "nyud2", "root": str(root), "params": p.model_dump(), "non_png_files_ignored": ignored,
            "depth_channels": p.depth_channels, "normalisation": {"mean": QMF_MEAN, "std": QMF_STD}}
    return assemble(cfg, "nyud2", records, make, lambda s: [y for _, y in s], classes, MODALITIES, info)

