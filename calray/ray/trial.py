"""`run_trial(config)`: the Ray Tune function trainable that runs one calray training run.

The sweep (calray.sweep.runner) and the robustness layer (calray.robustness.grid) launch it through Ray
Tune. Its `config` is a plain dict:

    run          (required) a complete run-config dict (RunConfig.to_dict() shape)
    overrides    (optional) fixed dotted overrides {"noise.eps": 5, ...}, applied first
    "<a.b.c>"    every other top-level key containing a dot is a sampled search parameter,
                 applied as a dotted override after `overrides` (e.g. "method.T": 3.2)
    run_dir      (optional) where the run writes; default `runs_root/<trial_id>`
    runs_root    (optional) parent of the per-trial run dirs; default `<runtime.output_dir>/<name>`
    cell, sweep  (optional) labels copied into trial.json

What it reports to Tune (`ray.tune.report`), all numeric:

* once per epoch: the epoch's metrics row (epoch, train_loss, val_acc, val_acc_<m>, W_<m>,
  a_<m>, beta_<m>, ...), plus `epochs_done` (= epoch + 1, the ASHA time attribute — it stays
  right when a restarted trial resumes from its last.pt) and `final = 0`;
* once more at the end (not for trials a scheduler stopped): the row of the *best validation
  epoch* — the checkpoint the run keeps and tests — with the run summary (`test_acc`,
  `test_macro_f1`, `test_acc_<m>`, `best_val_acc`, `best_epoch`, `epochs_run`, `seed`) and
  `final = 1`, `epochs_done` = epochs run. So the searcher's value for a finished trial (Optuna
  takes the last result) is the validation accuracy of the checkpoint the run keeps, and
  `epochs_done` never goes backwards, so ASHA counts no extra rung. `run_dir` is a string in
  every report. Per-epoch tables must skip rows with `final == 1`.

The run dir holds what `calray.engine.trainer` writes (config.yaml — the resolved config —, env.json
with library versions and seeds, metrics.jsonl, summary.json, checkpoints/) plus trial.json
(trial id, params, seed, versions) and, for a failed trial, error.txt (one line). The in-process
trainer's console output goes to train.log there instead of the Ray driver's console.

One worker (`distributed.workers == 1`): the loop runs in this process. More workers: a Ray
Train `TorchTrainer` from `calray.ray.distributed.build_torch_trainer`, whose rank-0 reports reach
Tune through `TuneReportCallback` (Tune(trainer) is unsupported in Ray 2.60).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Callable

from calray.config import RunConfig, apply_overrides, config_from_dict
from calray.engine.runinfo import library_versions
from calray.engine.trainer import RunContext, train
from calray.errors import ConfigError
from calray.io import CONFIG_FILE, ERROR_FILE, METRICS_FILE, SUMMARY_FILE, TRAIN_LOG, TRIAL_FILE, read_jsonl, write_json
from calray.ray.distributed import build_torch_trainer
from calray.ray.splits import WORKER_SPLITS, SplitsCache

RESERVED_KEYS = ("run", "overrides", "run_dir", "runs_root", "cell", "sweep")
TIME_ATTR = "epochs_done"  # the per-epoch time attribute schedulers should use
FINAL_KEY = "final"


class TrialStatus(str, Enum):
    """A trial's status in the sweep's manifest, trials table and progress lines. A `str`: the
    files hold the plain names, which are Ray Tune's `Trial.status` where Tune has one."""

    RUNNING = "RUNNING"
    TERMINATED = "TERMINATED"  # finished: its final report (FINAL_KEY == 1) arrived
    PRUNED = "PRUNED"  # ended without a final report and without an error: a scheduler stopped it
    ERROR = "ERROR"
    ABANDONED = "ABANDONED"  # left unfinished by a Ray experiment that could not be restored
    RETRIED = "RETRIED"  # failed, then run again with the same parameters as a new trial (--retry-failed)

    def __str__(self) -> str:
        return self.value

    @classmethod
    def of_ended(cls, last_result: dict | None) -> "TrialStatus":
        """TERMINATED or PRUNED: the status of a trial that ended without an error."""
        return cls.TERMINATED if (last_result or {}).get(FINAL_KEY) == 1 else cls.PRUNED


FINISHED = (TrialStatus.TERMINATED, TrialStatus.PRUNED, TrialStatus.ERROR)  # a trial that will not run again



# ---------------------------------------------------------------- config resolution


def sampled_params(config: dict) -> dict[str, Any]:
    """The sampled search parameters of a trial config: top-level dotted keys, sorted."""
    return {k: config[k] for k in sorted(config) if "." in k and k not in RESERVED_KEYS}


def resolve_run_config(config: dict, source: str = "trial config") -> RunConfig:
    """Build the RunConfig of a trial: `run` + `overrides` + sampled dotted params."""
    if not isinstance(config.get("run"), dict):
        raise ConfigError(f"{source}: run: missing — run_trial needs config['run'], a run-config dict")
    tree = apply_overrides(config["run"], config.get("overrides") or {})
    tree = apply_overrides(tree, sampled_params(config))
    cfg = config_from_dict(tree, source)
    runtime = cfg.runtime.model_copy(update={"progress": False})
    return cfg.model_copy(update={"runtime": runtime})


def trial_run_dir(config: dict, cfg: RunConfig, trial_id: str) -> Path:
    if config.get("run_dir"):
        return Path(config["run_dir"])
    root = Path(config["runs_root"]) if config.get("runs_root") else cfg.run_dir()
    return root / trial_id


# ---------------------------------------------------------------- helpers


def _scalar_metrics(row: dict) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if isinstance(v, bool):
            out[k] = int(v)
        elif isinstance(v, (int, float)):
            out[k] = v
    return out


def summary_metrics(summary: dict) -> dict[str, Any]:
    """The per-trial numbers of a run summary, flat: test_acc, test_<k>, best_val_acc, ..."""
    out = {"test_acc": summary.get("test_acc"), "best_val_acc": summary.get("best_val_acc"),
           "best_epoch": summary.get("best_epoch"), "epochs_run": summary.get("epochs_run"),
           "stopped_early": int(bool(summary.get("stopped_early")))}
    for k, v in (summary.get("test") or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"test_{k}"] = v
    return {k: v for k, v in out.items() if v is not None}


def final_report(rows: list[dict], summary: dict, run_dir: Path, seed: int) -> dict:
    """The last report of a finished trial: best-epoch row + summary (see module doc)."""
    best_epoch = summary.get("best_epoch")
    best = next((r for r in rows if r.get("epoch") == best_epoch), rows[-1] if rows else {})
    report = _scalar_metrics(best)
    report.update(summary_metrics(summary))
    report[TIME_ATTR] = int(summary.get("epochs_run") or (rows[-1]["epoch"] + 1 if rows else 0))
    report[FINAL_KEY] = 1
    report["seed"] = seed
    report["run_dir"] = str(run_dir)
    return report


def _write_trial_json(run_dir: Path, config: dict, cfg: RunConfig, trial_id: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / TRIAL_FILE, {
        "trial_id": trial_id, "sweep": config.get("sweep"), "cell": config.get("cell"),
        "params": sampled_params(config), "overrides": config.get("overrides") or {},
        "seed": cfg.runtime.seed, "seeds": {"runtime": cfg.runtime.seed, "data": cfg.data.seed,
                                            "noise": cfg.noise.seed},
        "workers": cfg.distributed.workers, "versions": library_versions()})


def _record_error(run_dir: Path, err: BaseException) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        msg = f"{type(err).__name__}: {err}".splitlines()[0] if str(err) else type(err).__name__
        (run_dir / ERROR_FILE).write_text(msg + "\n")
    except OSError:
        pass


# ---------------------------------------------------------------- the trainable


def _trial_id() -> str:
    from ray import tune

    try:
        return tune.get_context().get_trial_id() or "trial"
    except Exception:  # not inside a Tune session (direct call in tests)
        return "trial"


def run_trial(config: dict) -> None:
    """Ray Tune function trainable: one training run, reported every epoch (see module doc).

    The run's resolved config is copied into Tune's trial dir as `run_config.yaml`, so trackers
    that log a trial's Tune files as artifacts (MLflow, calray.sweep.tracking) carry it."""
    from ray import tune

    final = execute_trial(config, report=tune.report, trial_id=_trial_id(), splits=WORKER_SPLITS)
    trial_dir = tune.get_context().get_trial_dir()
    resolved = Path(final["run_dir"]) / CONFIG_FILE
    if trial_dir and resolved.is_file():
        try:  # bookkeeping for the trackers: it must never fail a trial that trained
            Path(trial_dir).mkdir(parents=True, exist_ok=True)  # a trial restarted on another node
            shutil.copyfile(resolved, Path(trial_dir) / "run_config.yaml")
        except OSError as e:
            print(f"warning: could not copy {resolved} into the trial dir {trial_dir}: {e}", file=sys.stderr)


def execute_trial(config: dict, report: Callable[[dict], None], trial_id: str = "trial",
                  splits: SplitsCache | None = None) -> dict:
    """The body of `run_trial` with the report function passed in (tests call it without Ray).

    `splits`: where an in-process trial takes its datasets from (default: built for this trial).
    Returns the final report (the best-epoch row + run summary).
    """
    cfg = resolve_run_config(config, source=f"trial {trial_id}")
    run_dir = trial_run_dir(config, cfg, trial_id)
    _write_trial_json(run_dir, config, cfg, trial_id)
    try:
        if cfg.distributed.workers > 1:
            summary, rows = _run_distributed(cfg, run_dir, report)
        else:
            summary, rows = _run_in_process(cfg, run_dir, report, splits or SplitsCache())
    except Exception as e:
        _record_error(run_dir, e)
        raise
    final = final_report(rows, summary, run_dir, cfg.runtime.seed)
    report(final)
    return final


def _epoch_report(row: dict, run_dir: Path) -> dict:
    report = _scalar_metrics(row)
    report[TIME_ATTR] = int(row["epoch"]) + 1
    report[FINAL_KEY] = 0
    report["run_dir"] = str(run_dir)
    return report


def _run_in_process(cfg: RunConfig, run_dir: Path, report, splits: SplitsCache) -> tuple[dict, list[dict]]:
    def reporter(row: dict, ckpt_path) -> None:
        report(_epoch_report(row, run_dir))

    run_dir.mkdir(parents=True, exist_ok=True)
    datasets, built_s = splits.lookup(cfg)
    with open(run_dir / TRAIN_LOG, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print(f"datasets: {'reused' if built_s is None else f'built in {built_s:.2f} s'} (worker pid {os.getpid()})")
        summary = train(cfg, RunContext(run_dir=run_dir, reporter=reporter), splits=datasets)
    return summary, read_jsonl(run_dir / METRICS_FILE)


def _run_distributed(cfg: RunConfig, run_dir: Path, report) -> tuple[dict, list[dict]]:
    """>1 workers: a TorchTrainer inside this trial; rank-0 reports reach Tune via a callback."""
    callback = _epoch_report_callback(run_dir)
    # Ray Train's run lives in <run_dir>/ray_train under a fixed name, so a trial that Tune
    # restarts (sweep --resume) continues from its latest Train checkpoint
    trainer = build_torch_trainer(cfg, run_dir=run_dir, run_config_callbacks=[callback])
    result = trainer.fit()  # raises when the run fails (after distributed.max_failures restarts)
    summary = getattr(result, "return_value", None)
    if not isinstance(summary, dict):
        path = run_dir / SUMMARY_FILE
        if not path.is_file():
            raise RuntimeError(f"distributed trial finished without {path}")
        summary = json.loads(path.read_text())
    return summary, read_jsonl(run_dir / METRICS_FILE)


def _epoch_report_callback(run_dir: Path):
    """TuneReportCallback that adds epochs_done/final/run_dir to rank 0's per-epoch metrics."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class _CalrayTuneReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and "epoch" in metrics[0]:
                metrics = [_epoch_report(metrics[0], run_dir)] + list(metrics[1:])
            super().after_report(run_context, metrics, checkpoint)

    return _CalrayTuneReportCallback()
