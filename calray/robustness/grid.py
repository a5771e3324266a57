"""The robustness grid: a trained model (or a sweep's best model per cell) under every noise
kind × ε, in the paper's two protocols.

- ``test`` (paper Table II, generalisation): the checkpoint is evaluated on the test split rebuilt
  with each noise setting (``noise.mode: test``), once per noise seed. One model is loaded per
  target and reused for the whole grid; ε = 0 is the clean test set (no noise), so those rows
  equal the checkpoint's plain test accuracy.
- ``train+test`` (paper Table III, learning under noise): the target's config (a sweep's
  ``best/<cell>.yaml``) is retrained under each noise setting (``noise.mode: train+test``) with
  several training seeds, as Ray Tune trials (``tune.grid_search`` over the list of configs, the
  default searcher), and evaluated on the test split under the same noise. ε = 0 is one clean
  retrain per seed, shared by every kind. Retrains whose run directory already holds a
  ``summary.json`` for the identical config are reused, so an interrupted grid continues.

Replicate seeds follow QMF's protocol: noise seeds are separate from training seeds. In
``test`` mode the row's ``seed`` is the noise seed; in ``train+test`` mode it is the training
seed, and replicate i uses noise seed ``noise_seeds[i % len(noise_seeds)]``.

Outputs, in the sweep or run directory: ``robustness.csv`` / ``robustness.parquet`` (one row
per target × kind × ε × mode × seed) and ``robustness_summary.csv`` / ``.parquet`` (mean ± std
and n per target × kind × ε × mode), plus ``robustness_grid.json`` (the grid that was run).
Rows already in those files for (cell, mode) pairs this call does not recompute are kept.

`python -m calray.robustness PATH [--kinds ...] [--eps ...] [--modes ...] [--quiet] ...`; PATH is a
sweep directory (cells.json + best/<cell>.yaml + each cell's best run), a run directory
(config.yaml + checkpoints/best.pt) or a checkpoint file inside a run directory. Ray Tune's status
tables are off; the retrains print one progress line each as they end (none with ``--quiet``).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import sys
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from calray.config import (RunConfig, absolute_paths, config_from_dict, load_config, read_yaml,
                           validation_error_message)
from calray.data.base import build_datasets
from calray.engine.checkpoint import load_checkpoint
from calray.engine.evaluate import evaluate
from calray.engine.loaders import make_loader
from calray.engine.resume import check_resumable
from calray.engine.runinfo import seed_everything
from calray.engine.trainer import resolve_device
from calray.errors import CalrayError, ConfigError
from calray.io import (BEST_CHECKPOINT, BEST_DIR, CELLS_FILE, CHECKPOINTS_DIR, CONFIG_FILE, ROBUSTNESS_CSV,
                       ROBUSTNESS_DIR, ROBUSTNESS_GRID_FILE, ROBUSTNESS_PARQUET, ROBUSTNESS_SUMMARY_CSV,
                       ROBUSTNESS_SUMMARY_PARQUET, RUNS_DIR, SUMMARY_FILE, atomic_write_bytes, write_json)
from calray.models import build_model
from calray.ray.progress import RetrainProgress, tune_callback
from calray.ray.session import init_ray
from calray.ray.trial import run_trial

KINDS = ("gaussian", "salt_pepper")
MODES = ("test", "train+test")
ROW_COLUMNS = ["dataset", "strategy", "cell", "kind", "eps", "mode", "seed", "acc", "macro_f1", "n", "loss",
               "train_seed", "noise_seed", "status", "error", "source"]
GROUP_COLUMNS = ["dataset", "strategy", "cell", "kind", "eps", "mode"]
TUNE_DIR = "tune"  # in ROBUSTNESS_DIR: Ray Tune's state of the train+test retrains


class RowStatus(str, Enum):
    """A robustness row's status (a `str`: the tables hold the plain names)."""

    OK = "ok"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


# ---------------------------------------------------------------- the grid spec


class GridSpec(BaseModel):
    """What to run; also the shape of a sweep file's ``robustness:`` block."""

    model_config = ConfigDict(extra="forbid")

    kinds: list[Literal["gaussian", "salt_pepper"]] = Field(default_factory=lambda: list(KINDS))
    eps: list[Annotated[float, Field(ge=0.0, allow_inf_nan=False)]] = Field(default_factory=lambda: [0.0, 5.0, 10.0])
    modes: list[Literal["test", "train+test"]] = Field(default_factory=lambda: ["test"])
    noise_seeds: int | list[int] = 3  # N → seeds 0..N-1, or an explicit list
    train_seeds: int | list[int] = 1  # train+test replicates (training seeds)
    cells: list[str] | None = None  # glob patterns of sweep cells to include (default: every cell)
    epochs: int | None = Field(None, ge=1)  # train+test: override optim.epochs of the retrains
    cpus_per_trial: float = Field(1.0, gt=0.0)  # train+test: Ray resources of one retrain
    gpus_per_trial: float = Field(0.0, ge=0.0)
    max_concurrent_trials: int | None = Field(None, ge=1)

    @field_validator("kinds", "modes", "eps")
    @classmethod
    def _non_empty_unique(cls, v: list) -> list:
        if not v:
            raise ValueError("must list at least one value")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate values in {v}")
        return v

    @field_validator("noise_seeds", "train_seeds")
    @classmethod
    def _seeds(cls, v):
        if isinstance(v, int):
            if v < 1:
                raise ValueError("a seed count must be >= 1")
            return v
        if not v:
            raise ValueError("must list at least one seed")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate seeds in {v}")
        for i, seed in enumerate(v):
            if seed < 0:
                raise ValueError(f"seed {seed} (item {i}) must be >= 0")
        return v

    @staticmethod
    def _seed_list(v: int | list[int]) -> list[int]:
        return list(range(v)) if isinstance(v, int) else list(v)

    @property
    def noise_seed_list(self) -> list[int]:
        return self._seed_list(self.noise_seeds)

    @property
    def train_seed_list(self) -> list[int]:
        return self._seed_list(self.train_seeds)


def parse_grid(grid: dict | GridSpec | None, source: str = "robustness grid", prefix: str = "") -> GridSpec:
    """Validate a grid dict; a problem raises one ConfigError naming the source and key (``eps.1``)."""
    if isinstance(grid, GridSpec):
        return grid
    if grid is None:
        grid = {}
    if not isinstance(grid, dict):
        raise ConfigError(f"{source}: {prefix or '<root>'}: must be a mapping, got {type(grid).__name__}")
    try:
        return GridSpec.model_validate(grid)
    except ValidationError as e:
        raise ConfigError(validation_error_message(e, source, prefix=prefix)) from None


# ---------------------------------------------------------------- what to evaluate


@dataclass
class Target:
    cell: str
    config: RunConfig  # the config the checkpoint was trained with (test mode)
    retrain_config: RunConfig  # the config retrained in train+test mode
    checkpoint: Path | None
    run_dir: Path | None

    @property
    def dataset(self) -> str:
        return self.config.data.dataset

    @property
    def strategy(self) -> str:
        return self.config.method.strategy


def _load_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CalrayError(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from None


def _resolve(base: Path, p: str | None) -> Path | None:
    if not p:
        return None
    path = Path(p)
    if path.is_absolute():
        return path
    for candidate in (base / path, Path.cwd() / path):
        if candidate.exists():
            return candidate
    return base / path


def _run_config(run_dir: Path) -> RunConfig:
    return load_config(run_dir / CONFIG_FILE)


def _run_target(run_dir: Path, checkpoint: Path | None = None) -> Target:
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise CalrayError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = _run_config(run_dir)
    ckpt = checkpoint or run_dir / CHECKPOINTS_DIR / BEST_CHECKPOINT
    return Target(cell=run_dir.name, config=cfg, retrain_config=cfg,
                  checkpoint=ckpt if ckpt.is_file() else None, run_dir=run_dir)


def read_cells(sweep_dir: Path) -> list[dict]:
    path = sweep_dir / CELLS_FILE
    cells = _load_json(path, "the sweep's cell list")
    if not isinstance(cells, list) or not all(isinstance(c, dict) and "cell" in c for c in cells):
        raise CalrayError(f"{path}: expected a list of cell records, each with a 'cell' key")
    return cells


def resolve_targets(path: Path, cell_patterns: list[str] | None = None) -> tuple[Path, str, list[Target]]:
    """(output directory, kind 'sweep'|'run', targets) for a sweep dir, run dir or checkpoint file."""
    path = Path(path)
    if not path.exists():
        raise CalrayError(f"{path}: no such sweep directory, run directory or checkpoint")
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == CHECKPOINTS_DIR else path.parent
        return run_dir, "run", [_run_target(run_dir, checkpoint=path)]
    if (path / CELLS_FILE).is_file():
        targets = []
        for rec in read_cells(path):
            cell = str(rec["cell"])
            if cell_patterns and not any(fnmatch.fnmatchcase(cell, p) for p in cell_patterns):
                continue
            run_dir = _resolve(path, rec.get("best_run_dir"))
            best_yaml = _resolve(path, rec.get("best_config") or f"{BEST_DIR}/{cell}.yaml")
            if run_dir is None or not (run_dir / CONFIG_FILE).is_file():
                _say(f"cell {cell}: no best run to evaluate (status {rec.get('status')!r}); skipped")
                continue
            t = _run_target(run_dir)
            t.cell = cell
            if best_yaml is not None and best_yaml.is_file():
                t.retrain_config = load_config(best_yaml)
            targets.append(t)
        if not targets:
            which = f" matching {cell_patterns}" if cell_patterns else ""
            raise CalrayError(f"{path}: no cell{which} with a finished best run in cells.json")
        return path, "sweep", targets
    if (path / CONFIG_FILE).is_file():
        return path, "run", [_run_target(path)]
    raise CalrayError(f"{path}: not a sweep directory (no cells.json) nor a run directory (no config.yaml)")


# ---------------------------------------------------------------- helpers


def _say(msg: str) -> None:
    print(f"[robustness] {msg}", flush=True)


def _with_noise(cfg: RunConfig, kind: str, eps: float, mode: str, seed: int) -> RunConfig:
    tree = cfg.to_dict()
    noise = dict(tree.get("noise") or {})
    if eps == 0:
        noise.update(kind="none", eps=0.0, mode=mode, seed=seed)
    else:
        noise.update(kind=kind, eps=float(eps), mode=mode, seed=seed)
    tree["noise"] = noise
    return config_from_dict(tree, f"{cfg.name} with noise {kind} eps={eps:g}")


def _eps_tag(eps: float) -> str:
    return f"{eps:g}".replace(".", "p")


def _row(target: Target, kind: str, eps: float, mode: str, seed: int, metrics: dict | None, *,
         train_seed: int | None, noise_seed: int | None, source: str, error: str | None = None) -> dict:
    row = {"dataset": target.dataset, "strategy": target.strategy, "cell": target.cell, "kind": kind,
           "eps": float(eps), "mode": mode, "seed": int(seed),
           "acc": math.nan, "macro_f1": math.nan, "n": math.nan, "loss": math.nan,
           "train_seed": train_seed, "noise_seed": noise_seed,
           "status": RowStatus.OK if error is None else RowStatus.FAILED, "error": error, "source": source}
    if metrics:
        row.update(acc=metrics["acc"], macro_f1=metrics["macro_f1"], n=metrics.get("n", math.nan),
                   loss=metrics.get("loss", math.nan))
        row.update({k: v for k, v in metrics.items() if k.startswith("acc_")})
    return row


# ---------------------------------------------------------------- test mode (Table II)


class CheckpointEvaluator:
    """A checkpoint's model, loaded once, evaluated on test sets as the trainer's test pass does
    (`calray.engine.evaluate.evaluate` over an evaluation loader: every sample once, in order).

    `cfg` is the config the checkpoint was trained with; its splits give the model's shape. The
    seeds are set as the trainer sets them before building the datasets and the model.
    """

    def __init__(self, cfg: RunConfig, checkpoint: Path):
        self.cfg = cfg
        self.device = resolve_device(cfg.runtime.device)
        self.cuda = self.device.type == "cuda"
        self.amp = self.cuda and cfg.runtime.amp
        self.channels_last = self.cuda and cfg.runtime.channels_last
        seed_everything(cfg.runtime.seed)
        self.splits = build_datasets(cfg)
        torch.manual_seed(cfg.runtime.seed)
        model = build_model(cfg, self.splits).to(self.device)
        self.model = model.to(memory_format=torch.channels_last) if self.channels_last else model
        self.state = load_checkpoint(checkpoint, map_location=self.device)
        self.model.load_state_dict(self.state["model"])

    def evaluate(self, dataset) -> dict:
        """acc, macro_f1, loss, n and acc_<modality> over `dataset`."""
        loader = make_loader(dataset, self.cfg.data, train=False, seed=self.cfg.runtime.seed, pin_memory=self.cuda)
        return evaluate(self.model, loader, self.splits.modalities, self.splits.num_classes, self.device,
                        self.amp, self.channels_last)


def evaluate_test_grid(target: Target, spec: GridSpec) -> list[dict]:
    """Load the checkpoint once; evaluate it on the test split under every (kind, ε, noise seed)."""
    if target.checkpoint is None:
        raise CalrayError(f"{target.run_dir}: no checkpoint to evaluate "
                          f"(expected {CHECKPOINTS_DIR}/{BEST_CHECKPOINT})")
    base = target.config.model_copy(deep=True)
    base.runtime.progress = False
    evaluator = CheckpointEvaluator(_with_noise(base, "none", 0.0, "test", base.noise.seed), target.checkpoint)
    t0 = time.time()
    clean = evaluator.evaluate(evaluator.splits.test)
    _say(f"{target.cell}: test clean acc {clean['acc']:.4f} macro-F1 {clean['macro_f1']:.4f} "
         f"(checkpoint {target.checkpoint}, epoch {evaluator.state.get('epoch')})")
    rows = []
    settings = [(k, e, s) for k in spec.kinds for e in spec.eps for s in spec.noise_seed_list]
    for done, (kind, eps, seed) in enumerate(settings, 1):
        if eps == 0:
            metrics = clean
        else:
            metrics = evaluator.evaluate(build_datasets(_with_noise(base, kind, eps, "test", seed)).test)
            _say(f"{target.cell}: test {kind} eps={eps:g} noise seed {seed}: acc {metrics['acc']:.4f} "
                 f"macro-F1 {metrics['macro_f1']:.4f} [{done}/{len(settings)}]")
        rows.append(_row(target, kind, eps, "test", seed, metrics, train_seed=target.config.runtime.seed,
                         noise_seed=None if eps == 0 else seed, source=str(target.checkpoint)))
    del evaluator
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    _say(f"{target.cell}: test grid done in {time.time() - t0:.1f}s")
    return rows


# ---------------------------------------------------------------- train+test mode (Table III)


@dataclass
class Retrain:
    target: Target
    kind: str  # 'none' for the clean (ε = 0) retrain
    eps: float
    train_seed: int
    noise_seed: int
    config: dict  # complete run config (absolute paths)

    @property
    def run_dir(self) -> Path:
        rt = self.config["runtime"]
        return Path(rt["output_dir"]) / rt["run_name"]


def plan_retrains(target: Target, spec: GridSpec, out_dir: Path) -> list[Retrain]:
    plans = []
    noise_seeds = spec.noise_seed_list
    settings: list[tuple[str, float]] = []
    if any(e == 0 for e in spec.eps):
        settings.append(("none", 0.0))
    settings += [(k, e) for k in spec.kinds for e in spec.eps if e != 0]
    for kind, eps in settings:
        for i, tseed in enumerate(spec.train_seed_list):
            nseed = noise_seeds[i % len(noise_seeds)]
            cfg = _with_noise(target.retrain_config, kind, eps, "train+test", nseed)
            tree = cfg.to_dict()
            tree["runtime"].update(seed=tseed, progress=False, resume=True,
                                   output_dir=str((out_dir / ROBUSTNESS_DIR / RUNS_DIR / target.cell).resolve()),
                                   run_name=f"{kind}_eps{_eps_tag(eps)}_seed{tseed}")
            if spec.epochs is not None:
                tree["optim"]["epochs"] = spec.epochs
            tree = absolute_paths(tree)  # Ray trials may run in another working directory
            config_from_dict(tree, f"retrain config for {target.cell}")  # validate before Ray sees it
            plans.append(Retrain(target, kind, eps, tseed, nseed, tree))
    return plans


def _finished_summary(plan: Retrain) -> dict | None:
    """The summary of an identical, finished retrain (reused instead of training again)."""
    run_dir = plan.run_dir
    summary_path, cfg_path = run_dir / SUMMARY_FILE, run_dir / CONFIG_FILE
    if not (summary_path.is_file() and cfg_path.is_file()):
        return None
    try:
        if read_yaml(cfg_path) != config_from_dict(plan.config).to_dict():
            return None
        return json.loads(summary_path.read_text())
    except (CalrayError, OSError, json.JSONDecodeError):
        return None


def _trial_config(plan: "Retrain") -> dict:
    """The calray.ray.trial.run_trial config of one retrain: the complete run config and its run dir."""
    return {"run": plan.config, "run_dir": str(plan.run_dir), "cell": plan.target.cell, "sweep": "robustness"}


def _retrain_label(plan: Retrain) -> str:
    return f"{plan.target.cell} {plan.kind} eps={plan.eps:g} train seed {plan.train_seed}"


def _run_tune(plans: list[Retrain], out_dir: Path, spec: GridSpec, address: str | None,
              quiet: bool = False) -> dict[int, str]:
    """Run the retrains as Ray Tune trials; returns {plan index: error message} for failed trials.

    Tune's own status tables are off (``verbose=0``); the driver prints one line per retrain as it
    ends (`calray.ray.progress.RetrainProgress`, the sweep's progress line), none when `quiet`.
    """
    import ray
    from ray import tune

    started = init_ray(address, key="--address", log_to_driver=True)
    try:
        configs = [_trial_config(p) for p in plans]
        progress = RetrainProgress([_retrain_label(p) for p in plans], [str(p.run_dir) for p in plans],
                                   quiet=quiet)

        def trainable(config: dict) -> None:  # fixed configs: Tune's grid over their indices
            return run_trial(configs[config["index"]])

        resources = {"cpu": spec.cpus_per_trial}
        if spec.gpus_per_trial:
            resources["gpu"] = spec.gpus_per_trial
        storage = (out_dir / ROBUSTNESS_DIR / TUNE_DIR).resolve()
        storage.mkdir(parents=True, exist_ok=True)
        name = f"train_test_{time.strftime('%Y%m%d-%H%M%S')}"
        tuner = tune.Tuner(
            tune.with_resources(trainable, resources),
            param_space={"index": tune.grid_search(list(range(len(plans))))},
            tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent_trials),
            run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0, callbacks=[tune_callback(progress)],
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        grid = tuner.fit()
        errors: dict[int, str] = {}
        for result in grid:
            idx = (result.config or {}).get("index")
            if idx is not None and result.error is not None:
                errors[int(idx)] = f"{type(result.error).__name__}: {result.error}".splitlines()[0][:500]
        return errors
    finally:
        if started:
            ray.shutdown()


def evaluate_train_test_grid(targets: list[Target], spec: GridSpec, out_dir: Path,
                             address: str | None = None, quiet: bool = False) -> list[dict]:
    plans = [p for t in targets for p in plan_retrains(t, spec, out_dir)]
    todo = [p for p in plans if _finished_summary(p) is None]
    for plan in todo:  # a retrain dir left by a different config is refused before Ray starts
        if plan.config["runtime"]["resume"]:
            check_resumable(plan.run_dir, config_from_dict(plan.config).to_dict())
    _say(f"train+test: {len(plans)} retrains ({len(plans) - len(todo)} already finished, reused); "
         f"{len(todo)} to run as Ray Tune trials")
    errors: dict[int, str] = {}
    if todo:
        t0 = time.time()
        errors = _run_tune(todo, out_dir, spec, address, quiet=quiet)
        _say(f"train+test: Ray Tune finished {len(todo)} trials in {time.time() - t0:.1f}s "
             f"({len(errors)} failed)")
    failed = {id(todo[i]): msg for i, msg in errors.items()}
    rows = []
    for plan in plans:
        summary = _finished_summary(plan)
        err = failed.get(id(plan))
        if summary is None and err is None:
            err = f"no summary.json in {plan.run_dir} after the trial"
        metrics = summary.get("test") if summary else None
        kinds = spec.kinds if plan.kind == "none" else [plan.kind]
        for kind in kinds:  # the clean retrain is the ε = 0 row of every kind
            rows.append(_row(plan.target, kind, plan.eps, "train+test", plan.train_seed, metrics,
                             train_seed=plan.train_seed, noise_seed=None if plan.eps == 0 else plan.noise_seed,
                             source=str(plan.run_dir), error=None if metrics else err))
        if metrics:
            if not quiet:  # the summary table below has every number; failures are always shown
                _say(f"{plan.target.cell}: train+test {plan.kind} eps={plan.eps:g} train seed {plan.train_seed}: "
                     f"acc {metrics['acc']:.4f} macro-F1 {metrics['macro_f1']:.4f}")
        else:
            _say(f"{plan.target.cell}: train+test {plan.kind} eps={plan.eps:g} train seed {plan.train_seed}: "
                 f"FAILED ({err})")
    return rows


# ---------------------------------------------------------------- tables


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """mean ± std (sample std, ddof 1; NaN when n = 1) and n per target × kind × ε × mode."""
    cols = GROUP_COLUMNS + ["acc_mean", "acc_std", "macro_f1_mean", "macro_f1_std", "n", "n_failed"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    ok = df[df["status"] == RowStatus.OK]
    g = ok.groupby(GROUP_COLUMNS, sort=False, dropna=False)
    out = g.agg(acc_mean=("acc", "mean"), acc_std=("acc", "std"), macro_f1_mean=("macro_f1", "mean"),
                macro_f1_std=("macro_f1", "std"), n=("acc", "size")).reset_index()
    failed = (df[df["status"] != RowStatus.OK].groupby(GROUP_COLUMNS, sort=False, dropna=False).size()
              .rename("n_failed").reset_index())
    out = out.merge(failed, on=GROUP_COLUMNS, how="outer")
    out["n"] = out["n"].fillna(0).astype(int)
    out["n_failed"] = out["n_failed"].fillna(0).astype(int)
    return out[cols].sort_values(["cell", "mode", "kind", "eps"], kind="stable").reset_index(drop=True)


def _tidy(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=ROW_COLUMNS)
    extra = sorted(c for c in df.columns if c not in ROW_COLUMNS)
    df = df[[c for c in ROW_COLUMNS if c in df.columns] + extra]
    for c in ("train_seed", "noise_seed", "n"):
        df[c] = pd.array(df[c], dtype="Int64") if df[c].notna().any() else pd.array([None] * len(df), "Int64")
    return df


def read_robustness(directory: Path) -> pd.DataFrame | None:
    """The raw robustness rows saved in `directory`, or None when there are none."""
    directory = Path(directory)
    pq, csv = directory / ROBUSTNESS_PARQUET, directory / ROBUSTNESS_CSV
    try:
        if pq.is_file():
            return pd.read_parquet(pq)
        if csv.is_file():
            return pd.read_csv(csv)
    except Exception as e:  # pyarrow / parser errors on a truncated file
        bad = pq if pq.is_file() else csv
        raise CalrayError(f"{bad}: cannot read the robustness table ({type(e).__name__}: {e})") from None
    return None


def save_tables(df: pd.DataFrame, out_dir: Path, spec: GridSpec) -> pd.DataFrame:
    old = read_robustness(out_dir)
    if old is not None and not old.empty and not df.empty:
        redone = set(zip(df["cell"], df["mode"]))
        keep = old[[(c, m) not in redone for c, m in zip(old["cell"], old["mode"])]]
        if not keep.empty:
            df = _tidy(pd.concat([keep, df], ignore_index=True).to_dict("records"))
    summary = summarize(df)
    atomic_write_bytes(out_dir / ROBUSTNESS_CSV, lambda f: f.write(df.to_csv(index=False).encode()))
    atomic_write_bytes(out_dir / ROBUSTNESS_PARQUET, lambda f: df.to_parquet(f, index=False))
    atomic_write_bytes(out_dir / ROBUSTNESS_SUMMARY_CSV, lambda f: f.write(summary.to_csv(index=False).encode()))
    atomic_write_bytes(out_dir / ROBUSTNESS_SUMMARY_PARQUET, lambda f: summary.to_parquet(f, index=False))
    write_json(out_dir / ROBUSTNESS_GRID_FILE, {"grid": spec.model_dump(mode="json"),
                                                   "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                   "rows": len(df)})
    return df


def format_summary(summary: pd.DataFrame) -> str:
    lines = []
    for _, r in summary.iterrows():
        std = "" if pd.isna(r["acc_std"]) else f" ± {r['acc_std']:.4f}"
        fail = f", {r['n_failed']} failed" if r["n_failed"] else ""
        mean = "   n/a" if pd.isna(r["acc_mean"]) else f"{r['acc_mean']:.4f}"
        lines.append(f"  {r['cell']:<24} {r['mode']:<10} {r['kind']:<11} eps={r['eps']:<5g} "
                     f"acc {mean}{std} (n={r['n']}{fail})")
    return "\n".join(lines)


# ---------------------------------------------------------------- entry points


def run_grid(sweep_dir: Path, grid: dict | GridSpec | None = None, address: str | None = None,
             quiet: bool = False) -> pd.DataFrame:
    """Run the robustness grid on a sweep dir, run dir or checkpoint; save and return the raw rows.

    `grid` = {kinds, eps, modes, noise_seeds, train_seeds, ...} (see GridSpec); `address` is the
    Ray cluster for the train+test retrains (None: a local Ray instance, or the one already
    initialised in this process). `quiet`: no line per train+test retrain (neither as it ends nor
    its result; failures are still printed), only the summary.
    """
    spec = parse_grid(grid)
    out_dir, kind, targets = resolve_targets(Path(sweep_dir), spec.cells)
    _say(f"{kind} {out_dir}: {len(targets)} target(s) [{', '.join(t.cell for t in targets)}]; "
         f"kinds {spec.kinds}, eps {spec.eps}, modes {spec.modes}, noise seeds {spec.noise_seed_list}, "
         f"train seeds {spec.train_seed_list}")
    rows: list[dict] = []
    if "test" in spec.modes:
        for i, target in enumerate(targets, 1):
            _say(f"test mode: target {i}/{len(targets)} {target.cell}")
            rows += evaluate_test_grid(target, spec)
    if "train+test" in spec.modes:
        rows += evaluate_train_test_grid(targets, spec, out_dir, address, quiet=quiet)
    df = save_tables(_tidy(rows), out_dir, spec)
    summary = summarize(df)
    _say(f"wrote {out_dir / ROBUSTNESS_CSV}, {ROBUSTNESS_PARQUET}, {ROBUSTNESS_SUMMARY_CSV} ({len(df)} rows)")
    print(format_summary(summary), flush=True)
    return df


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m calray.robustness",
        description="Evaluate a sweep's best models (or one run) over a noise grid: test-only (Table II) "
                    "and train+test retraining (Table III).")
    p.add_argument("path", help="sweep directory, run directory or checkpoint file")
    p.add_argument("--grid", help="YAML file with the grid (keys as below); flags override it")
    p.add_argument("--kinds", nargs="+", choices=KINDS, help="noise kinds (default: gaussian salt_pepper)")
    p.add_argument("--eps", nargs="+", type=float, help="noise levels ε; 0 = clean (default: 0 5 10)")
    p.add_argument("--modes", nargs="+", choices=MODES, help="attack modes (default: test)")
    p.add_argument("--noise-seeds", type=int, nargs="+", help="a count N (seeds 0..N-1) or several seeds")
    p.add_argument("--train-seeds", type=int, nargs="+", help="train+test replicates: a count or seeds")
    p.add_argument("--cells", nargs="+", help="only cells matching these glob patterns")
    p.add_argument("--epochs", type=int, help="train+test: override optim.epochs of the retrains")
    p.add_argument("--cpus-per-trial", type=float, help="train+test: CPUs per retrain trial")
    p.add_argument("--gpus-per-trial", type=float, help="train+test: GPUs per retrain trial")
    p.add_argument("--max-concurrent-trials", type=int)
    p.add_argument("--address", default=None, help="Ray cluster for train+test: 'auto' or host:port")
    p.add_argument("--quiet", action="store_true",
                   help="train+test: no line per retrain trial (failures are still shown), only the summary")
    return p.parse_args(argv)


def _seed_arg(v: list[int] | None):
    if v is None:
        return None
    return v[0] if len(v) == 1 else v


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        grid: dict = read_yaml(args.grid) if args.grid else {}
        flags = {"kinds": args.kinds, "eps": args.eps, "modes": args.modes,
                 "noise_seeds": _seed_arg(args.noise_seeds), "train_seeds": _seed_arg(args.train_seeds),
                 "cells": args.cells, "epochs": args.epochs, "cpus_per_trial": args.cpus_per_trial,
                 "gpus_per_trial": args.gpus_per_trial, "max_concurrent_trials": args.max_concurrent_trials}
        grid.update({k: v for k, v in flags.items() if v is not None})
        spec = parse_grid(grid, source=args.grid or "command line")
        run_grid(Path(args.path), spec, address=args.address, quiet=args.quiet)
    except CalrayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
