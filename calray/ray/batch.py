"""Fixed run configs as Ray Tune trials: the sweep's final multi-seed retrains and the robustness grid's
train+test retrains. Tune's default searcher runs a `tune.grid_search` over the configs' indices, each
trial `calray.ray.trial.run_trial`, a bounded number at a time, in parallel on the cluster; the driver
prints one progress line per run as it ends. A run whose directory already holds a summary.json for
the identical config is reused instead of trained again (`finished_summary`), and an unfinished run
resumes from its own last checkpoint (runtime.resume), so an interrupted batch continues without
duplicates."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from calray.config import config_from_dict, read_yaml
from calray.engine.resume import check_resumable
from calray.errors import CalrayError
from calray.io import CONFIG_FILE, SUMMARY_FILE
from calray.ray.progress import RetrainProgress, tune_callback
from calray.ray.session import init_ray
from calray.ray.trial import run_trial


@dataclass
class FixedRun:
    """One complete run config (absolute paths; runtime.output_dir/run_name name its run dir)."""

    config: dict
    label: str  # its progress line, e.g. "cell seed 3"
    cell: str = "final"  # for the trial's bookkeeping (calray.ray.trial)
    extra: dict = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        rt = self.config["runtime"]
        return Path(rt["output_dir"]) / rt["run_name"]


def finished_summary(run: FixedRun) -> dict | None:
    """The summary of an identical, finished run (reused instead of training again)."""
    summary_path, cfg_path = run.run_dir / SUMMARY_FILE, run.run_dir / CONFIG_FILE
    if not (summary_path.is_file() and cfg_path.is_file()):
        return None
    try:
        if read_yaml(cfg_path) != config_from_dict(run.config).to_dict():
            return None
        return json.loads(summary_path.read_text())
    except (CalrayError, OSError, json.JSONDecodeError):
        return None


def refuse_foreign_dirs(runs: Sequence[FixedRun]) -> None:
    """A run directory left by a different config is refused (one error naming it) before Ray starts."""
    for run in runs:
        if run.config["runtime"]["resume"]:
            check_resumable(run.run_dir, config_from_dict(run.config).to_dict())


def reuse_actors(runs: Sequence[FixedRun]) -> bool:
    """Runs share worker processes (no torch import and actor start per run; datasets cached,
    calray.ray.splits) when every run trains in-process: a multi-worker run's thread sits in
    TorchTrainer.fit and cannot be reset (calray.sweep.experiment's `ray.reuse_actors` rule)."""
    return all(int(r.config.get("distributed", {}).get("workers", 1)) == 1 for r in runs)


def run_batch(runs: Sequence[FixedRun], storage: Path, name: str, resources: dict, *, address: str | None = None,
              max_concurrent: int | None = None, max_failures: int = 0, quiet: bool = False, reuse: bool = True,
              callbacks: Sequence = (), tag: str = "batch", title: str | None = None) -> dict[int, str]:
    """Run `runs` as Ray Tune trials (Ray started here unless it already is); returns {index: error}
    for the runs that failed. `tag` is the trials' sweep label (calray.ray.trial), `title` their
    progress lines' (default: the tag); `reuse`: let the runs share worker processes (`reuse_actors`)."""
    import ray
    from ray import tune

    started = init_ray(address, key="--address", log_to_driver=True)
    try:
        configs = [{"run": r.config, "run_dir": str(r.run_dir), "cell": r.cell, "sweep": tag} for r in runs]
        progress = RetrainProgress([r.label for r in runs], [str(r.run_dir) for r in runs], title=title or tag, quiet=quiet)

        def trainable(config: dict) -> None:  # fixed configs: Tune's grid over their indices
            return run_trial(configs[config["index"]])

        storage = Path(storage).resolve()
        storage.mkdir(parents=True, exist_ok=True)
        tuner = tune.Tuner(
            tune.with_resources(trainable, {k: v for k, v in resources.items() if v}),
            param_space={"index": tune.grid_search(list(range(len(runs))))},
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=reuse and reuse_actors(runs)),
            run_config=tune.RunConfig(name=f"{name}_{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(storage),
                                      verbose=0, callbacks=[tune_callback(progress), *callbacks],
                                      failure_config=tune.FailureConfig(max_failures=max_failures)),
        )
        errors: dict[int, str] = {}
        for result in tuner.fit():
            idx = (result.config or {}).get("index")
            if idx is not None and result.error is not None:
                errors[int(idx)] = f"{type(result.error).__name__}: {result.error}".splitlines()[0][:500]
        return errors
    finally:
        if started:
            ray.shutdown()
