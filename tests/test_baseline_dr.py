"""Diagnosing & Re-learning (`method.strategy: dr`): purity and scaling against sklearn / a contingency
table; the soft re-initialisation θ ← αθ⁰ + (1−α)θ with α = tanh(λ·|purity gap|) recomputed independently
(features through the encoders by hand, sklearn's MinMaxScaler + KMeans, purity from a contingency table,
θ⁰ from a fresh model of the same seed); the schedule; config errors; the CLI. Ray: tests/test_baselines_t1b_ray.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.preprocessing import MinMaxScaler

from calray.config import load_config, save_config
from calray.engine.trainer import Trainer
from calray.errors import ConfigError
from calray.method.dr import minmax, purity
from calray.train import main as train_main


def dr_cfg(tiny_cfg, **params):
    params = {"reinit_epoch": 1, "kmeans_n_init": 3, **params}
    return tiny_cfg(method={"strategy": "dr", "aib": "off", "unimodal_weight": 0, "params": params},
                    optim={"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "epochs": 2})


def contingency_purity(labels, clusters) -> float:
    table = np.zeros((clusters.max() + 1, labels.max() + 1))
    np.add.at(table, (clusters, labels), 1)
    return table.max(1).sum() / len(labels)


def test_purity_and_scaling_match_sklearn_and_a_contingency_table():
    rng = np.random.default_rng(0)
    labels, clusters = rng.integers(0, 4, 50), rng.integers(0, 6, 50)
    assert purity(labels, clusters) == pytest.approx(contingency_purity(labels, clusters))
    assert purity(np.array([0, 0, 1, 1]), np.array([5, 5, 7, 7])) == 1.0
    x = rng.normal(size=(30, 5))
    x[:, 2] = 3.0  # a constant feature
    assert np.allclose(minmax(x), MinMaxScaler(feature_range=(-1, 1)).fit_transform(x))


def split_features(trainer, split):
    data = getattr(trainer.splits, split)
    xs = [data[i] for i in range(len(data))]
    inputs = {m: torch.stack([x[0][m] for x in xs]) for m in trainer.modalities}
    labels = np.array([int(x[1]) for x in xs])
    trainer.raw_model.eval()
    with torch.no_grad():
        feats = {m: trainer.raw_model.encoders[m](inputs[m]).double().numpy() for m in trainer.modalities}
    trainer.raw_model.train()
    return feats, labels


def independent_alpha(trainer, m, lam=3.0):
    out = []
    for split in ("train", "val"):
        feats, labels = split_features(trainer, split)
        x = MinMaxScaler(feature_range=(-1, 1)).fit_transform(feats[m])
        clusters = KMeans(n_clusters=trainer.splits.num_classes, random_state=0, n_init=3).fit_predict(x)
        out.append(contingency_purity(labels, clusters))
    return math.tanh(lam * abs(out[0] - out[1])), out


def test_soft_reinitialisation_follows_the_rule(tiny_cfg):
    cfg = dr_cfg(tiny_cfg)
    init = {k: v.detach().clone() for k, v in Trainer(cfg).raw_model.named_parameters()}  # same seed: θ⁰
    trainer = Trainer(cfg)
    model = trainer.raw_model
    trainer.train_epoch(0)
    assert trainer.strategy.on_epoch_end(model, 0, trainer.evaluate_split) == {}  # never after epoch 0
    trainer.train_epoch(1)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    alphas = {m: independent_alpha(trainer, m) for m in trainer.modalities}
    logged = trainer.strategy.on_epoch_end(model, 1, trainer.evaluate_split)
    for m, (alpha, (p_train, p_val)) in alphas.items():
        assert logged[f"dr_alpha_{m}"] == pytest.approx(alpha, abs=1e-9) and 0.0 < alpha < 1.0
        assert (logged[f"dr_purity_train_{m}"], logged[f"dr_purity_val_{m}"]) == pytest.approx((p_train, p_val))
    for name, p in model.named_parameters():
        mod = name.split(".")[1] if name.startswith("encoders.") else None
        if mod is None:  # fusion head: untouched
            assert torch.equal(p, before[name]), name
        else:
            a = alphas[mod][0]
            assert torch.allclose(p, a * init[name] + (1 - a) * before[name], atol=1e-6), name
    assert logged["dr_reinits"] == 1.0


def test_schedule_every_reinit_epoch_at_most_reinit_num_times(tiny_cfg):
    trainer = Trainer(dr_cfg(tiny_cfg, reinit_epoch=2, reinit_num=2))
    trainer.train_epoch(0)
    calls = [bool(trainer.strategy.on_epoch_end(trainer.raw_model, e, trainer.evaluate_split)) for e in range(8)]
    assert calls == [False, False, True, False, True, False, False, False]


def test_config_errors_name_the_keys(tiny_cfg):
    with pytest.raises(ConfigError, match="method.unimodal_weight: 0"):
        Trainer(tiny_cfg(method={"strategy": "dr", "aib": "off"}))
    with pytest.raises(ConfigError, match="reinit_epoch"):
        tiny_cfg(method={"strategy": "dr", "aib": "off", "unimodal_weight": 0, "params": {"reinit_epoch": 0}})


def test_cli_run_logs_the_learning_state(tiny_cfg, tmp_path):
    path = tmp_path / "dr.yaml"
    save_config(dr_cfg(tiny_cfg).model_copy(update={"name": "dr"}), path)
    assert train_main([str(path), "--set", "method.params.move_lambda=2"]) == 0
    run_dir = load_config(path).run_dir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_run"] == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "dr_alpha_audio" not in rows[0] and 0.0 <= rows[1]["dr_alpha_visual"] < 1.0
