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

This module runs the grid (`run_grid`) and is the CLI; the parts live beside it: `spec` (GridSpec,
parse_grid), `targets` (what to evaluate), `evaluation` (test mode), `retrain` (train+test mode),
`tables` (rows, summary, files). Their public names are importable from here too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from calray.config import read_yaml
from calray.errors import run_cli
from calray.io import ROBUSTNESS_CSV, ROBUSTNESS_PARQUET, ROBUSTNESS_SUMMARY_CSV
from calray.robustness.evaluation import CheckpointEvaluator, evaluate_test_grid
from calray.robustness.retrain import Retrain, evaluate_train_test_grid, plan_retrains
from calray.robustness.spec import KINDS, MODES, GridSpec, parse_grid
from calray.robustness.tables import format_summary, read_robustness, save_tables, summarize, tidy
from calray.robustness.targets import Target, resolve_targets, say

__all__ = ["KINDS", "MODES", "CheckpointEvaluator", "GridSpec", "Retrain", "Target", "evaluate_test_grid",
           "evaluate_train_test_grid", "format_summary", "main", "parse_args", "parse_grid", "plan_retrains",
           "read_robustness", "resolve_targets", "run_grid", "save_tables", "summarize"]


def run_grid(sweep_dir: Path, grid: dict | GridSpec | None = None, address: str | None = None,
             quiet: bool = False, callbacks: Sequence = ()) -> pd.DataFrame:
    """Run the robustness grid on a sweep dir, run dir or checkpoint; save and return the raw rows.

    `grid` = {kinds, eps, modes, noise_seeds, train_seeds, ...} (see GridSpec); `address` is the
    Ray cluster for the train+test retrains (None: a local Ray instance, or the one already
    initialised in this process). `quiet`: no line per train+test retrain (neither as it ends nor
    its result; failures are still printed), only the summary.
    """
    spec = parse_grid(grid)
    out_dir, kind, targets = resolve_targets(Path(sweep_dir), spec.cells)
    say(f"{kind} {out_dir}: {len(targets)} target(s) [{', '.join(t.cell for t in targets)}]; "
         f"kinds {spec.kinds}, eps {spec.eps}, modes {spec.modes}, noise seeds {spec.noise_seed_list}, "
         f"train seeds {spec.train_seed_list}")
    rows: list[dict] = []
    if "test" in spec.modes:
        for i, target in enumerate(targets, 1):
            say(f"test mode: target {i}/{len(targets)} {target.cell}")
            rows += evaluate_test_grid(target, spec)
    if "train+test" in spec.modes:
        rows += evaluate_train_test_grid(targets, spec, out_dir, address, quiet=quiet, callbacks=callbacks)
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
    return run_cli(lambda: _run(args))  # a CalrayError: one line, exit status 2


def _run(args: argparse.Namespace) -> None:
    grid: dict = read_yaml(args.grid) if args.grid else {}
    flags = {"kinds": args.kinds, "eps": args.eps, "modes": args.modes,
             "noise_seeds": _seed_arg(args.noise_seeds), "train_seeds": _seed_arg(args.train_seeds),
             "cells": args.cells, "epochs": args.epochs, "cpus_per_trial": args.cpus_per_trial,
             "gpus_per_trial": args.gpus_per_trial, "max_concurrent_trials": args.max_concurrent_trials}
    grid.update({k: v for k, v in flags.items() if v is not None})
    spec = parse_grid(grid, source=args.grid or "command line")
    run_grid(Path(args.path), spec, address=args.address, quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
