"""Experiment tracking from the sweep file's `tracking:` block, through Ray Tune's own logger callbacks.

    tracking:
      mlflow: {tracking_uri: "sqlite:////abs/mlflow.db", experiment_name: nyud2_noise}   # or a server URI
      wandb: {project: calray, mode: offline, group_by: cell}

MLflow: one run per cell (named after it) and, nested under it (`mlflow.parentRunId`), one run per
trial with the trial's parameters, its per-epoch metrics and its Tune files (params.json, and
run_config.yaml: the resolved run config) as artifacts — `ray.air.integrations.mlflow.MLflowLoggerCallback`.
W&B: one run per trial (offline by default: nothing leaves the machine; `wandb sync` later), grouped
by cell or by sweep — `ray.air.integrations.wandb.WandbLoggerCallback`, files under
`<sweep dir>/wandb` unless `dir` is given. The packages are the optional extra
`pip install -e ".[tracking]"`; a block naming one that is not installed is one clear error.
TensorBoard needs no block: every trial's run dir has its own events (calray.engine.tensorboard).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from calray.errors import ConfigError

WANDB_DIR = "wandb"
MLFLOW_ARTIFACTS = "mlflow_artifacts"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MLflowSpec(_Strict):
    # sqlite:////abs/mlflow.db or http(s)://server; MLflow ≥ 3 refuses a file:// store unless
    # MLFLOW_ALLOW_FILE_STORE=true is set (its own switch)
    tracking_uri: str
    experiment_name: str | None = None  # default: the sweep's name
    artifact_location: str | None = None  # a new experiment's artifact root (default: <sweep dir>/mlflow_artifacts)
    save_artifact: bool = True  # the trial's Tune files (params.json: the resolved run config)


class WandbSpec(_Strict):
    project: str = "calray"
    mode: Literal["offline", "online", "disabled"] = "offline"
    group_by: Literal["cell", "sweep"] = "cell"
    dir: str | None = None  # default: <sweep dir>/wandb
    entity: str | None = None


class TrackingSpec(_Strict):
    mlflow: MLflowSpec | None = None
    wandb: WandbSpec | None = None


def require(package: str, key: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"{key}: needs the {package!r} package, which is not installed; "
                          f'install the tracking extra: pip install -e ".[tracking]"')


def check_installed(spec: TrackingSpec | None) -> None:
    """Fail before any trial when a tracking block names a package that is missing."""
    if spec is None:
        return
    if spec.mlflow is not None:
        require("mlflow", "tracking.mlflow")
    if spec.wandb is not None:
        require("wandb", "tracking.wandb")


def mlflow_parent_run(m: MLflowSpec, experiment: str, cell_id: str, sweep_dir: Path) -> str:
    """The id of the cell's MLflow run (created once; a resumed sweep finds it by its tags). A new
    experiment keeps its artifacts in the sweep dir, not in whatever directory the sweep ran from."""
    from mlflow.tracking import MlflowClient  # optional extra, imported only when a sweep asks for it

    client = MlflowClient(tracking_uri=m.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    location = m.artifact_location or (Path(sweep_dir) / MLFLOW_ARTIFACTS).resolve().as_uri()
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment, artifact_location=location)
    found = client.search_runs([exp_id], filter_string=f"tags.calray_cell = '{cell_id}' and tags.calray_kind = 'cell'")
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=cell_id, tags={"calray_cell": cell_id, "calray_kind": "cell"})
    return run.info.run_id


def tracking_callbacks(spec: TrackingSpec | None, sweep_name: str, cell_id: str, sweep_dir: Path) -> list:
    """Ray Tune callbacks for one cell's Tuner."""
    if spec is None:
        return []
    check_installed(spec)
    callbacks = []
    if spec.mlflow is not None:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        m = spec.mlflow
        experiment = m.experiment_name or sweep_name
        parent = mlflow_parent_run(m, experiment, cell_id, sweep_dir)
        callbacks.append(MLflowLoggerCallback(
            tracking_uri=m.tracking_uri, experiment_name=experiment, save_artifact=m.save_artifact,
            tags={"mlflow.parentRunId": parent, "calray_cell": cell_id, "calray_kind": "trial", "sweep": sweep_name}))
    if spec.wandb is not None:
        from ray.air.integrations.wandb import WandbLoggerCallback

        w = spec.wandb
        if w.mode != "online":  # Ray's callback asks for an API key unless WANDB_MODE says it needs none
            os.environ["WANDB_MODE"] = w.mode
        wandb_dir = Path(w.dir) if w.dir else Path(sweep_dir) / WANDB_DIR
        wandb_dir.mkdir(parents=True, exist_ok=True)
        callbacks.append(WandbLoggerCallback(
            project=w.project, group=cell_id if w.group_by == "cell" else sweep_name, mode=w.mode,
            entity=w.entity, dir=str(wandb_dir), tags=[sweep_name, cell_id],
            excludes=["run"]))  # the whole run-config dict is the artifact; the searched keys stay
    return callbacks


__all__ = ["MLflowSpec", "TrackingSpec", "WandbSpec", "check_installed", "tracking_callbacks"]
