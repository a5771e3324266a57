import re

import numpy as np
import pytest
import torch

from calray.config import config_from_dict
from calray.data import build_datasets
from calray.data.base import stratified_split
from calray.errors import ConfigError, DatasetError
from tests.conftest import tiny_run_dict


def test_synthetic_is_deterministic_and_imbalanced(tmp_path):
    cfg = config_from_dict(tiny_run_dict(tmp_path))
    a, b = build_datasets(cfg), build_datasets(cfg)
    assert a.modalities == ["audio", "visual"] and a.num_classes == 4
    assert len(a.train) == 256 and len(a.val) == 64 and len(a.test) == 96
    xa, ya = a.train[7]
    xb, yb = b.train[7]
    assert ya == yb and all((xa[m] == xb[m]).all() for m in xa)
    # the dominant modality's class means are farther apart relative to the noise
    feats = a.train.features
    y = np.array(a.train.labels)
    sep = {}
    for m in ("audio", "visual"):
        x = feats[m].numpy()
        centroids = np.stack([x[y == c].mean(0) for c in range(4)])
        sep[m] = np.linalg.norm(centroids[:, None] - centroids[None], axis=-1).mean()
    assert sep["audio"] > 2 * sep["visual"]


def test_synthetic_params_validated(tmp_path):
    cfg = config_from_dict(tiny_run_dict(tmp_path, data={"dataset": "synthetic", "params": {"strenghts": [1]}}))
    with pytest.raises(ConfigError, match=r"data\.params\.strenghts"):
        build_datasets(cfg)


def test_stratified_split_deterministic_and_stratified():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    keep, held = stratified_split(labels, 0.1, seed=3)
    keep2, held2 = stratified_split(labels, 0.1, seed=3)
    assert (held == held2).all() and (keep == keep2).all()
    assert sorted(np.concatenate([keep, held]).tolist()) == list(range(100))
    assert np.bincount(labels[held]).tolist() == [5, 3, 2]


def write_features(root, with_val):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    splits = ["train", "test"] + (["val"] if with_val else [])
    for split, n in zip(splits, (60, 20, 10)):
        y = np.arange(n) % 3
        np.savez(root / f"{split}.npz", y=y, x_rgb=rng.normal(size=(n, 5)), x_depth=rng.normal(size=(n, 4)))


def features_cfg(tmp_path, root, params=None, **sections):
    """A tiny run config on the features dataset at `root` (the synthetic params replaced)."""
    data = {"dataset": "features", "root": str(root), "params": params or {}, **sections.pop("data", {})}
    return config_from_dict(tiny_run_dict(tmp_path, data=data, **sections))


def test_features_with_and_without_val(tmp_path):
    write_features(tmp_path / "f1", with_val=True)
    cfg = features_cfg(tmp_path, tmp_path / "f1")
    s = build_datasets(cfg)
    assert s.modalities == ["depth", "rgb"] and s.num_classes == 3
    assert (len(s.train), len(s.val), len(s.test)) == (60, 10, 20)
    x, y = s.train[0]
    assert x["rgb"].shape == (5,) and x["depth"].shape == (4,)

    write_features(tmp_path / "f2", with_val=False)
    cfg = features_cfg(tmp_path, tmp_path / "f2")
    s = build_datasets(cfg)
    assert (len(s.train), len(s.val)) == (54, 6)  # stratified 10%: 2 per class
    assert len(s.info["val_indices"]) == 6
    assert not set(s.info["val_indices"]) & set(s.train.indices)


def test_features_errors_name_the_path(tmp_path):
    cfg = features_cfg(tmp_path, tmp_path / "none")
    with pytest.raises(DatasetError, match="none"):
        build_datasets(cfg)
    root = tmp_path / "bad"
    write_features(root, with_val=False)
    (root / "test.npz").write_bytes(b"not a zip")
    cfg = features_cfg(tmp_path, root)
    with pytest.raises(DatasetError, match="test.npz"):
        build_datasets(cfg)


# ------------------------------------------------------------------ standardisation of `features`


def write_mixed_scale_features(root, with_val, n=(60, 12, 200), seed=0):
    """Real feature files mix scales: `rgb` pixel averages in 0–6, `depth` reaching ~17,000 with
    one constant column. Without val.npz, the rows data.seed 0 holds out for validation are made
    100× larger, so statistics that include them are far off. Returns the raw arrays per split."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    raw = {}
    for split, rows in zip(("train", "val", "test"), n):
        if split == "val" and not with_val:
            continue
        y = np.arange(rows) % 3
        rgb = rng.uniform(0.0, 6.0, size=(rows, 5)) + y[:, None]
        depth = 300.0 + 17000.0 * rng.random((rows, 4))
        depth[:, 2] = 42.0
        if split == "train" and not with_val:
            _, held = stratified_split(y, 0.1, seed=0)
            rgb[held] *= 100.0
            depth[held] *= 100.0
        raw[split] = {"y": y, "rgb": rgb, "depth": depth}
        np.savez(root / f"{split}.npz", y=y, x_rgb=rgb, x_depth=depth)
    return raw


def np_standardize(x, fit):
    """Reference: z-score `x` with population mean/std of `fit` (a constant feature: std 1)."""
    mean, std = fit.mean(0), fit.std(0)
    return (x - mean) / np.where(std == 0, 1.0, std)


def test_features_standardized_with_train_statistics(tmp_path):
    raw = write_mixed_scale_features(tmp_path / "f", with_val=True)
    s = build_datasets(features_cfg(tmp_path, tmp_path / "f"))
    tr = raw["train"]
    for m in ("rgb", "depth"):
        x = s.train.features[m].numpy().astype(np.float64)
        varying = np.arange(x.shape[1]) != (2 if m == "depth" else -1)
        np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-5)
        np.testing.assert_allclose(x.std(0)[varying], 1.0, atol=1e-5)
        # val and test use the TRAIN statistics, not their own
        for split in ("val", "test"):
            got = getattr(s, split).features[m].numpy()
            np.testing.assert_allclose(got, np_standardize(raw[split][m], tr[m]), rtol=1e-5, atol=1e-5)
        assert abs(s.test.features[m].numpy().mean(0)).max() > 1e-3  # not re-centred on test's own mean
        batch, _ = s.test.get_batch([3, 0, 7])  # the fast path serves the standardised tensors
        assert all((batch[m][k] == s.test[i][0][m]).all() for k, i in enumerate((3, 0, 7)))
    info = s.info["standardize"]
    assert info["enabled"] is True and info["source"] == "train rows (N=60)"
    np.testing.assert_allclose(info["mean"]["depth"], tr["depth"].mean(0), rtol=1e-12)
    np.testing.assert_allclose(info["std"]["rgb"], tr["rgb"].std(0), rtol=1e-12)


def test_features_statistics_exclude_the_derived_validation_rows(tmp_path):
    raw = write_mixed_scale_features(tmp_path / "f", with_val=False)
    s = build_datasets(features_cfg(tmp_path, tmp_path / "f"))
    keep, held = stratified_split(raw["train"]["y"], 0.1, seed=0)
    assert s.info["val_indices"] == held.tolist() and s.train.indices == keep.tolist()
    base = s.train.dataset.features  # train.npz, all rows, standardised
    for m in ("rgb", "depth"):
        fit = raw["train"][m][keep]  # the held-out rows (100× larger) must not enter the statistics
        np.testing.assert_allclose(base[m].numpy()[keep], np_standardize(fit, fit), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(base[m].numpy()[keep].mean(0), 0.0, atol=1e-5)
        val = np.stack([s.val[i][0][m].numpy() for i in range(len(s.val))])
        np.testing.assert_allclose(val, np_standardize(raw["train"][m][held], fit), rtol=1e-5, atol=1e-4)
        test = s.test.features[m].numpy()
        np.testing.assert_allclose(test, np_standardize(raw["test"][m], fit), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s.info["standardize"]["mean"][m], fit.mean(0), rtol=1e-12)
    assert s.info["standardize"]["source"].startswith("train rows (N=54;")


def test_features_standardize_false_keeps_raw_values(tmp_path):
    raw = write_mixed_scale_features(tmp_path / "f", with_val=True)
    with pytest.warns(UserWarning):
        s = build_datasets(features_cfg(tmp_path, tmp_path / "f", {"standardize": False}))
    for split in ("train", "val", "test"):
        for m in ("rgb", "depth"):
            assert np.array_equal(getattr(s, split).features[m].numpy(), raw[split][m].astype(np.float32))
    assert s.info["standardize"] == {"enabled": False}


def test_features_extreme_scale_warns_only_when_unstandardized(tmp_path):
    import warnings

    write_mixed_scale_features(tmp_path / "f", with_val=True)
    with pytest.warns(UserWarning) as caught:
        s = build_datasets(features_cfg(tmp_path, tmp_path / "f", {"standardize": False}))
    messages = [str(w.message) for w in caught]
    peak = r"'depth' .*max \|x\| = 1\.7\d*e\+04 .*data\.params\.standardize: true"
    ratio = r"'depth' \(overall std \d+\.?\d*\) is \d+× the scale of 'rgb'.*data\.params\.standardize: true"
    assert any(re.search(peak, w) for w in messages) and any(re.search(ratio, w) for w in messages)
    assert not any("'rgb'" in w and "max |x|" in w for w in messages)  # 0–8 is not extreme
    assert s.info["warnings"] == messages  # also recorded for data_info.json

    # the ratio rule: no value near 100, but one modality's spread is >100× the other's
    root = tmp_path / "ratio"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 10)):
        np.savez(root / f"{split}.npz", y=np.arange(n) % 2, x_a=rng.normal(0, 1e-3, (n, 3)),
                 x_b=rng.normal(0, 1.0, (n, 3)))
    with pytest.warns(UserWarning, match=r"'b'.*×.*'a'.*data\.params\.standardize: true"):
        build_datasets(features_cfg(tmp_path, root, {"standardize": False}))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on = build_datasets(features_cfg(tmp_path, tmp_path / "f"))
    assert not [w for w in caught if "standardize" in str(w.message)] and "warnings" not in on.info


def test_features_constant_feature_is_finite(tmp_path):
    root = tmp_path / "const"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("test", 10)):
        x = rng.normal(size=(n, 3))
        x[:, 1] = 0.1  # float64 mean of 0.1s is not exactly 0.1: a relative-zero std must not be divided by
        np.savez(root / f"{split}.npz", y=np.arange(n) % 2, x_a=x, x_c=np.full((n, 2), 7.0))
    s = build_datasets(features_cfg(tmp_path, root))
    for ds in (s.train.dataset, s.test):
        for m in ("a", "c"):
            assert torch.isfinite(ds.features[m]).all()
        assert ds.features["a"][:, 1].abs().max() < 1e-6 and (ds.features["c"] == 0).all()
    assert s.info["standardize"]["std"]["c"] == [1.0, 1.0] and s.info["standardize"]["std"]["a"][1] == 1.0


def test_feature_noise_acts_on_standardized_values(tmp_path):
    """Gaussian ε = 5 with std_scale 0.1 perturbs by 0.5 training stds, whatever the raw scale."""
    raw = write_mixed_scale_features(tmp_path / "f", with_val=True)
    noisy = build_datasets(features_cfg(tmp_path, tmp_path / "f",
                                        noise={"kind": "gaussian", "eps": 5, "mode": "test", "p_apply": 1.0}))
    for m in ("rgb", "depth"):
        got = np.stack([noisy.test[i][0][m].numpy() for i in range(len(noisy.test))])
        delta = got - np_standardize(raw["test"][m], raw["train"][m])
        assert delta.mean() == pytest.approx(0.0, abs=0.05)
        assert delta.std() == pytest.approx(0.5, abs=0.03)
        # `test` mode: val stays clean, standardised
        np.testing.assert_allclose(noisy.val.features[m].numpy(), np_standardize(raw["val"][m], raw["train"][m]),
                                   rtol=1e-5, atol=1e-5)


def test_features_params_validated(tmp_path):
    write_features(tmp_path / "f", with_val=True)
    with pytest.raises(ConfigError, match=r"data\.params\.standardise: unknown key"):
        build_datasets(features_cfg(tmp_path, tmp_path / "f", {"standardise": False}))


def test_features_statistics_land_in_data_info_json(tmp_path):
    import json

    from calray.engine.trainer import train

    raw = write_mixed_scale_features(tmp_path / "f", with_val=False, n=(48, 0, 12))
    mlp = {"name": "mlp", "hidden": [8]}
    cfg = features_cfg(tmp_path, tmp_path / "f", model={"encoders": {"rgb": mlp, "depth": mlp}},
                       optim={"name": "sgd", "lr": 0.05, "epochs": 1})
    train(cfg)
    info = json.loads((cfg.run_dir() / "data_info.json").read_text())
    keep, _ = stratified_split(raw["train"]["y"], 0.1, seed=0)
    st = info["standardize"]
    assert st["enabled"] is True and st["source"].startswith(f"train rows (N={len(keep)};")
    for m in ("rgb", "depth"):
        np.testing.assert_allclose(st["mean"][m], raw["train"][m][keep].mean(0), rtol=1e-12)
        np.testing.assert_allclose(st["std"][m], np.where(raw["train"][m][keep].std(0) == 0, 1.0,
                                                          raw["train"][m][keep].std(0)), rtol=1e-12)


def test_feature_noise_only_on_test_in_test_mode(tmp_path):
    clean = build_datasets(config_from_dict(tiny_run_dict(tmp_path)))
    noisy = build_datasets(config_from_dict(tiny_run_dict(
        tmp_path, noise={"kind": "gaussian", "eps": 5, "mode": "test", "p_apply": 1.0})))
    for i in range(5):
        assert all((clean.train[i][0][m] == noisy.train[i][0][m]).all() for m in ("audio", "visual"))
        assert all((clean.val[i][0][m] == noisy.val[i][0][m]).all() for m in ("audio", "visual"))
        assert any((clean.test[i][0][m] != noisy.test[i][0][m]).any() for m in ("audio", "visual"))
    # same noise seed → same noise on every read
    assert (noisy.test[3][0]["audio"] == noisy.test[3][0]["audio"]).all()


def test_feature_salt_pepper_fraction_scales_with_eps(tmp_path):
    fractions = {}
    for eps in (5, 10):
        noisy = build_datasets(config_from_dict(tiny_run_dict(
            tmp_path, noise={"kind": "salt_pepper", "eps": eps, "p_apply": 1.0, "density": 0.2})))
        clean = build_datasets(config_from_dict(tiny_run_dict(tmp_path)))
        changed = [(noisy.test[i][0]["audio"] != clean.test[i][0]["audio"]).float().mean() for i in range(96)]
        fractions[eps] = float(np.mean(changed))
    assert fractions[10] == pytest.approx(0.2, abs=0.03)
    assert fractions[5] == pytest.approx(0.1, abs=0.03)


# ------------------------------------------------------------------ whole-batch fetching


def _loader_batches(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [(x, y) for x, y in loader]


@pytest.mark.parametrize("noise", [None, {"kind": "gaussian", "eps": 5, "mode": "train+test"}])
def test_batched_loader_yields_the_per_sample_loaders_batches(tmp_path, noise):
    """Features datasets (through the derived-val Subset too) fetch whole batches: the same
    tensors, in the same shuffled order per epoch, as a DataLoader calling dataset[i]."""
    import torch
    from torch.utils.data import DataLoader

    from calray.data.batched import batched_loader
    from calray.data.sampling import ShardedSampler

    rng = np.random.default_rng(0)
    root = tmp_path / "feats"
    root.mkdir()
    for split, n in (("train", 90), ("test", 20)):
        np.savez(root / f"{split}.npz", x_a=rng.normal(size=(n, 3)).astype(np.float32),
                 x_b=rng.normal(size=(n, 2)).astype(np.float32), y=rng.integers(0, 3, n))
    tree = tiny_run_dict(tmp_path, data={"dataset": "features", "root": str(root), "batch_size": 16, "params": {}})
    if noise:
        tree["noise"] = noise
    splits = build_datasets(config_from_dict(tree))
    for ds, shuffle in ((splits.train, True), (splits.val, False), (splits.test, False)):
        sampler = ShardedSampler(len(ds), shuffle=shuffle, seed=3)
        whole = batched_loader(ds, sampler, 16)
        assert whole is not None and len(whole) == -(-len(ds) // 16)  # the tail batch is kept
        plain = DataLoader(ds, batch_size=16, sampler=sampler)
        for epoch in (0, 1):
            got, want = _loader_batches(whole, epoch), _loader_batches(plain, epoch)
            assert len(got) == len(want)
            for (gx, gy), (wx, wy) in zip(got, want):
                assert torch.equal(gy, wy) and gy.dtype == torch.long
                assert all(torch.equal(gx[m], wx[m]) for m in ("a", "b"))
    if not noise:
        first = _loader_batches(batched_loader(splits.train, ShardedSampler(len(splits.train), shuffle=True), 16), 0)
        again = _loader_batches(batched_loader(splits.train, ShardedSampler(len(splits.train), shuffle=True), 16), 1)
        assert not torch.equal(first[0][1], again[0][1])  # set_epoch reaches the sampler: a new order


def test_trainer_uses_whole_batches_only_where_a_dataset_offers_them(tiny_cfg):
    from torch.utils.data import Dataset

    from calray.data.base import DatasetSplits
    from calray.engine.trainer import Trainer

    cfg = tiny_cfg()
    trainer = Trainer(cfg)
    assert trainer.train_loader.batch_size is None  # batches fetched whole from the synthetic tensors

    class PerSample(Dataset):
        def __init__(self, ds):
            self.ds = ds

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            return self.ds[i]

    s = trainer.splits
    wrapped = DatasetSplits(PerSample(s.train), PerSample(s.val), PerSample(s.test), s.modalities, s.num_classes)
    assert Trainer(cfg, splits=wrapped).train_loader.batch_size == cfg.data.batch_size
