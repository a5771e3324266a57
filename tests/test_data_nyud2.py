"""NYUD2 loader (QMF layout): the RGB|depth split, classes, transforms, errors and per-modality noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from calray.data import build_datasets
from calray.data.base import dataset_labels
from calray.data.nyud2 import QMF_MEAN, QMF_STD
from calray.errors import ConfigError, DatasetError
from tests.fixtures_data import make_nyud2, run_config

SMALL = {"image_size": 16, "load_size": 20}


@pytest.fixture
def nyud2(tmp_path):
    root = tmp_path / "nyud2"
    make_nyud2(root)
    return root


def build(root, params=None, **kw):
    return build_datasets(run_config("nyud2", root, {**SMALL, **(params or {})}, **kw))


def pixel_means(t: torch.Tensor, mean=QMF_MEAN, std=QMF_STD) -> np.ndarray:
    m = torch.tensor(mean).view(-1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1)
    return ((t * s + m) * 255).mean(dim=(1, 2)).numpy()


def test_rgb_and_depth_halves_shapes_and_classes(nyud2):
    splits = build(nyud2)
    assert splits.class_names == ["bathroom", "bedroom", "kitchen"] and splits.num_classes == 3
    assert splits.modalities == ["rgb", "depth"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 3, 3)
    x, y = splits.test[2]
    assert y == 2 and dataset_labels(splits.test) == [0, 1, 2]
    assert x["rgb"].shape == (3, 16, 16) and x["depth"].shape == (3, 16, 16)
    np.testing.assert_allclose(pixel_means(x["rgb"]), [200, 40, 40], atol=1.0)
    np.testing.assert_allclose(pixel_means(x["depth"]), [90, 90, 90], atol=1.0)
    torch.manual_seed(0)
    xt, _ = splits.train[0]
    assert xt["rgb"].shape == (3, 16, 16)


def test_single_channel_depth(nyud2):
    splits = build(nyud2, {"depth_channels": 1})
    x, _ = splits.test[0]
    assert x["depth"].shape == (1, 16, 16)
    np.testing.assert_allclose(pixel_means(x["depth"], (np.mean(QMF_MEAN),), (np.mean(QMF_STD),)), [90], atol=1.0)


def test_train_crop_and_flip_are_aligned_across_modalities(tmp_path):
    root = tmp_path / "nyud2"
    make_nyud2(root, classes=("a", "b"), half=(16, 16))
    # a horizontal ramp in both halves: an aligned crop/flip keeps rgb and depth identical
    ramp = np.tile(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None], (16, 1, 3))
    for png in (root / "train").rglob("*.png"):
        Image.fromarray(np.concatenate([ramp, ramp], axis=1)).save(png)
    splits = build(root, {"image_size": 8, "load_size": 16})
    torch.manual_seed(1)
    for _ in range(10):
        x, _ = splits.train[0]
        r = x["rgb"][0] * QMF_STD[0] + QMF_MEAN[0]
        d = x["depth"][0] * QMF_STD[0] + QMF_MEAN[0]
        assert torch.allclose(r, d, atol=1e-5)


def test_test_class_missing_from_train_is_an_error(nyud2):
    (nyud2 / "test" / "office").mkdir()
    Image.new("RGB", (40, 16)).save(nyud2 / "test" / "office" / "0.png")
    with pytest.raises(DatasetError, match=r"\['office'\] are not among train's classes"):
        build(nyud2)


def test_missing_root_split_corrupt_png_and_ignored_files(nyud2, tmp_path):
    with pytest.raises(DatasetError, match="prepare_nyud2.py"):
        build(tmp_path / "missing")
    (nyud2 / "train" / "bedroom" / "notes.txt").write_text("hi")
    splits = build(nyud2)
    assert splits.info["non_png_files_ignored"]["train"] == 1
    (nyud2 / "test" / "kitchen" / "0000.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match="0000.png"):
        build(nyud2).test[2]
    import shutil

    shutil.rmtree(nyud2 / "test")
    with pytest.raises(DatasetError, match="missing split directory"):
        build(nyud2)
    with pytest.raises(ConfigError, match="load_size"):
        build(nyud2, {"load_size": 8})


def test_gaussian_noise_scale_and_modes(nyud2):
    noise = {"kind": "gaussian", "eps": 10, "p_apply": 1.0}
    clean, noisy = build(nyud2), build(nyud2, noise=noise)
    xc, xn = clean.test[0][0], noisy.test[0][0]
    diff = (xn["rgb"] - xc["rgb"]) * torch.tensor(QMF_STD).view(3, 1, 1) * 255
    assert 7 < float(diff[0].std()) < 13  # std = ε·1 on 0–255 for NYUD2 (16×16 pixels)
    assert torch.allclose(diff[0], diff[1], atol=1e-3)  # one plane for all channels
    assert not torch.equal(xc["depth"], xn["depth"])
    assert torch.equal(clean.val[0][0]["rgb"], noisy.val[0][0]["rgb"])
    only_depth = build(nyud2, noise={**noise, "modalities": ["depth"]})
    x = only_depth.test[0][0]
    assert torch.equal(x["rgb"], xc["rgb"]) and not torch.equal(x["depth"], xc["depth"])
