"""The robustness grid: a trained model (a sweep's best model per cell, or every final-seed model
of a sweep with a final stage) under every noise kind × attacked modalities × ε, in the paper's two
protocols.

- ``test`` (paper Table II, generalisation): the checkpoint is evaluated on the test split rebuilt
  with each noise setting (``noise.mode: test``), once per noise seed, as Ray tasks — one per
  (target, kind), `tasks` — or one after another in this process (``test_tasks: false``, `--serial`:
  the same rows). ε = 0 is the clean test set (no noise), so those rows equal the checkpoint's plain
  test accuracy. Kind ``missing``: a modality absent at test time (zero or training-mean input),
  rows at ε = 1 (absent) and ε = 0 (clean); test mode only.
- ``train+test`` (paper Table III, learning under noise): the target's config (a sweep's
  ``best/<cell>.yaml``; a final run's config.yaml) is retrained under each noise setting
  (``noise.mode: train+test``) with several training seeds (a final target: its own seed), as Ray
  Tune trials (``tune.grid_search`` over the list of configs, the default searcher), and evaluated
  on the test split under the same noise. ε = 0 is one clean retrain per seed, shared by every kind.
  Retrains whose run directory already holds a ``summary.json`` for the identical config are
  reused, so an interrupted grid continues.
- ``attacked``: ``all`` = the dataset's default attacked modalities; a modality name = only that one
  (``noise.modalities``); a row per choice (for ``missing``, ``all`` = each modality in turn).

Replicate seeds follow QMF's protocol: noise seeds are separate from training seeds. In
``test`` mode the row's ``seed`` is the noise seed; in ``train+test`` mode it is the training
seed, and replicate i uses noise seed ``noise_seeds[i % len(noise_seeds)]``. With final.csv in the
sweep dir every ok final run is a target and rows carry its ``final_seed`` (n = final seeds × noise
seeds per group); without it, ``final_seed`` is empty.

Outputs, in the sweep or run directory: ``robustness.csv`` / ``robustness.parquet`` (one row
per target × kind × attacked × ε × mode × seed) and ``robustness_summary.csv`` / ``.parquet``
(mean ± std and n per cell × kind × attacked × ε × mode), plus ``robustness_grid.json`` (the grid
that was run). Rows already in those files for (cell, mode) pairs this call does not recompute are
kept.

`python -m calray.robustness PATH [--kinds ...] [--eps ...] [--attacked ...] [--modes ...] [--quiet]
...`; PATH is a sweep directory (cells.json + best/<cell>.yaml + each cell's best run; or final.csv
+ the final runs), a run directory (config.yaml + checkpoints/best.pt) or a checkpoint file inside
a run directory. Ray Tune's status tables are off; the test tasks print one progress line each as
they finish, the retrains one each as they end (with ``--quiet`` only the task lines).

This module runs the grid (`run_grid`) and is the CLI; the parts live beside it: `spec` (GridSpec,
parse_grid), `targets` (what to evaluate), `evaluation` (test mode), `tasks` (test mode as Ray
tasks), `retrain` (train+test mode), `tables` (rows, summary, files). Their public names are
importable from here too.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import pandas as pd

from calray.config import read_yaml
from calray.errors import run_cli
from calray.io import ROBUSTNESS_CSV, ROBUSTNESS_PARQUET, ROBUSTNESS_SUMMARY_CSV
from calray.data.noise import MISSING_FILLS
from calray.ray.session import init_ray
from calray.robustness.evaluation import CheckpointEvaluator, evaluate_test_grid
from calray.robustness.retrain import Retrain, evaluate_train_test_grid, plan_retrains, prepare_retrains
from calray.robustness.spec import KINDS, MODES, GridSpec, parse_grid
from calray.robustness.tables import format_summary, read_robustness, save_tables, summarize, tidy
from calray.robustness.targets import Target, check_attacked, resolve_targets, say
from calray.robustness.tasks import run_serial, run_tasks

__all__ = ["KINDS", "MODES", "CheckpointEvaluator", "GridSpec", "Retrain", "Target", "evaluate_test_grid",
           "evaluate_train_test_grid", "format_summary", "main", "parse_args", "parse_grid", "plan_retrains",
           "read_robustness", "resolve_targets", "run_grid", "save_tables", "summarize"]


def run_grid(sweep_dir: Path, grid: dict | GridSpec | None = None, address: str | None = None,
             quiet: bool = False, callbacks: Sequence = ()) -> pd.DataFrame:
    """Run the robustness grid on a sweep dir, run dir or checkpoint; save and return the raw rows.

    `grid` = {kinds, eps, modes, attacked, noise_seeds, train_seeds, ...} (see GridSpec); `address`
    is the Ray cluster for the test-mode tasks and the train+test retrains (None: a local Ray
    instance, or the one already initialised in this process; started once for both and shut down
    at the end). `quiet`: no line per test setting or train+test retrain (failures and one line
    per test task are still printed), only the summary.
    """
    spec = parse_grid(grid)
    out_dir, kind, targets = resolve_targets(Path(sweep_dir), spec.cells)
    check_attacked(targets, spec)
    say(f"{kind} {out_dir}: {len(targets)} target(s) [{', '.join(t.label for t in targets)}]; "
        f"kinds {spec.kinds}, attacked {spec.attacked}, eps {spec.eps}, modes {spec.modes}, "
        f"noise seeds {spec.noise_seed_list}, "
        f"train seeds {'the final seeds' if kind == 'final' else spec.train_seed_list}")
    retrains = prepare_retrains(targets, spec, out_dir) if "train+test" in spec.modes else ([], [])
    uses_ray = ("test" in spec.modes and spec.test_tasks) or bool(retrains[1])
    started = init_ray(address, key="--address", log_to_driver=True) if uses_ray else False
    try:
        rows: list[dict] = []
        if "test" in spec.modes:
            t0 = time.time()
            rows += run_tasks(targets, spec, quiet) if spec.test_tasks else run_serial(targets, spec, quiet)
            say(f"test mode: {len(rows)} rows in {time.time() - t0:.1f}s "
                f"({'Ray tasks' if spec.test_tasks else 'serial'})")
        if "train+test" in spec.modes:
            rows += evaluate_train_test_grid(targets, spec, out_dir, address, quiet=quiet, callbacks=callbacks,
                                             prepared=retrains)
    finally:
        if started:
            import ray  # started above, so importable

            ray.shutdown()
    df = save_tables(tidy(rows), out_dir, spec)
    summary = summarize(df)
    say(f"wrote {out_dir / ROBUSTNESS_CSV}, {ROBUSTNESS_PARQUET}, {ROBUSTNESS_SUMMARY_CSV} ({len(df)} rows)")
    print(format_summary(summary), flush=True)
    return df


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m calray.robustness",
        description="Evaluate a sweep's best models (or one run) over a noise grid: test-only (Table II) "
                    "and train+test retraining (Table III).")
    p.add_argument("path", help="sweep directory, run directory or checkpoint file")
    p.add_argument("--grid", help="YAML file with the grid (keys as below); flags override it")
    p.add_argument("--kinds", nargs="+", choices=KINDS,
                   help="noise kinds (default: gaussian salt_pepper); missing = a modality absent at test time")
    p.add_argument("--attacked", nargs="+", help="which modalities: all (default) and/or modality names, a row each")
    p.add_argument("--missing-fill", choices=MISSING_FILLS, help="kind missing: zero input (default) or the "
                   "training-set mean input")
    p.add_argument("--serial", action="store_true", help="test mode one (target, kind) after another in this "
                   "process instead of Ray tasks")
    p.add_argument("--eps", nargs="+", type=float, help="noise levels ε; 0 = clean (default: 0 5 10)")
    p.add_argument("--modes", nargs="+", choices=MODES, help="attack modes (default: test)")
    p.add_argument("--noise-seeds", type=int, nargs="+", help="a count N (seeds 0..N-1) or several seeds")
    p.add_argument("--train-seeds", type=int, nargs="+", help="train+test replicates: a count or seeds")
    p.add_argument("--cells", nargs="+", help="only cells matching these glob patterns")
    p.add_argument("--epochs", type=int, help="train+test: override optim.epochs of the retrains")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per retrain trial / test-mode task")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per retrain trial / test-mode task")
    p.add_argument("--max-concurrent-trials", type=int)
    p.add_argument("--address", default=None, help="Ray cluster for the test tasks and train+test retrains: "
                   "'auto' or host:port")
    p.add_argument("--quiet", action="store_true",
                   help="train+test: no line per retrain trial (failures are still shown), only the summary")
    return p.parse_args(argv)


def _seed_arg(v: list[int] | None):
    if v is None:
        return None
    return v[0] if len(v) == 1 else v


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: _run(args))  # a CalrayError: one line, exit status 2


def _run(args: argparse.Namespace) -> None:
    grid: dict = read_yaml(args.grid) if args.grid else {}
    flags = {"kinds": args.kinds, "eps": args.eps, "modes": args.modes, "attacked": args.attacked,
             "missing_fill": args.missing_fill, "test_tasks": False if args.serial else None,
             "noise_seeds": _seed_arg(args.noise_seeds), "train_seeds": _seed_arg(args.train_seeds),
             "cells": args.cells, "epochs": args.epochs, "cpus_per_trial": args.cpus_per_trial,
             "gpus_per_trial": args.gpus_per_trial, "max_concurrent_trials": args.max_concurrent_trials}
    grid.update({k: v for k, v in flags.items() if v is not None})
    spec = parse_grid(grid, source=args.grid or "command line")
    run_grid(Path(args.path), spec, address=args.address, quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
