"""Per-cell numbers picked out of loaded data: trial status counts, the best trial, its seed
replicates, the clean retrains and the summary of the robustness grid."""

from __future__ import annotations

import math

import pandas as pd

from calray.report.loading import CellInfo, ReportData
from calray.robustness.grid import summarize


def status_counts(trials: pd.DataFrame) -> dict[str, int]:
    s = trials["status"] if not trials.empty else pd.Series([], dtype=str)
    finished, failed, pruned = int((s == "TERMINATED").sum()), int((s == "ERROR").sum()), int((s == "PRUNED").sum())
    return {"trials": len(s), "finished": finished, "failed": failed, "pruned": pruned,
            "other": len(s) - finished - failed - pruned}


def param_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("param.")]


def best_trial_row(data: ReportData, cell: CellInfo) -> pd.Series | None:
    """The cell's best trial: cells.json's best_trial, else the best val accuracy of a usable trial."""
    trials = data.trials_of(cell.cell)
    if trials.empty:
        return None
    best = cell.record.get("best_trial")
    if best is not None:
        hit = trials[trials["trial_id"] == str(best)]
        if not hit.empty:
            return hit.iloc[0]
    usable = trials[trials["status"] != "ERROR"]
    if usable.empty or "best_val_acc" not in usable.columns or usable["best_val_acc"].isna().all():
        return None
    return usable.loc[usable["best_val_acc"].astype(float).idxmax()]


def seed_replicates(data: ReportData, cell: CellInfo, best: pd.Series) -> pd.DataFrame:
    """Trials of the cell with the best trial's parameters (differing only in seed), not failed."""
    trials = data.trials_of(cell.cell)
    trials = trials[trials["status"] != "ERROR"]
    cols = [c for c in param_columns(trials) if not c.endswith(".seed")]
    if not cols:
        return trials[trials["trial_id"] == best["trial_id"]]
    mask = pd.Series(True, index=trials.index)
    for c in cols:
        v = best.get(c)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            mask &= trials[c].isna()
        else:
            mask &= trials[c] == v
    return trials[mask]


def robust_summary(data: ReportData) -> pd.DataFrame | None:
    """The robustness grid summarised per (cell, mode, kind, ε); None when no grid was run."""
    if data.robustness is None or data.robustness.empty:
        return None
    return summarize(data.robustness)


def clean_retrains(data: ReportData, cell: str) -> list[float]:
    """Test accuracies of the clean (ε = 0) train+test retrains of a cell, one per training seed."""
    df = data.robustness
    if df is None or df.empty:
        return []
    sel = df[(df["cell"] == cell) & (df["mode"] == "train+test") & (df["eps"] == 0) & (df["status"] == "ok")]
    sel = sel.drop_duplicates(subset=["seed"])
    return sel["acc"].astype(float).tolist()
