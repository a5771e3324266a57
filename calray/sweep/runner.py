"""`python -m calray.sweep SWEEP.yaml [--address ADDR] [--resume] [--dry-run] [--cells PATTERN] [--num-samples N]`.

Ray Tune + Optuna over the CAL hyper-parameters (T, η, λ, n, ...) repeated over cells
(dataset × noise setting × variant). Every selected cell's trials are scheduled together in one
Ray Tune experiment (calray.sweep.experiment): each cell keeps its own Optuna study (`study_name =
cell id`, all in one JournalStorage file), its own ASHA brackets and its own manifest;
`max_concurrent_trials` caps the whole sweep. A cell's outputs are rewritten when it has all its
trials ("cells done i/N"), and at the end or on Ctrl-C.

Outputs under `<ray.storage_path>/<name>/` (docs/SWEEPS.md): sweep.yaml, cells.json,
trials.parquet + trials.csv, optuna.journal, best/<cell>.yaml, runs/<cell>/<trial_id>/, and
manifest/ + ray/ (the sweep's own trial record and Ray's experiment state, used by --resume).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import sys
import time
from pathlib import Path

import yaml

from calray.config import get_dotted
from calray.errors import ConfigError, run_cli
from calray.io import (BEST_DIR, CELLS_FILE, COMPARISON_CSV, MANIFEST_DIR, OPTUNA_JOURNAL, RUNS_DIR, SWEEP_FILE,
                       TRIALS_PARQUET, atomic_write_text)
from calray.ray.session import check_shared_storage, init_ray
from calray.ray.trial import resolve_run_config
from calray.report import comparison as report_comparison
from calray.report import render as report_render
from calray.robustness import grid as robustness_grid
from calray.sweep import final as sweep_final
from calray.sweep.experiment import cell_run, run_search
from calray.sweep.outputs import write_outputs
from calray.sweep.progress import SweepDisplay
from calray.sweep.spec import Cell, SweepPlan, example_params, load_sweep, stored_spec
from calray.sweep.tracking import check_installed, tracking_callbacks

log = logging.getLogger("calray.sweep")

# parts of the sweep file that must not change between a sweep and its --resume
RESUME_KEYS = ("search.space", "search.algorithm", "search.metric", "search.mode", "search.seed",
               "scheduler", "resources", "set", "cells")


class Interrupted(Exception):
    """The sweep stopped before every trial finished (Ctrl-C); --resume continues it."""


# ---------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m calray.sweep",
                                description="Ray Tune + Optuna sweep over CAL hyper-parameters, per dataset × noise cell.")
    p.add_argument("sweep", help="sweep file (see sweeps/ and docs/SWEEPS.md)")
    p.add_argument("--address", default=None,
                   help="Ray cluster: 'auto' or host:port (default: ray.address of the file, else a local Ray)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep: finished trials are kept, unfinished ones resume")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, print the cells and one trial's resolved run config; start nothing")
    p.add_argument("--cells", default=None, metavar="PATTERN",
                   help="only cells whose id matches this glob (comma-separated globs allowed)")
    p.add_argument("--num-samples", type=int, default=None, metavar="N", help="trials per cell (overrides search.num_samples)")
    p.add_argument("--storage-path", default=None, help="override ray.storage_path")
    p.add_argument("--final-only", action="store_true",
                   help="(re)run only the final stage (final: block) of a finished sweep, then its grid and report")
    p.add_argument("--retry-failed", action="store_true",
                   help="with --resume: run the failed trials again with their parameters")
    p.add_argument("--quiet", action="store_true", help="no per-trial progress lines")
    return p.parse_args(argv)


def select_cells(plan: SweepPlan, pattern: str | None) -> list[Cell]:
    if not pattern:
        return list(plan.cells)
    globs = [g.strip() for g in pattern.split(",") if g.strip()]
    chosen = [c for c in plan.cells if any(fnmatch.fnmatchcase(c.id, g) for g in globs)]
    if not chosen:
        raise ConfigError(f"--cells {pattern!r}: matches no cell; cells: {', '.join(c.id for c in plan.cells)}")
    return chosen


def sweep_dir_of(plan: SweepPlan, storage_path: str | None = None) -> Path:
    return (Path(storage_path or plan.spec.ray.storage_path) / plan.spec.name).resolve()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run_cli(lambda: _run(args))  # a CalrayError: one line, exit status 2
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `--dry-run | head`
        return 0


def _run(args: argparse.Namespace) -> int:
    if args.num_samples is not None and args.num_samples < 1:
        raise ConfigError("--num-samples must be >= 1")
    plan = load_sweep(args.sweep, num_samples=args.num_samples)
    cells = select_cells(plan, args.cells)
    if args.dry_run:
        dry_run(plan, cells, args)
        return 0
    if args.retry_failed and not args.resume:
        raise ConfigError("--retry-failed continues a sweep: pass --resume too")
    if args.final_only:
        return run_final_only(plan, cells, address=args.address, storage_path=args.storage_path, quiet=args.quiet)
    return run_sweep(plan, cells, address=args.address, resume=args.resume, storage_path=args.storage_path,
                     quiet=args.quiet, retry_failed=args.retry_failed)


# ---------------------------------------------------------------- dry run


def _space_text(space: dict) -> str:
    return ", ".join(f"{k}: {d.kind} {getattr(d, d.kind)}" for k, d in space.items()) or "(empty: each trial runs the config as given)"


def dry_run(plan: SweepPlan, cells: list[Cell], args) -> None:
    spec = plan.spec
    sdir = sweep_dir_of(plan, args.storage_path)
    n = plan.num_samples()
    sched = "asha" if spec.scheduler and spec.scheduler.asha else "none"
    print(f"sweep {spec.name}: {len(cells)} of {len(plan.cells)} cell(s) × {n} trial(s), "
          f"algorithm {spec.search.algorithm} (seed {spec.search.seed}), {spec.search.mode} {spec.search.metric}, "
          f"scheduler {sched}, resources {spec.resources.model_dump()}, "
          f"max_concurrent_trials {spec.max_concurrent_trials} (the whole sweep; per cell "
          f"{spec.max_concurrent_trials_per_cell}), all cells' trials scheduled together")
    print(f"outputs: {sdir}")
    print("search space: " + _space_text(spec.search.space))
    print("cells:")
    for c in cells:
        r = c.run
        print(f"  {c.id:40s} dataset={r['data']['dataset']} noise={c.noise['kind']}"
              f"/eps={c.noise.get('eps', 0):g}/{c.noise.get('mode', 'test')} "
              f"strategy={r['method']['strategy']} epochs={r['optim']['epochs']}  (from {c.source})")
        if c.space != spec.search.space:
            print(f"  {'':40s} its own space: {_space_text(c.space)}")
    params = example_params(spec, cells[0])
    cfg = resolve_run_config({"run": cell_run(plan, cells[0]), **params}, source=f"cell {cells[0].id}")
    print(f"\none trial of cell {cells[0].id} (example params {json.dumps(params)}; it writes "
          f"{sdir / RUNS_DIR / cells[0].id}/<trial_id>/), resolved run config:")
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")


# ---------------------------------------------------------------- running


def _check_resume(plan: SweepPlan, sdir: Path, resume: bool) -> None:
    stored = sdir / SWEEP_FILE
    started = (sdir / MANIFEST_DIR).is_dir() and any((sdir / MANIFEST_DIR).iterdir())
    if not resume:
        if started:
            raise ConfigError(f"{plan.path}: name: sweep {plan.spec.name!r} already has results in {sdir}; "
                              f"pass --resume to continue it, or change name / ray.storage_path")
        return
    if not stored.is_file():
        return  # nothing to compare against: a resume of a sweep that never started is a start
    old = yaml.safe_load(stored.read_text()) or {}
    new = stored_spec(plan)
    for key in RESUME_KEYS:
        if get_dotted(old, key) != get_dotted(new, key):
            raise ConfigError(f"{plan.path}: {key}: differs from the sweep being resumed ({stored}); "
                              f"a resumed sweep must keep its cells, space, scheduler and resources — "
                              f"start a new sweep (another name) instead")


def _init_ray(address: str | None, plan: SweepPlan) -> None:
    import ray

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # trials keep the driver's CWD (relative paths)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for name in ("ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # a failed trial is one progress line (its error) and <run dir>/error.txt; Tune would also log
    # the worker's whole traceback and a "Trials did not complete" line to the console
    for name in ("ray.tune.execution.tune_controller", "ray.tune.tune"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # keep the dashboard (state API) on: with ASHA + multi-worker trials its absence left a stopped
    # trial's placement group behind and the next trial hung (ray_facts §3.5)
    init_ray(address, key="--address", num_cpus=plan.spec.ray.num_cpus, num_gpus=plan.spec.ray.num_gpus)


def run_sweep(plan: SweepPlan, cells: list[Cell], address: str | None = None, resume: bool = False,
              storage_path: str | None = None, quiet: bool = False, retry_failed: bool = False) -> int:
    """Run (or resume) the search over every cell's trials at once; write a cell's outputs when it
    has all its trials, and all of them at the end; then the final stage, the robustness grid and
    the report (`finish_hooks`)."""
    spec = plan.spec
    sdir = sweep_dir_of(plan, storage_path)
    _check_resume(plan, sdir, resume)
    check_installed(spec.tracking)  # a missing tracking package fails before anything is written
    sdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sdir / SWEEP_FILE, yaml.safe_dump(stored_spec(plan), sort_keys=False))
    address = address or spec.ray.address
    _init_ray(address, plan)
    check_shared_storage(sdir, key="ray.storage_path (--storage-path)", what="the sweep directory")
    display = SweepDisplay(n_cells=len(cells), quiet=quiet)
    print(f"sweep {spec.name}: {len(cells)} cell(s) × {plan.num_samples()} trial(s) → {sdir}", flush=True)
    t0 = time.time()
    try:
        try:
            run_search(plan, cells, sdir, display, retry_failed=retry_failed,
                       on_cell_done=CellsDone(plan, cells, sdir))
        finally:
            write_outputs(plan, sdir)
    except KeyboardInterrupt:
        raise Interrupted(f"outputs so far are in {sdir}; continue with "
                          f"`python -m calray.sweep {plan.path} --resume`") from None
    print(f"sweep {spec.name} finished in {time.time() - t0:.0f}s: {sdir}/{CELLS_FILE}, {TRIALS_PARQUET}, "
          f"{BEST_DIR}/", flush=True)
    status = finish_hooks(plan, cells, sdir, address, quiet=quiet)
    print(f"optuna-dashboard {sdir / OPTUNA_JOURNAL}   # browse the studies", flush=True)
    return status


class CellsDone:
    """Hears each cell that has all its trials: rewrites the outputs and prints its "cells done
    i/N" line, once per cell (Tune calls it from the driver's thread, at a trial's end)."""

    def __init__(self, plan: SweepPlan, cells: list[Cell], sdir: Path):
        self.plan, self.cells, self.sdir = plan, cells, sdir
        self.done: list[str] = []

    def __call__(self, cell_id: str) -> None:
        if cell_id in self.done:
            return
        self.done.append(cell_id)
        try:
            records = write_outputs(self.plan, self.sdir)
        except Exception as e:  # noqa: BLE001 - never stop the other cells' trials; the end rewrites them
            log.exception("writing outputs after cell %s failed", cell_id)
            print(f"cells done {len(self.done)}/{len(self.cells)}: {cell_id} (outputs not written: "
                  f"{type(e).__name__}: {e})", flush=True)
            return
        rec = next(r for r in records if r["cell"] == cell_id)
        best = (f"best {rec['metric']} {rec['best_value']:.4f} (trial {rec['best_trial']}, "
                f"test_acc {rec['best_test_acc']:.4f})" if rec["best_trial"] else "no finished trial")
        print(f"cells done {len(self.done)}/{len(self.cells)}: {cell_id} {rec['status']} — {rec['n_trials']} "
              f"trials, {rec['n_failed']} failed, {rec['n_pruned']} pruned; {best}", flush=True)


def run_final_only(plan: SweepPlan, cells: list[Cell], address: str | None = None,
                   storage_path: str | None = None, quiet: bool = False) -> int:
    """`--final-only`: the final stage of a sweep whose search has run, then its grid and report."""
    sdir = sweep_dir_of(plan, storage_path)
    if plan.spec.final is None:
        raise ConfigError(f"{plan.path}: final: --final-only needs a final: block in the sweep file")
    if not (sdir / CELLS_FILE).is_file():
        raise ConfigError(f"{sdir}: no {CELLS_FILE}: the sweep's search has not run (run it without --final-only)")
    _check_resume(plan, sdir, resume=True)  # the same cells, space and resources as the search
    _init_ray(address or plan.spec.ray.address, plan)
    return finish_hooks(plan, cells, sdir, address or plan.spec.ray.address, quiet=quiet)


def _final_stage(plan: SweepPlan, cells: list[Cell], sdir: Path, address: str | None, quiet: bool) -> None:
    """The final multi-seed retrains; a Ctrl-C during them is an interruption `--resume` continues."""
    trackers = tracking_callbacks(plan.spec.tracking, plan.spec.name, "final", sdir)
    if sweep_final.run_final(plan, cells, sdir, address, quiet=quiet, callbacks=trackers) is None:
        raise Interrupted(f"the final stage stopped before every retrain finished; continue with "
                          f"`python -m calray.sweep {plan.path} --resume`")


def finish_hooks(plan: SweepPlan, cells: list[Cell], sdir: Path, address: str | None, quiet: bool = False) -> int:
    """The final stage (a `final:` block), the robustness grid (a `robustness:` block; `quiet` as the
    sweep's --quiet), the comparison (final.baseline) and the report. Failures of the last three are
    logged and never touch the sweep's outputs."""
    spec = plan.spec
    if spec.final is not None:
        _final_stage(plan, cells, sdir, address, quiet)
    status = 0
    if spec.robustness:
        trackers = tracking_callbacks(spec.tracking, spec.name, "robustness", sdir)
        status |= _guarded("robustness grid", lambda: robustness_grid.run_grid(
            sdir, spec.robustness, address, quiet=quiet, callbacks=trackers))
    if spec.final is not None and spec.final.baseline is not None:
        status |= _guarded("comparison", lambda: _comparison(sdir, spec.final.baseline))
    return status | _guarded("report", lambda: report_render.write_report(sdir))


def _guarded(what: str, step) -> int:
    try:
        step()
        return 0
    except Exception as e:  # noqa: BLE001 - the sweep's outputs are already written
        log.exception("%s failed", what)
        print(f"{what} failed: {type(e).__name__}: {e} (sweep outputs kept)", file=sys.stderr)
        return 1


def _comparison(sdir: Path, baseline: str) -> None:
    rows = report_comparison.write_comparison(sdir)
    clean = rows[rows["kind"].isna()] if "kind" in rows else rows
    print(f"comparison: {len(rows)} rows ({len(clean)} clean) against {baseline}, paired over the final seeds "
          f"→ {sdir / COMPARISON_CSV}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
