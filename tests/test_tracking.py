"""A sweep's `tracking:` block against the real libraries: the MLflow store (sqlite) read back with
MLflow's client (a run per cell, a nested run per trial with its parameters, per-epoch metrics and
resolved config), the W&B offline runs read back from disk, and a missing package as one clear error."""

from __future__ import annotations

import os

import pytest

from calray.errors import ConfigError
from calray.sweep.tracking import TrackingSpec, check_installed
from tests.test_sweep import REPO, write_sweep

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("wandb")


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("WANDB_SILENT", "true")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, object_store_memory=300 * 1024**2, include_dashboard=False,
                 log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def test_sweep_logs_to_mlflow_and_wandb_offline(ray_session, tmp_path):
    from mlflow.tracking import MlflowClient

    from calray.sweep.runner import main

    uri = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    tracking = {"mlflow": {"tracking_uri": uri, "experiment_name": "calray_test"},
                "wandb": {"project": "calray", "mode": "offline", "group_by": "cell"}}
    path = write_sweep(tmp_path, "tracked", search={"num_samples": 2, "seed": 0,
                                                    "space": {"method.T": {"uniform": [0.5, 2.0]}}},
                       tracking=tracking, robustness={"kinds": ["gaussian"], "eps": [5], "modes": ["train+test"],
                                                      "train_seeds": [0], "epochs": 1})
    assert main([str(path), "--quiet"]) == 0

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("calray_test")
    runs = client.search_runs([exp.experiment_id])
    cells = [r for r in runs if r.data.tags.get("calray_kind") == "cell"]
    trials = [r for r in runs if r.data.tags.get("calray_kind") == "trial"]
    assert sorted(r.info.run_name for r in cells) == ["robustness", "synthetic__none"]
    parent = {r.info.run_name: r.info.run_id for r in cells}
    retrains = [r for r in trials if r.data.tags["mlflow.parentRunId"] == parent["robustness"]]
    assert len(retrains) == 1  # the robustness grid's one train+test retrain is logged too
    trials = [r for r in trials if r.data.tags["mlflow.parentRunId"] == parent["synthetic__none"]]
    assert len(trials) == 2  # the cell's trials, nested under the cell's run
    for r in trials:
        assert 0.5 <= float(r.data.params["method.T"]) <= 2.0
        history = client.get_metric_history(r.info.run_id, "val_acc")
        assert len(history) >= 2  # one per epoch (2), plus the final best-epoch report
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"params.json", "run_config.yaml"} <= artifacts  # the trial's parameters and its resolved run config
    assert (tmp_path / "sweeps" / "tracked" / "mlflow_artifacts").is_dir()  # in the sweep dir, not the cwd

    offline = sorted((tmp_path / "sweeps" / "tracked" / "wandb" / "wandb").glob("offline-run-*"))
    assert len(offline) == 3  # one offline run per trial and retrain
    # a run's transaction log holds its config, group and per-epoch history; wandb >= 0.20 ships no
    # Python reader for it (its core is in Go), so it is read as bytes: protobuf keeps keys verbatim
    logs = [next(d.glob("run-*.wandb")).read_bytes() for d in offline]
    cell_runs = [data for data in logs if b"synthetic__none" in data]  # grouped by cell
    assert len(cell_runs) == 2
    for data in cell_runs:
        assert b"method.T" in data  # the searched parameter
        assert data.count(b"val_acc") >= 2  # logged every epoch


def test_a_missing_tracking_package_is_one_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"tracking\.wandb: needs the 'wandb' package.*\.\[tracking\]"):
        check_installed(TrackingSpec.model_validate({"wandb": {"project": "p"}}))
    check_installed(TrackingSpec.model_validate({}))  # nothing asked, nothing needed
