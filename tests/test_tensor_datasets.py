import numpy as np
import pytest

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


def test_features_with_and_without_val(tmp_path):
    write_features(tmp_path / "f1", with_val=True)
    cfg = config_from_dict(tiny_run_dict(tmp_path, data={"dataset": "features", "root": str(tmp_path / "f1")}))
    s = build_datasets(cfg)
    assert s.modalities == ["depth", "rgb"] and s.num_classes == 3
    assert (len(s.train), len(s.val), len(s.test)) == (60, 10, 20)
    x, y = s.train[0]
    assert x["rgb"].shape == (5,) and x["depth"].shape == (4,)

    write_features(tmp_path / "f2", with_val=False)
    cfg = config_from_dict(tiny_run_dict(tmp_path, data={"dataset": "features", "root": str(tmp_path / "f2")}))
    s = build_datasets(cfg)
    assert (len(s.train), len(s.val)) == (54, 6)  # stratified 10%: 2 per class
    assert len(s.info["val_indices"]) == 6
    assert not set(s.info["val_indices"]) & set(s.train.indices)


def test_features_errors_name_the_path(tmp_path):
    cfg = config_from_dict(tiny_run_dict(tmp_path, data={"dataset": "features", "root": str(tmp_path / "none")}))
    with pytest.raises(DatasetError, match="none"):
        build_datasets(cfg)
    root = tmp_path / "bad"
    write_features(root, with_val=False)
    (root / "test.npz").write_bytes(b"not a zip")
    cfg = config_from_dict(tiny_run_dict(tmp_path, data={"dataset": "features", "root": str(root)}))
    with pytest.raises(DatasetError, match="test.npz"):
        build_datasets(cfg)


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
    from calray.sampling import ShardedSampler

    rng = np.random.default_rng(0)
    root = tmp_path / "feats"
    root.mkdir()
    for split, n in (("train", 90), ("test", 20)):
        np.savez(root / f"{split}.npz", x_a=rng.normal(size=(n, 3)).astype(np.float32),
                 x_b=rng.normal(size=(n, 2)).astype(np.float32), y=rng.integers(0, 3, n))
    tree = tiny_run_dict(tmp_path, data={"dataset": "features", "root": str(root), "batch_size": 16})
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
    from calray.trainer import Trainer

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
