"""MVSA-Single loader (QMF jsonl layout): image/text items, local tokenizer, errors, image and text noise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from calray.data import build_datasets
from calray.data.base import dataset_labels
from calray.data.mvsa import QMF_STD
from calray.errors import ConfigError, DatasetError
from tests.fixtures_data import make_mvsa, make_tokenizer, run_config


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def mvsa(tmp_path):
    root = tmp_path / "MVSA_Single"
    make_mvsa(root)
    return root


def build(root, tokenizer, params=None, **kw):
    p = {"tokenizer": str(tokenizer), "max_length": 16, "image_size": 16, "resize_size": 20, **(params or {})}
    return build_datasets(run_config("mvsa_single", root, p, **kw))


def test_items_labels_and_splits(mvsa, tokenizer):
    splits = build(mvsa, tokenizer)
    assert splits.class_names == ["positive", "neutral", "negative"] and splits.num_classes == 3
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 3, 3)  # dev.jsonl is val
    assert dataset_labels(splits.train) == [0, 0, 1, 1, 2, 2]
    x, y = splits.test[0]
    assert x["image"].shape == (3, 16, 16)
    assert set(x["text"]) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(v.shape == (16,) for v in x["text"].values())
    ids = x["text"]["input_ids"]
    assert ids[0] == 2 and ids[9] == 3 and (ids[10:] == 0).all()  # [CLS] 8 words [SEP] padding
    assert (ids[1:9] > 5).all()  # every fixture word is in the vocabulary
    batch = next(iter(DataLoader(splits.test, batch_size=3)))
    assert batch[0]["text"]["input_ids"].shape == (3, 16) and batch[0]["image"].shape == (3, 3, 16, 16)


def test_missing_tokenizer_root_and_bad_rows(mvsa, tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="data.params.tokenizer"):
        build_datasets(run_config("mvsa_single", mvsa, {"image_size": 16, "resize_size": 20}))
    assert build_datasets(run_config("mvsa_single", mvsa, {"image_size": 16, "resize_size": 20},
                                     modalities=["image"])).modalities == ["image"]
    with pytest.raises(DatasetError, match="tokenizer directory not found"):
        build(mvsa, tmp_path / "no-tokenizer")
    with pytest.raises(DatasetError, match="prepare_mvsa.py"):
        build(tmp_path / "nowhere", tokenizer)
    with open(mvsa / "test.jsonl", "a") as f:
        f.write('{"id": "99", "label": "angry", "text": "x", "img": "data/0.jpg"}\n')
    with pytest.raises(DatasetError, match="line 4: unknown label 'angry'"):
        build(mvsa, tokenizer)
    (mvsa / "test.jsonl").write_text("{not json\n")
    with pytest.raises(DatasetError, match="line 1: not valid JSON"):
        build(mvsa, tokenizer)


def test_missing_and_corrupt_images(mvsa, tokenizer):
    (mvsa / "data" / "7.jpg").unlink()  # a dev image
    with pytest.raises(DatasetError, match="7.jpg"):
        build(mvsa, tokenizer)
    with pytest.warns(UserWarning):
        splits = build(mvsa, tokenizer, {"on_missing": "skip"})
    assert splits.info["skipped"]["val"]["count"] == 1 and len(splits.val) == 2
    (mvsa / "data" / "9.jpg").write_bytes(b"garbage")  # a test image: found, but undecodable
    with pytest.warns(UserWarning):
        splits = build(mvsa, tokenizer, {"on_missing": "skip"})
    with pytest.raises(DatasetError, match="cannot decode image.*9.jpg"):
        splits.test[0]


def test_derived_val_when_no_dev_file(mvsa, tokenizer):
    splits = build(mvsa, tokenizer, {"val_file": None})
    assert len(splits.val) == 3 and "val_indices" in splits.info


def test_gaussian_attack_hits_image_before_crop_and_text(mvsa, tokenizer):
    noise = {"kind": "gaussian", "eps": 2, "p_apply": 1.0}
    clean, noisy = build(mvsa, tokenizer), build(mvsa, tokenizer, noise=noise)
    diff = (noisy.test[0][0]["image"] - clean.test[0][0]["image"]) * torch.tensor(QMF_STD).view(3, 1, 1) * 255
    assert 15 < float(diff[0].std()) < 25  # std = 10·ε on 0–255, one plane shared by the channels
    assert torch.allclose(diff[0], diff[2], atol=1e-2)
    # p_apply 1 with ε = 2: every text attacked, each word replaced with p = 0.2
    changed = sum(not torch.equal(noisy.test[i][0]["text"]["input_ids"], clean.test[i][0]["text"]["input_ids"])
                  for i in range(3))
    assert changed >= 1
    for i in range(3):  # a replaced word becomes `_` (id 5); others are untouched
        a, b = noisy.test[i][0]["text"]["input_ids"], clean.test[i][0]["text"]["input_ids"]
        assert ((a == b) | (a == 5)).all()
    assert torch.equal(noisy.train[0][0]["image"], clean.train[0][0]["image"])
    assert torch.equal(noisy.val[0][0]["text"]["input_ids"], clean.val[0][0]["text"]["input_ids"])


def test_text_attack_rate_on_many_samples(tmp_path, tokenizer):
    root = tmp_path / "mvsa"
    make_mvsa(root, per_label=(1, 1, 40))
    noise = {"kind": "salt_pepper", "eps": 5}
    clean, noisy = build(root, tokenizer), build(root, tokenizer, noise=noise)
    changed = [not torch.equal(noisy.test[i][0]["text"]["input_ids"], clean.test[i][0]["text"]["input_ids"])
               for i in range(len(clean.test))]
    # p = 0.5 per sample, and an attacked 8-word text stays intact with prob 0.5^8
    assert 0.3 < np.mean(changed) < 0.7
    noisy_again = build(root, tokenizer, noise=noise)
    assert all(torch.equal(noisy.test[i][0]["text"]["input_ids"], noisy_again.test[i][0]["text"]["input_ids"])
               for i in range(len(clean.test)))
    no_text = build(root, tokenizer, noise={**noise, "text": False})
    assert all(torch.equal(no_text.test[i][0]["text"]["input_ids"], clean.test[i][0]["text"]["input_ids"])
               for i in range(len(clean.test)))


def test_rows_read_exactly_as_written(mvsa, tokenizer):
    rows = [json.loads(line) for line in (mvsa / "train.jsonl").read_text().splitlines()]
    splits = build(mvsa, tokenizer)
    assert [r["id"] for r in splits.train.rows] == [r["id"] for r in rows]
