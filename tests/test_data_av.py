"""Kinetics-Sounds and AVE loaders (OGM-GE AVDataset layout): class lists, lists, duplicates, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from calray.data import build_datasets
from calray.data.base import dataset_labels
from calray.errors import DatasetError
from tests.fixtures_data import make_ave, make_ks, run_config

SMALL = {"frames": 3, "image_size": 16}


def build(name, root, params=None, **kw):
    return build_datasets(run_config(name, root, {**SMALL, **(params or {})}, **kw))


def test_ks_classes_come_from_the_class_list(tmp_path):
    make_ks(tmp_path / "ks")  # stat.txt lists 4 classes, the split lists use 3
    splits = build("ks", tmp_path / "ks")
    assert splits.num_classes == 4
    assert splits.class_names == ["playing guitar", "singing", "tapping pen", "unused class"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 3, 3)
    x, y = splits.test[1]
    assert x["audio"].shape == (1, 257, 30) and x["visual"].shape == (3, 3, 16, 16)
    assert dataset_labels(splits.test) == [0, 1, 2]
    assert splits.info["num_classes_source"] == "stat.txt"
    assert "val_indices" in splits.info  # KS ships no val list: derived from train
    (tmp_path / "ks" / "stat.txt").write_text("playing guitar\nsinging\ntapping pen\nanother\nyet another\n")
    assert build("ks", tmp_path / "ks").num_classes == 5


def test_ks_list_with_class_indices_and_union_of_labels(tmp_path):
    root = tmp_path / "ks"
    make_ks(root)
    # OGM-GE's shipped KS lists: `id,10,class_index`
    for split in ("train", "test"):
        rows = [r.split(",") for r in (root / f"my_{split}.txt").read_text().splitlines()]
        classes = sorted({"playing guitar", "singing", "tapping pen", "unused class"})
        (root / f"idx_{split}.txt").write_text("".join(f"{vid},10,{classes.index(c)}\n" for c, vid in rows))
    params = {"train_list": "idx_train.txt", "test_list": "idx_test.txt", "id_column": 0, "label_column": 2,
              "label_is_index": True}
    splits = build("ks", root, params)
    assert dataset_labels(splits.test) == [0, 1, 2] and splits.num_classes == 4
    with open(root / "idx_test.txt", "a") as f:
        f.write("vid000_000010_000020,10,7\n")
    with pytest.raises(DatasetError, match="class index 7"):
        build("ks", root, params)
    union = build("ks", root, {"class_list": None})
    assert union.num_classes == 3 and union.info["num_classes_source"] == "union of split-list labels"


def test_ave_reads_release_lists_and_shipped_val(tmp_path):
    make_ave(tmp_path / "ave")
    splits = build("ave", tmp_path / "ave")
    assert splits.class_names == ["Church bell", "Dog", "Male speech, man speaking"]  # sorted, commas kept
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 3)
    assert "val_indices" not in splits.info
    assert splits.info["class_counts"]["val"] == {"Church bell": 1, "Dog": 1, "Male speech, man speaking": 1}
    x, _ = splits.val[0]
    assert x["visual"].shape == (3, 3, 16, 16)


@pytest.mark.parametrize("policy,label,n_train", [("first", 0, 9), ("last", 1, 9), ("drop", None, 8)])
def test_ave_duplicate_policies(tmp_path, policy, label, n_train):
    root = tmp_path / "ave"
    make_ave(root, duplicate=(0, "Dog"))  # train id 0 (Church bell) appears again as Dog
    splits = build("ave", root, {"duplicates": policy})
    assert len(splits.train) == n_train
    report = splits.info["duplicates"]["train"]
    assert report["repeated_ids"] == 1 and report["conflicting_labels"] == 1
    assert report["rows_dropped"] == 10 - n_train
    ids = [c.id for c in splits.train.clips]
    assert len(ids) == len(set(ids))
    if label is not None:
        assert splits.train.clips[ids.index("yt0000abc")].label == label
    else:
        assert "yt0000abc" not in ids


def test_ave_duplicates_error_policy_names_the_lines(tmp_path):
    root = tmp_path / "ave"
    make_ave(root, duplicate=(0, "Dog"))
    with pytest.raises(DatasetError, match=r"'yt0000abc' appears on lines \[1, 10\].*trainSet.txt.*prepare_ave.py"):
        build("ave", root, {"duplicates": "error"})


def test_unknown_class_missing_list_and_missing_clip(tmp_path):
    root = tmp_path / "ave"
    make_ave(root)
    with open(root / "testSet.txt", "a") as f:
        f.write("Helicopter&zzz&good&0&10\n")
    with pytest.raises(DatasetError, match="line 4: class 'Helicopter' is not in the class list"):
        build("ave", root)
    make_ave(root)
    (root / "valSet.txt").unlink()
    with pytest.raises(DatasetError, match="valSet.txt"):
        build("ave", root)
    assert len(build("ave", root, {"val_list": None}).val) == 3
    make_ave(root)
    (root / "audio_spec" / "yt0010abc.pkl").unlink()
    with pytest.raises(DatasetError, match="yt0010abc.pkl"):
        build("ave", root)
    with pytest.warns(UserWarning):
        splits = build("ave", root, {"on_missing": "skip"})
    assert splits.info["skipped"]["val"]["count"] == 1 and len(splits.val) == 2


def test_stored_spectrograms_are_unpickled_safely(tmp_path):
    root = tmp_path / "ks"
    make_ks(root)

    class Evil:
        def __reduce__(self):
            return (eval, ("1",))  # not print: Ray's tqdm support replaces builtins.print once imported

    (root / "audio_spec" / "vid009_000010_000020.pkl").write_bytes(pickle.dumps(Evil()))
    splits = build("ks", root)
    with pytest.raises(DatasetError, match="refusing to unpickle builtins.eval"):
        splits.test[0]


def test_npy_spectrograms_and_shape_mismatch(tmp_path):
    root = tmp_path / "ks"
    make_ks(root)
    (root / "audio_spec" / "vid010_000010_000020.pkl").unlink()
    np.save(root / "audio_spec" / "vid010_000010_000020.npy", np.ones((257, 30), np.float32))
    splits = build("ks", root)
    assert torch.equal(splits.test[1][0]["audio"], torch.ones(1, 257, 30))
    np.save(root / "audio_spec" / "vid010_000010_000020.npy", np.ones((257, 29), np.float32))
    with pytest.raises(DatasetError, match=r"shape \(257, 29\)"):
        build("ks", root).test[1]


def test_noise_on_frames_and_spectrogram(tmp_path):
    root = tmp_path / "ave"
    make_ave(root)
    clean = build("ave", root)
    noisy = build("ave", root, noise={"kind": "salt_pepper", "eps": 10, "p_apply": 1.0})
    assert torch.equal(clean.val[0][0]["visual"], noisy.val[0][0]["visual"])
    xc, xn = clean.test[0][0], noisy.test[0][0]
    assert not torch.equal(xc["visual"], xn["visual"]) and not torch.equal(xc["audio"], xn["audio"])
    audio = xn["audio"][0]
    assert (audio == xc["audio"][0].max()).float().mean() == pytest.approx(0.05, abs=0.02)
