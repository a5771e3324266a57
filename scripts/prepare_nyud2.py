#!/usr/bin/env python
"""NYU Depth V2 (labelled subset) → the QMF layout calray's `nyud2` reads.

    python scripts/prepare_nyud2.py --labeled nyu_depth_v2_labeled.mat --splits splits.mat --out data/nyud2

Input: the official `nyu_depth_v2_labeled.mat` (MATLAB v7.3 / HDF5: needs `pip install h5py`)
and `splits.mat` (trainNdxs / testNdxs, 1-based). Writes <out>/{train,test}/<class>/<index>.png,
each PNG the RGB image (left) and the depth map (right) side by side, as QMF's
AlignedConcDataset expects. Classes: the nine scene types of the QMF/TRecgNet 10-class setup,
every other scene type merged into `others`.

Depth encoding (our definition; QMF's preprocessed folder is not public in a documented form):
metres scaled linearly from [0, --max-depth] to 0–255, one grey value copied into R, G and B.
If you have QMF's own nyud2 folder, point data.root at it instead of running this.
Ends with counts per split and class, checked against the commonly quoted 795 / 654 split.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
from _prep_common import PrepError, report

CLASSES = ["bathroom", "bedroom", "bookstore", "classroom", "dining_room", "home_office", "kitchen", "living_room",
           "office", "others"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labeled", type=Path, required=True, help="nyu_depth_v2_labeled.mat")
    p.add_argument("--splits", type=Path, required=True, help="splits.mat with trainNdxs and testNdxs")
    p.add_argument("--out", type=Path, required=True, help="output root")
    p.add_argument("--max-depth", type=float, default=10.0, help="depth (m) mapped to 255")
    return p.parse_args(argv)


def scene_class(scene: str) -> str:
    return scene if scene in CLASSES[:-1] else "others"


def depth_to_rgb(depth: np.ndarray, max_depth: float) -> np.ndarray:
    grey = np.clip(np.rint(depth / max_depth * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def write_layout(out: Path, images, depths, scenes: list[str], split_indices: dict[str, np.ndarray],
                 max_depth: float) -> dict[str, Counter]:
    """images: N×H×W×3 uint8, depths: N×H×W metres, split_indices: 0-based indices per split."""
    from PIL import Image

    counts = {}
    for split, idx in split_indices.items():
        counts[split] = Counter()
        for i in idx:
            cls = scene_class(scenes[i])
            pair = np.concatenate([np.asarray(images[i], dtype=np.uint8), depth_to_rgb(np.asarray(depths[i]), max_depth)],
                                  axis=1)
            path = out / split / cls / f"{i + 1:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pair).save(path)
            counts[split][cls] += 1
    return counts


def load_labeled(path: Path):
    """(images N×H×W×3, depths N×H×W, scene names) from the HDF5 .mat, lazily per image."""
    try:
        import h5py
    except ImportError:
        raise PrepError("reading nyu_depth_v2_labeled.mat (MATLAB v7.3) needs h5py: pip install h5py") from None
    if not path.is_file():
        raise PrepError(f"{path} not found")
    f = h5py.File(path, "r")
    images, depths = f["images"], f["depths"]  # N×3×W×H and N×W×H in MATLAB's column-major order

    class Lazy:
        def __init__(self, ds, perm):
            self.ds, self.perm = ds, perm

        def __getitem__(self, i):
            return np.transpose(self.ds[i], self.perm)

        def __len__(self):
            return len(self.ds)

    scenes = ["".join(chr(c) for c in np.asarray(f[ref]).flatten()) for ref in np.asarray(f["sceneTypes"]).flatten()]
    return Lazy(images, (2, 1, 0)), Lazy(depths, (1, 0)), scenes


def load_splits(path: Path) -> dict[str, np.ndarray]:
    from scipy.io import loadmat

    if not path.is_file():
        raise PrepError(f"{path} not found")
    m = loadmat(path)
    try:
        return {"train": np.asarray(m["trainNdxs"]).flatten() - 1, "test": np.asarray(m["testNdxs"]).flatten() - 1}
    except KeyError as e:
        raise PrepError(f"{path} lacks {e}") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    splits = load_splits(args.splits)
    images, depths, scenes = load_labeled(args.labeled)
    counts = write_layout(args.out, images, depths, scenes, splits, args.max_depth)
    report(counts, {"train": 795, "test": 654}, len(CLASSES), source="the commonly quoted NYUD2 split (unverified)")
    print(f"\nlayout written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
