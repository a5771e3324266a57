"""Shared fixtures: a tiny synthetic run config that trains in about a second on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from calray.config import config_from_dict

# Tiny models on a 2-core machine: one intra-op thread is much faster than oversubscribing,
# also in subprocesses and Ray workers the tests start.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# One Ray auth mode for the whole session: Ray's core reads RAY_AUTH_MODE once per process, so a test
# module that joins a token-less cluster (tests/test_cluster.py) would leave every later local
# ray.init unable to talk to its own token-protected GCS.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


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


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance per test module (4 logical CPUs) for Ray Train tests."""
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as mp:
        # a worker group that cannot start fails in 45 s instead of Ray's 60 s × infinite retries;
        # these variables are propagated from the driver to Ray Train's controller and workers
        mp.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "45")
        mp.setenv("RAY_DEDUP_LOGS", "0")
        # the dashboard stays on: without its State API, Ray Train's PlacementGroupCleaner logs
        # "Failed to query Ray Train Controller actor state" every few seconds
        ray.init(address="local", num_cpus=4, object_store_memory=300 * 1024**2, log_to_driver=True)
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def ray_tune_local():
    """One local Ray instance per test module for sweep (Ray Tune) tests; yields its GCS address, which a
    subprocess sweep can join with --address. Trials keep the driver's CWD and import this checkout."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("optuna")
    repo = Path(__file__).resolve().parent.parent
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p)
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, object_store_memory=300 * 1024**2, include_dashboard=False,
                 log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()

