"""Shared fixtures: a tiny synthetic run config that trains in about a second on CPU."""

from __future__ import annotations

import pytest

from calray.config import config_from_dict


def tiny_run_dict(tmp_path, **sections) -> dict:
    """A complete run-config dict on small synthetic data; `sections` update blocks shallowly."""
    tree = {
        "name": "tiny",
        "data": {"dataset": "synthetic", "batch_size": 32, "seed": 0,
                 "params": {"modalities": ["audio", "visual"], "num_classes": 4, "dim": 16,
                            "strengths": [1.0, 0.4], "n_train": 256, "n_val": 64, "n_test": 96}},
        "model": {"encoders": {"audio": {"name": "mlp", "hidden": [32]}, "visual": {"name": "mlp", "hidden": [32]}}},
        "method": {"strategy": "cal", "T": 1.0, "eta": 1.0, "lambda": 0.1, "n": 2, "aib": "beta"},
        "optim": {"name": "sgd", "lr": 0.05, "epochs": 2},
        "runtime": {"output_dir": str(tmp_path / "runs"), "progress": False, "seed": 0},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key] = {**tree[key], **value}
        else:
            tree[key] = value
    return tree


@pytest.fixture
def tiny_cfg(tmp_path):
    """Factory: tiny_cfg(optim={"epochs": 3}) → RunConfig."""

    def make(**sections):
        return config_from_dict(tiny_run_dict(tmp_path, **sections), "tiny")

    return make
