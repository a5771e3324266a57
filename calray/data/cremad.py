"""CREMA-D in the OGM-GE layout (dataset name `cremad`).

```
<root>/train.csv, test.csv         rows `clip_id,EMO` (EMO in NEU HAP SAD FEA DIS ANG)
<root>/Image-01-FPS/<clip_id>/*.jpg frames extracted at 1 fps (params.visual_dir)
<root>/AudioWAV/<clip_id>.wav       audio (params.audio: wav), or
<root>/audio_spec/<clip_id>.npy|pkl stored spectrograms (params.audio: spec)
```
No validation split is shipped: a stratified one is derived from train (base.derive_val_split).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import Field

from calray.data.audiovisual import (MODALITIES, AVDatasetFactory, AVParams, Clip, av_info, expected_spec_shape,
                                     locate_clip)
from calray.data.base import parse_params, register_dataset
from calray.data.common import SkipLog, assemble, read_list, require_file, require_root, wanted_modalities
from calray.errors import DatasetError

SCRIPT = "prepare_cremad.py"
# OGM-GE's label map (the order defines the class indices)
CLASSES = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]


class CremadParams(AVParams):
    frames: int = Field(1, ge=1)  # OGM-GE uses one 1-fps frame per clip
    audio: Literal["wav", "spec"] = "wav"
    audio_dir: str = "AudioWAV"
    visual_dir: str = "Image-01-FPS"
    train_list: str = "train.csv"
    test_list: str = "test.csv"


def read_split(root: Path, p: CremadParams, split: str, list_name: str, skips: SkipLog) -> list[Clip]:
    path = require_file(root / list_name, f"CREMA-D {split} list", SCRIPT)
    clips = []
    for lineno, fields in read_list(path, SCRIPT):
        if len(fields) < 2:
            raise DatasetError(f"line {lineno}: expected `clip_id,EMO`, got {fields}", path, SCRIPT)
        clip_id, emo = fields[0], fields[1]
        if emo not in CLASSES:
            raise DatasetError(f"line {lineno}: unknown emotion {emo!r} (expected one of {CLASSES})", path, SCRIPT)
        clip = locate_clip(root, p, split, clip_id, CLASSES.index(emo), skips)
        if clip is not None:
            clips.append(clip)
    return clips


@register_dataset("cremad")
def build_cremad(cfg):
    p = parse_params(CremadParams, cfg.data.params, "cremad")
    root = require_root(cfg, "cremad", SCRIPT)
    modalities = wanted_modalities(cfg, MODALITIES)
    skips = SkipLog(p.on_missing, SCRIPT)
    records = {"train": read_split(root, p, "train", p.train_list, skips), "val": None,
               "test": read_split(root, p, "test", p.test_list, skips)}
    spec_shape = expected_spec_shape(records["train"], p, SCRIPT) if "audio" in modalities else None
    digest = hashlib.sha256(b"".join((root / n).read_bytes() for n in (p.train_list, p.test_list))).hexdigest()[:16]
    make = AVDatasetFactory(cfg, "cremad", root, p, modalities, SCRIPT, spec_shape, digest)
    info = {"dataset": "cremad", "root": str(root), "params": p.model_dump(), "skipped": skips.report(),
            **av_info(p, records, spec_shape)}
    return assemble(cfg, "cremad", records, make, lambda clips: [c.label for c in clips], CLASSES, MODALITIES, info)
