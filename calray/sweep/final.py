"""The sweep's final stage (the comparison protocol, docs/SWEEPS.md): after the search, each cell's best
configuration (best/<cell>.yaml, selected on validation) is retrained once per seed s of `final.seeds`
with runtime.seed = data.seed = s — the same seeds in every cell, so runs pair across variants — as
Ray Tune trials (calray.ray.batch: parallel, reusing identical finished runs, resuming unfinished ones).
Each retrain again selects its epoch on validation; its test numbers go to final.csv / final.parquet,
one row per (cell, seed), and the protocol as run to final.json."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from calray.config import absolute_paths, config_from_dict, read_yaml
from calray.errors import CalrayError
from calray.io import (BEST_DIR, FINAL_CSV, FINAL_DIR, FINAL_JSON, FINAL_PARQUET, RUNS_DIR, atomic_write_bytes,
                       write_json)
from calray.ray.batch import FixedRun, finished_summary, refuse_foreign_dirs, run_batch
from calray.sweep.spec import Cell, SweepPlan, noise_slug

TUNE_DIR = "tune"  # in FINAL_DIR: Ray Tune's state of the final retrains
COLUMNS = ["cell", "dataset", "noise", "variant", "seed", "status", "val_acc", "test_acc", "test_macro_f1",
           "run_dir", "error"]
DEFAULT_VARIANT = "default"  # the variant column of a sweep without cells.variants
INTERRUPTED = "interrupted"  # a final.csv status besides ok/failed: --resume runs it


def say(msg: str) -> None:
    print(f"[final] {msg}", flush=True)


@dataclass
class FinalRun:
    cell: Cell
    seed: int
    run: FixedRun


def final_config(best_yaml: Path, cell: Cell, seed: int, sweep_dir: Path) -> dict:
    """The best config of `cell` with training and data seed `seed`, writing to final/runs/<cell>/seed<s>."""
    tree = read_yaml(best_yaml)
    tree["data"]["seed"] = seed
    tree["runtime"].update(seed=seed, progress=False, resume=True, run_name=f"seed{seed}",
                           output_dir=str((sweep_dir / FINAL_DIR / RUNS_DIR / cell.id).resolve()))
    tree = absolute_paths(tree)
    return config_from_dict(tree, f"{best_yaml} (final seed {seed})").to_dict()


def plan_final(plan: SweepPlan, cells: Sequence[Cell], sweep_dir: Path) -> tuple[list[FinalRun], list[str]]:
    """(the retrains, the ids of cells without a best config, which are skipped)."""
    runs, skipped = [], []
    for cell in cells:
        best = sweep_dir / BEST_DIR / f"{cell.id}.yaml"
        if not best.is_file():
            skipped.append(cell.id)
            continue
        for seed in plan.spec.final.seed_list:
            cfg = final_config(best, cell, seed, sweep_dir)
            runs.append(FinalRun(cell, seed, FixedRun(cfg, label=f"{cell.id} seed {seed}", cell=cell.id)))
    return runs, skipped


def final_row(run: FinalRun, summary: dict | None, error: str | None) -> dict:
    cell = run.cell
    row = {"cell": cell.id, "dataset": cell.dataset, "noise": noise_slug(cell.noise),
           "variant": cell.variant or DEFAULT_VARIANT, "seed": run.seed, "status": "ok" if summary else "failed",
           "val_acc": math.nan, "test_acc": math.nan, "test_macro_f1": math.nan,
           "run_dir": str(run.run.run_dir), "error": None if summary else error}
    if summary:
        row.update(val_acc=summary.get("best_val_acc", math.nan), test_acc=summary["test"]["acc"],
                   test_macro_f1=summary["test"].get("macro_f1", math.nan))
    return row


def protocol(plan: SweepPlan, skipped: list[str]) -> dict:
    """final.json: the protocol as run, with the search budget of each variant."""
    f = plan.spec.final
    budget = {}
    for cell in plan.cells:
        budget[cell.variant or DEFAULT_VARIANT] = {"num_samples": plan.num_samples(), "space": sorted(cell.space)}
    return {"seeds": f.seed_list, "baseline": f.baseline, "metrics": list(f.metrics), "confidence": f.confidence,
            "selection": f"{plan.spec.search.metric} ({plan.spec.search.mode}) on the validation split",
            "budget": budget, "skipped_cells": skipped}


def write_final(sweep_dir: Path, rows: list[dict], meta: dict) -> None:
    import pandas as pd

    df = pd.DataFrame(rows, columns=COLUMNS).sort_values(["cell", "seed"], kind="stable").reset_index(drop=True)
    atomic_write_bytes(sweep_dir / FINAL_PARQUET, lambda f: df.to_parquet(f, index=False))
    atomic_write_bytes(sweep_dir / FINAL_CSV, lambda f: f.write(df.to_csv(index=False).encode()))
    write_json(sweep_dir / FINAL_JSON, meta)


def run_final(plan: SweepPlan, cells: Sequence[Cell], sweep_dir: Path, address: str | None = None,
              quiet: bool = False, callbacks: Sequence = ()) -> list[dict]:
    """Retrain every cell's best config over the final seeds (reusing finished ones); write final.*.
    Returns the rows, or None when a Ctrl-C stopped the stage before every retrain ended."""
    sweep_dir = Path(sweep_dir)
    runs, skipped = plan_final(plan, cells, sweep_dir)
    for cid in skipped:
        say(f"cell {cid}: no best config (no finished trial) — no final runs")
    if not runs:
        raise CalrayError(f"{sweep_dir}: no cell has a best config to retrain ({BEST_DIR}/ is empty)")
    todo = [r for r in runs if finished_summary(r.run) is None]
    refuse_foreign_dirs([r.run for r in todo])
    seeds = plan.spec.final.seed_list
    say(f"{len(runs)} retrains ({len(cells) - len(skipped)} cells × seeds {seeds}); "
        f"{len(runs) - len(todo)} already finished, reused; {len(todo)} to run")
    errors: dict[int, str] = {}
    if todo:
        spec = plan.spec
        errors = run_batch([r.run for r in todo], sweep_dir / FINAL_DIR / TUNE_DIR, "final",
                           spec.resources.trial_resources(), address=address,
                           max_concurrent=spec.max_concurrent_trials, max_failures=spec.max_failures,
                           quiet=quiet, reuse=spec.ray.reuse_actors, callbacks=callbacks, tag="final")
    failed = {id(todo[i]): msg for i, msg in errors.items()}
    rows, interrupted = [], 0
    for r in runs:
        summary = finished_summary(r.run)
        row = final_row(r, summary, failed.get(id(r)))
        if summary is None and id(r) not in failed:  # Tune stopped on a Ctrl-C before this run ended
            row.update(status=INTERRUPTED, error="interrupted before it finished")
            interrupted += 1
        rows.append(row)
    write_final(sweep_dir, rows, protocol(plan, skipped))
    ok = sum(row["status"] == "ok" for row in rows)
    say(f"{ok}/{len(rows)} final runs ok, {len(failed)} failed, {interrupted} interrupted → {sweep_dir / FINAL_CSV}")
    return None if interrupted else rows

