"""MVSA-Single image-text sentiment in the QMF layout (dataset name `mvsa_single`).

```
<root>/train.jsonl, dev.jsonl, test.jsonl   rows {"id", "label", "text", "img"}
<root>/<img>                                 images, `img` relative to the root (e.g. data/42.jpg)
```
Labels positive / neutral / negative (params.labels fixes their order). `dev.jsonl` is the
validation split. Modalities: `image` (3×S×S: Resize(R) + CenterCrop(S), QMF's MVSA
normalisation) and `text` (a dict of `input_ids`, `attention_mask`, `token_type_ids`, padded
to params.max_length) from a tokenizer loaded with `AutoTokenizer.from_pretrained` from the
local directory params.tokenizer — never a hub download.

Attacks: image noise after Resize(R) and before the crop (QMF), text noise on the raw string
before tokenisation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from calray.data.base import parse_params, register_dataset
from calray.data.common import SkipLog, assemble, require_file, require_root, wanted_modalities
from calray.data.media import open_image, to_tensor
from calray.errors import ConfigError, DatasetError
from calray.data.noise import Attack

SCRIPT = "prepare_mvsa.py"
MODALITIES = ["image", "text"]
QMF_MEAN = (0.46777044, 0.44531429, 0.40661017)
QMF_STD = (0.12221994, 0.12145835, 0.14380469)


class MvsaParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokenizer: str | None = None  # local directory saved with save_pretrained (needed for `text`)
    max_length: int = Field(512, ge=4)  # QMF max_seq_len
    image_size: int = Field(224, ge=8)
    resize_size: int = Field(256, ge=8)
    labels: list[str] = Field(default_factory=lambda: ["positive", "neutral", "negative"])
    train_file: str = "train.jsonl"
    val_file: str | None = "dev.jsonl"  # None: derive a stratified val split from train
    test_file: str = "test.jsonl"
    on_missing: Literal["error", "skip"] = "error"


def read_jsonl(path: Path, split: str, labels: list[str], root: Path, skips: SkipLog) -> list[dict]:
    require_file(path, f"MVSA {split} file", SCRIPT)
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"line {lineno}: not valid JSON ({e.msg})", path, SCRIPT) from None
            missing = [k for k in ("id", "label", "text", "img") if k not in row]
            if missing:
                raise DatasetError(f"line {lineno}: missing field(s) {missing}", path, SCRIPT)
            if row["label"] not in labels:
                raise DatasetError(f"line {lineno}: unknown label {row['label']!r} (expected one of {labels})",
                                   path, SCRIPT)
            img = root / row["img"] if row["img"] else None
            if img is None or not img.is_file():
                skips.missing(split, str(row["id"]), img or path, "image")
                continue
            rows.append({"id": str(row["id"]), "label": labels.index(row["label"]), "text": str(row["text"] or ""),
                         "img": str(img)})
    return rows


def load_tokenizer(path: str | None):
    if path is None:
        raise ConfigError("data.params.tokenizer: the text modality needs a local tokenizer directory "
                          "(e.g. bert-base-uncased saved with save_pretrained)")
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise DatasetError("tokenizer directory not found", directory)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we tokenise before DataLoader workers fork
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:
        raise DatasetError(f"cannot load a tokenizer ({type(e).__name__}: {e})", directory) from None


class MvsaDataset(Dataset):
    def __init__(self, rows: list[dict], *, split: str, params: MvsaParams, attack: Attack, modalities: list[str],
                 tokenizer):
        self.rows = rows
        self.labels = [r["label"] for r in rows]
        self.split = split
        self.p = params
        self.attack = attack
        self.modalities = modalities
        self.tokenizer = tokenizer
        # clean texts are tokenised once; only attacked texts are tokenised again per item
        self.tokens = self._tokenize([r["text"] for r in rows]) if "text" in modalities else None

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.p.max_length,
                             return_tensors="pt", return_token_type_ids=True, return_attention_mask=True)
        return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, i: int) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms import functional as F

        img = F.resize(open_image(self.rows[i]["img"], SCRIPT), self.p.resize_size)
        arr = self.attack.image(np.asarray(img), "image", i)
        img = F.center_crop(Image.fromarray(arr), [self.p.image_size, self.p.image_size])
        return to_tensor(np.asarray(img), QMF_MEAN, QMF_STD)

    def text(self, i: int) -> dict[str, torch.Tensor]:
        clean = self.rows[i]["text"]
        noisy = self.attack.text(clean, "text", i)
        if noisy != clean:
            return {k: v[0] for k, v in self._tokenize([noisy]).items()}
        return {k: v[i] for k, v in self.tokens.items()}

    def __getitem__(self, i: int):
        inputs = {}
        if "image" in self.modalities:
            inputs["image"] = self.image(i)
        if "text" in self.modalities:
            inputs["text"] = self.text(i)
        return inputs, self.rows[i]["label"]


@register_dataset("mvsa_single", path_params=("tokenizer",))
def build_mvsa(cfg):
    p = parse_params(MvsaParams, cfg.data.params, "mvsa_single")
    root = require_root(cfg, "mvsa_single", SCRIPT)
    modalities = wanted_modalities(cfg, MODALITIES)
    if len(set(p.labels)) != len(p.labels):
        raise ConfigError(f"data.params.labels: repeats a label: {p.labels}")
    if p.resize_size < p.image_size:
        raise ConfigError(f"data.params.resize_size ({p.resize_size}) must be at least image_size ({p.image_size})")
    tokenizer = load_tokenizer(p.tokenizer) if "text" in modalities else None
    skips = SkipLog(p.on_missing, SCRIPT)
    records = {"train": read_jsonl(root / p.train_file, "train", p.labels, root, skips),
               "val": read_jsonl(root / p.val_file, "val", p.labels, root, skips) if p.val_file else None,
               "test": read_jsonl(root / p.test_file, "test", p.labels, root, skips)}

    def make(rows, split, attack):
        return MvsaDataset(rows, split=split, params=p, attack=attack, modalities=modalities, tokenizer=tokenizer)

    info = {"dataset": "mvsa_single", "root": str(root), "params": p.model_dump(), "skipped": skips.report(),
            "tokenizer": p.tokenizer, "max_length": p.max_length}
    return assemble(cfg, "mvsa_single", records, make, lambda rows: [r["label"] for r in rows], p.labels, MODALITIES,
                    info)
