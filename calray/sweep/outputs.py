"""The sweep's own record of its trials (a manifest outside Ray) and the outputs built from it.

Ray's experiment state (`tuner.pkl`) can be truncated by a crash (ray#58179), so the sweep
driver appends every trial event to `<sweep dir>/manifest/<cell>.jsonl` as it happens:

    {"ev": "start",  "trial_id", "params"}
    {"ev": "result", "trial_id", "metrics"}            one per `ray.tune.report`
    {"ev": "end",    "trial_id", "status", "error"}     TERMINATED / PRUNED / ERROR
    {"ev": "retry",  "trial_id", "reason", "failures"}  Tune restarts a failed trial (max_failures),
                                                        e.g. its node died; it goes on from its last.pt

Later events win (a restored trial re-reports its epochs, a retried trial ends twice), so a
resumed sweep never duplicates a trial, and a retried trial is still one trial (its `retries`
list holds the reasons). From the manifest this module writes the outputs
(trials.parquet/.csv, cells.json, best/<cell>.yaml); it imports neither Ray nor Optuna.
"""

from __future__ import annotations

import json
import math
import time
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from calray.io import (BEST_DIR, CELLS_FILE, MANIFEST_DIR, METRICS_FILE, RETRAIN_DIR, RUNS_DIR, TRIALS_CSV,
                       TRIALS_PARQUET, append_jsonl, atomic_write_bytes, atomic_write_text, read_jsonl)
from calray.ray.trial import FINAL_KEY, FINISHED, TIME_ATTR, TrialStatus, resolve_run_config
from calray.sweep.spec import Cell, SweepPlan

# keys Ray Tune adds to every result; they are not the run's metrics
TUNE_KEYS = {"training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "date", "hostname",
             "node_ip", "pid", "done", "trial_id", "experiment_tag", "time_since_restore",
             "iterations_since_restore", "timesteps_total", "episodes_total", "timesteps_since_restore",
             "experiment_id", "should_checkpoint", "checkpoint_dir_name", "config", "__duplicate__"}
PER_TRIAL = ("test_acc", "best_val_acc", "best_epoch", "run_dir")


class CellStatus(str, Enum):
    """A cell's status in cells.json (a `str`: the file holds the plain names)."""

    PENDING = "pending"  # no trial yet
    PARTIAL = "partial"  # fewer finished trials than num_samples
    FAILED = "failed"  # every finished trial errored
    DONE = "done"

    def __str__(self) -> str:
        return self.value


class Manifest:
    """Append-only JSON-lines record of one cell's trials (written by the sweep driver only)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, event: dict) -> None:
        append_jsonl(self.path, {**event, "t": round(time.time(), 3)}, default=_json_default)

    def events(self) -> list[dict]:
        return read_jsonl(self.path)  # a line torn by a crash is skipped

    def trials(self) -> dict[str, dict]:
        """trial_id → {params, epochs {epoch: row}, final, status, error, retries [reason]}; later events win."""
        trials: dict[str, dict] = {}
        for ev in self.events():
            tid = ev.get("trial_id")
            if not tid:
                continue
            t = trials.setdefault(tid, {"trial_id": tid, "params": {}, "epochs": {}, "final": None,
                                        "status": TrialStatus.RUNNING, "error": None, "run_dir": None,
                                        "retries": []})
            kind = ev.get("ev")
            if kind == "start":
                t["params"] = ev.get("params") or t["params"]
                if t["status"] not in FINISHED:
                    t["status"] = TrialStatus.RUNNING
            elif kind == "result":
                m = ev.get("metrics") or {}
                t["run_dir"] = m.get("run_dir") or t["run_dir"]
                if m.get(FINAL_KEY) == 1:
                    t["final"] = m
                elif "epoch" in m:
                    t["epochs"][int(m["epoch"])] = m
            elif kind == "retry":
                t["retries"].append(ev.get("reason") or "unknown error")
                if t["status"] not in FINISHED:
                    t["status"] = TrialStatus.RUNNING
            elif kind == "end":
                t["status"] = ev.get("status", TrialStatus.TERMINATED)
                t["error"] = ev.get("error")
                if ev.get("run_dir"):
                    t["run_dir"] = ev["run_dir"]
        return trials

    def finished(self) -> dict[str, dict]:
        return {k: t for k, t in self.trials().items() if t["status"] in FINISHED}


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def manifest_path(sweep_dir: Path, cell_id: str) -> Path:
    return Path(sweep_dir) / MANIFEST_DIR / f"{cell_id}.jsonl"


def clean_metrics(result: dict) -> dict:
    """A Tune result without Tune's bookkeeping keys and without non-scalar values."""
    out = {}
    for k, v in result.items():
        if k in TUNE_KEYS or k.startswith("config/"):
            continue
        if isinstance(v, (int, float, str)) or v is None:
            out[k] = v
    return out


# ---------------------------------------------------------------- per-trial numbers


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def trial_numbers(t: dict) -> dict[str, Any]:
    """test_acc, best_val_acc, best_epoch, run_dir of a trial (NaN/None where it has none)."""
    final = t.get("final")
    if final:
        return {"test_acc": final.get("test_acc", math.nan), "best_val_acc": final.get("best_val_acc", math.nan),
                "best_epoch": final.get("best_epoch"), "run_dir": final.get("run_dir") or t.get("run_dir")}
    vals = [(e, r.get("val_acc")) for e, r in sorted(epoch_rows(t).items()) if _finite(r.get("val_acc"))]
    if vals:
        best_epoch, best = max(vals, key=lambda x: (x[1], -x[0]))
    else:
        best_epoch, best = None, math.nan
    return {"test_acc": math.nan, "best_val_acc": best, "best_epoch": best_epoch, "run_dir": t.get("run_dir")}


def trial_seed(cell: Cell, params: dict) -> int:
    if "runtime.seed" in params:
        return int(params["runtime.seed"])
    return int(cell.run.get("runtime", {}).get("seed", 0))


def epoch_rows(t: dict) -> dict[int, dict]:
    """A trial's per-epoch rows: the reports the driver saw, completed from the run's own
    metrics.jsonl when the driver can read it (an epoch finished just before a Ctrl-C is in the
    file but its report never reached Tune; a resumed run does not report it again)."""
    rows = {e: dict(r) for e, r in t["epochs"].items()}
    run_dir = t.get("run_dir")
    # a pruned trial ends at its last report (a run that went on after the stop is not counted)
    last = max(rows) if t.get("status") == TrialStatus.PRUNED and rows else None
    if run_dir:
        for r in read_jsonl(Path(run_dir) / METRICS_FILE):
            if "epoch" in r and (last is None or int(r["epoch"]) <= last):
                rows[int(r["epoch"])] = {k: v for k, v in r.items()
                                         if isinstance(v, (int, float, str)) or v is None}
    return rows


def trial_rows(sweep: str, cell: Cell, t: dict) -> list[dict]:
    base = {"sweep": sweep, "cell": cell.id, "trial_id": t["trial_id"], "status": t["status"],
            "error": t.get("error") or "", "seed": trial_seed(cell, t["params"])}
    base.update({f"param.{k}": v for k, v in sorted(t["params"].items())})
    per_trial = trial_numbers(t)
    by_epoch = epoch_rows(t)
    rows = []
    for epoch in sorted(by_epoch):
        metrics = {k: v for k, v in by_epoch[epoch].items()
                   if k not in (TIME_ATTR, FINAL_KEY, "run_dir", "best_val_acc")}
        rows.append({**base, **metrics, "epoch": epoch, **per_trial})
    if not rows:
        rows.append({**base, "epoch": None, **per_trial})
    return rows


# ---------------------------------------------------------------- cell summaries and best configs


def select_best(trials: dict[str, dict], metric: str, mode: str) -> dict | None:
    """The best finished trial on `metric` in its final report (TERMINATED trials only)."""
    scored = [(t["final"][metric], t) for t in trials.values()
              if t["status"] == TrialStatus.TERMINATED and t.get("final") and _finite(t["final"].get(metric))]
    if not scored:
        return None
    sign = 1 if mode == "max" else -1
    return max(scored, key=lambda x: sign * x[0])[1]


def cell_status(trials: dict[str, dict], num_samples: int) -> CellStatus:
    """pending (no trial yet), partial (fewer finished than num_samples), failed (every finished
    trial errored), done."""
    if not trials:
        return CellStatus.PENDING
    finished = [t for t in trials.values() if t["status"] in FINISHED]
    if len(finished) < num_samples:
        return CellStatus.PARTIAL
    ok = (TrialStatus.TERMINATED, TrialStatus.PRUNED)
    return CellStatus.DONE if any(t["status"] in ok for t in finished) else CellStatus.FAILED


def best_run_config(cell: Cell, params: dict, sweep_dir: Path) -> dict:
    """A complete run config of a cell's trial, writing to <sweep dir>/retrain/<cell> when re-trained."""
    cfg = resolve_run_config({"run": cell.run, **params}, source=f"cell {cell.id}")
    tree = cfg.to_dict()
    tree["name"] = cell.id
    tree["runtime"]["output_dir"] = str((Path(sweep_dir) / RETRAIN_DIR).resolve())
    tree["runtime"]["run_name"] = cell.id
    tree["runtime"]["progress"] = True
    return tree


def write_best_config(path: Path, tree: dict, header: str) -> None:
    body = yaml.safe_dump(tree, sort_keys=False)
    atomic_write_text(path, "".join(f"# {line}\n" for line in header.splitlines()) + body)


def cell_record(plan: SweepPlan, cell: Cell, sweep_dir: Path) -> tuple[dict, list[dict]]:
    """cells.json entry and trials-table rows of one cell; writes best/<cell>.yaml."""
    spec = plan.spec
    trials = Manifest(manifest_path(sweep_dir, cell.id)).trials()
    for tid, t in trials.items():  # a trial that failed before its first report named no run dir
        if not t.get("run_dir"):
            t["run_dir"] = str(Path(sweep_dir) / RUNS_DIR / cell.id / tid)
    finished = {k: t for k, t in trials.items() if t["status"] in FINISHED}
    rows = [r for t in finished.values() for r in trial_rows(spec.name, cell, t)]
    rec = {**cell.summary(), "status": cell_status(trials, plan.num_samples()),
           "n_trials": len(finished), "n_failed": sum(t["status"] == TrialStatus.ERROR for t in finished.values()),
           "n_pruned": sum(t["status"] == TrialStatus.PRUNED for t in finished.values()),
           "n_running": sum(t["status"] == TrialStatus.RUNNING for t in trials.values()),
           "num_samples": plan.num_samples(), "metric": spec.search.metric, "mode": spec.search.mode,
           "best_trial": None, "best_value": None, "best_val_acc": None, "best_test_acc": None,
           "best_params": None, "best_config": None, "best_run_dir": None}
    best = select_best(finished, spec.search.metric, spec.search.mode)
    if best is not None:
        nums = trial_numbers(best)
        rel = f"{BEST_DIR}/{cell.id}.yaml"
        header = (f"best trial {best['trial_id']} of cell {cell.id} (sweep {spec.name}): "
                  f"{spec.search.metric}={best['final'][spec.search.metric]:.4f}, "
                  f"best_val_acc={nums['best_val_acc']:.4f}, test_acc={nums['test_acc']:.4f}\n"
                  f"params: {json.dumps(best['params'])}\n"
                  f"re-train: python -m calray.train {Path(sweep_dir) / rel}")
        write_best_config(Path(sweep_dir) / rel, best_run_config(cell, best["params"], sweep_dir), header)
        rec.update({"best_trial": best["trial_id"], "best_value": best["final"][spec.search.metric],
                    "best_val_acc": nums["best_val_acc"], "best_test_acc": nums["test_acc"],
                    "best_params": best["params"], "best_config": rel, "best_run_dir": nums["run_dir"]})
    return rec, rows


def write_outputs(plan: SweepPlan, sweep_dir: Path, cells: list[Cell] | None = None) -> list[dict]:
    """(Re)write cells.json, trials.parquet, trials.csv and best/*.yaml from the manifests.

    Every cell of the sweep is listed in cells.json (`pending` for cells not started yet).
    Files are written to a temporary name and renamed, so a reader never sees half a file.
    """
    import pandas as pd

    sweep_dir = Path(sweep_dir)
    records, rows = [], []
    for cell in cells or plan.cells:
        rec, cell_rows = cell_record(plan, cell, sweep_dir)
        records.append(rec)
        rows.extend(cell_rows)
    atomic_write_text(sweep_dir / CELLS_FILE, json.dumps(records, indent=2, default=_json_default) + "\n")
    df = pd.DataFrame(rows, columns=_columns(rows))
    _write_table(df, sweep_dir)
    return records


def _columns(rows: list[dict]) -> list[str]:
    head = ["sweep", "cell", "trial_id", "status", "error", "seed"]
    params = sorted({k for r in rows for k in r if k.startswith("param.")})
    tail = list(PER_TRIAL)
    seen = set(head) | set(params) | set(tail)
    metrics = []
    for r in rows:
        for k in r:
            if k not in seen:
                seen.add(k)
                metrics.append(k)
    if "epoch" in metrics:
        metrics.remove("epoch")
    return head + params + ["epoch"] + metrics + tail


def _write_table(df, sweep_dir: Path) -> None:
    import pyarrow as pa

    if "epoch" in df:
        df["epoch"] = df["epoch"].astype("Int64")
    for col in df.columns:  # a choice axis mixing types (1, "a") cannot be one Arrow column
        if df[col].dtype == object:
            kinds = {type(v) for v in df[col] if v is not None and not (isinstance(v, float) and math.isnan(v))}
            if len(kinds) > 1:
                df[col] = df[col].map(lambda v: None if v is None else str(v))
    try:
        atomic_write_bytes(sweep_dir / TRIALS_PARQUET, lambda f: df.to_parquet(f, index=False))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        df = df.astype({c: str for c in df.columns if df[c].dtype == object})
        atomic_write_bytes(sweep_dir / TRIALS_PARQUET, lambda f: df.to_parquet(f, index=False))
    atomic_write_bytes(sweep_dir / TRIALS_CSV, lambda f: f.write(df.to_csv(index=False).encode()))
