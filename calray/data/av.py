"""Kinetics-Sounds (`ks`) and AVE (`ave`) in OGM-GE's AVDataset layout.

```
<root>/visual/<id>/frame_00001.jpg ...   frames (params.visual_dir)
<root>/audio_spec/<id>.pkl | .npy        stored spectrograms (params.audio: spec), or
<root>/audio/<id>.wav                     audio (params.audio: wav)
<root>/stat.txt                           class list, one class per row (first CSV field)
<root>/<split lists>                      KS: my_train.txt, my_test.txt (`class,id` CSV rows)
                                          AVE: trainSet.txt, valSet.txt, testSet.txt
                                               (`Class&ytid&quality&start&end` rows)
```
The number of classes is the length of the class list (stat.txt; or, with
`class_list: null`, the sorted union of the labels in the split lists) — never a constant,
since KS has 31 classes in some codebases and 33/34 in others. Classes are indexed in sorted
order, as OGM-GE does.

AVE's lists repeat some ids (27 in train, 1 in val). `duplicates` decides: `first` (default,
ARL's behaviour: keep the first row), `last` (OGM-GE's: keep the last row), `drop` (drop every
row of a repeated id) or `error`. Every repeat is counted in data_info.json either way.
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


class AVListParams(AVParams):
    class_list: str | None = "stat.txt"  # None: the sorted union of the labels in the split lists
    train_list: str = "my_train.txt"
    val_list: str | None = None  # None: derive a stratified val split from train
    test_list: str = "my_test.txt"
    label_column: int = Field(0, ge=0)  # which field of a list row holds the label
    id_column: int = Field(1, ge=0)  # ... and which the clip id
    label_is_index: bool = False  # the label field is an index into the class list, not a name
    duplicates: Literal["first", "last", "drop", "error"] = "first"


class AveParams(AVListParams):
    train_list: str = "trainSet.txt"
    val_list: str | None = "valSet.txt"
    test_list: str = "testSet.txt"


def read_classes(root: Path, p: AVListParams, lists: dict[str, Path], script: str) -> list[str]:
    if p.class_list is not None:
        path = require_file(root / p.class_list, "class list", script)
        names = [fields[0] for _, fields in read_list(path, script) if fields and fields[0]]
        if len(set(names)) != len(names):
            raise DatasetError("class list repeats a class name", path, script)
        if not names:
            raise DatasetError("class list is empty", path, script)
        return sorted(names)
    if p.label_is_index:
        raise DatasetError("label_is_index needs a class list (data.params.class_list)", root, script)
    names = set()
    for path in lists.values():
        names.update(fields[p.label_column] for _, fields in read_list(path, script) if len(fields) > p.label_column)
    return sorted(names)


def parse_rows(path: Path, p: AVListParams, classes: list[str], script: str) -> list[tuple[str, int, int]]:
    """(id, label index, line number) per row, in file order."""
    rows = []
    need = max(p.label_column, p.id_column) + 1
    for lineno, fields in read_list(path, script):
        if len(fields) < need:
            raise DatasetError(f"line {lineno}: expected at least {need} fields, got {fields}", path, script)
        label, clip_id = fields[p.label_column], fields[p.id_column]
        if p.label_is_index:
            try:
                k = int(label)
            except ValueError:
                raise DatasetError(f"line {lineno}: label {label!r} is not a class index", path, script) from None
            if not 0 <= k < len(classes):
                raise DatasetError(f"line {lineno}: class index {k} outside the class list (0..{len(classes) - 1})",
                                   path, script)
        else:
            if label not in classes:
                raise DatasetError(f"line {lineno}: class {label!r} is not in the class list", path, script)
            k = classes.index(label)
        rows.append((clip_id, k, lineno))
    return rows


def apply_duplicate_policy(rows, policy: str, path: Path, script: str) -> tuple[list[tuple[str, int]], dict]:
    seen: dict[str, list[int]] = {}
    for pos, (clip_id, _, _) in enumerate(rows):
        seen.setdefault(clip_id, []).append(pos)
    repeated = {i: pos for i, pos in seen.items() if len(pos) > 1}
    if repeated and policy == "error":
        first = next(iter(repeated))
        lines = [rows[k][2] for k in repeated[first]]
        raise DatasetError(f"id {first!r} appears on lines {lines} ({len(repeated)} repeated ids; "
                           "set data.params.duplicates to first/last/drop)", path, script)
    keep_pos = set()
    for clip_id, pos in seen.items():
        if len(pos) == 1:
            keep_pos.add(pos[0])
        elif policy == "first":
            keep_pos.add(pos[0])
        elif policy == "last":
            keep_pos.add(pos[-1])
    kept = [(rows[k][0], rows[k][1]) for k in sorted(keep_pos)]
    report = {
        "policy": policy,
        "repeated_ids": len(repeated),
        "rows_dropped": len(rows) - len(kept),
        "conflicting_labels": sum(1 for pos in repeated.values() if len({rows[k][1] for k in pos}) > 1),
        "examples": sorted(repeated)[:20],
    }
    return kept, report


def build_av_list_dataset(cfg, dataset: str, params_model, script: str):
    p = parse_params(params_model, cfg.data.params, dataset)
    root = require_root(cfg, dataset, script)
    modalities = wanted_modalities(cfg, MODALITIES)
    lists = {"train": root / p.train_list, "test": root / p.test_list}
    if p.val_list is not None:
        lists["val"] = root / p.val_list
    for split, path in lists.items():
        require_file(path, f"{dataset} {split} list", script)
    classes = read_classes(root, p, lists, script)
    skips = SkipLog(p.on_missing, script)
    records: dict[str, list[Clip] | None] = {"val": None}
    duplicates = {}
    for split, path in lists.items():
        rows, duplicates[split] = apply_duplicate_policy(parse_rows(path, p, classes, script), p.duplicates, path, script)
        clips = []
        for clip_id, label in rows:
            clip = locate_clip(root, p, split, clip_id, label, skips)
            if clip is not None:
                clips.append(clip)
        records[split] = clips
    overlap = {}
    ids = {s: {c.id for c in clips} for s, clips in records.items() if clips is not None}
    for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
        if a in ids and b in ids:
            overlap[f"{a}&{b}"] = len(ids[a] & ids[b])
    spec_shape = expected_spec_shape(records["train"], p, script) if "audio" in modalities else None
    files = [root / p.class_list] if p.class_list else []
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files + list(lists.values()))).hexdigest()[:16]
    make = AVDatasetFactory(cfg, dataset, root, p, modalities, script, spec_shape, digest)
    info = {"dataset": dataset, "root": str(root), "params": p.model_dump(), "num_classes_source":
            p.class_list or "union of split-list labels", "duplicates": duplicates, "ids_shared_between_splits": overlap,
            "skipped": skips.report(), **av_info(p, records, spec_shape)}
    return assemble(cfg, dataset, records, make, lambda clips: [c.label for c in clips], classes, MODALITIES, info)


@register_dataset("ks")
def build_ks(cfg):
    return build_av_list_dataset(cfg, "ks", AVListParams, "prepare_ks.py")


@register_dataset("ave")
def build_ave(cfg):
    return build_av_list_dataset(cfg, "ave", AveParams, "prepare_ave.py")
