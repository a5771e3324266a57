"""The robustness grid's tables: one row per target × kind × attacked × ε × mode × seed (`make_row`),
their summary (mean ± std and n per cell × kind × attacked × ε × mode: a cell's final seeds are
pooled), and the files both are saved to in the sweep or run directory (robustness.csv/.parquet,
robustness_summary.csv/.parquet, robustness_grid.json). Rows already saved for (cell, mode) pairs a
call does not recompute are kept. Tables written before the `attacked` / `final_seed` columns read
as attacked 'all', final_seed missing."""

from __future__ import annotations

import math
import time
from enum import Enum
from pathlib import Path

import pandas as pd

from calray.errors import CalrayError
from calray.io import (ROBUSTNESS_CSV, ROBUSTNESS_GRID_FILE, ROBUSTNESS_PARQUET, ROBUSTNESS_SUMMARY_CSV,
                       ROBUSTNESS_SUMMARY_PARQUET, atomic_write_bytes, write_json)
from calray.robustness.spec import ALL, GridSpec
from calray.robustness.targets import Target

ROW_COLUMNS = ["dataset", "strategy", "cell", "kind", "attacked", "eps", "mode", "seed", "final_seed", "acc",
               "macro_f1", "n", "loss", "train_seed", "noise_seed", "status", "error", "source"]
GROUP_COLUMNS = ["dataset", "strategy", "cell", "kind", "attacked", "eps", "mode"]
INT_COLUMNS = ("final_seed", "train_seed", "noise_seed", "n")


class RowStatus(str, Enum):
    """A robustness row's status (a `str`: the tables hold the plain names)."""

    OK = "ok"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


def make_row(target: Target, kind: str, eps: float, mode: str, seed: int, metrics: dict | None, *,
             train_seed: int | None, noise_seed: int | None, source: str, error: str | None = None,
             attacked: str = ALL) -> dict:
    row = {"dataset": target.dataset, "strategy": target.strategy, "cell": target.cell, "kind": kind,
           "attacked": attacked, "eps": float(eps), "mode": mode, "seed": int(seed), "final_seed": target.final_seed,
           "acc": math.nan, "macro_f1": math.nan, "n": math.nan, "loss": math.nan,
           "train_seed": train_seed, "noise_seed": noise_seed,
           "status": RowStatus.OK if error is None else RowStatus.FAILED, "error": error, "source": source}
    if metrics:
        row.update(acc=metrics["acc"], macro_f1=metrics["macro_f1"], n=metrics.get("n", math.nan),
                   loss=metrics.get("loss", math.nan))
        row.update({k: v for k, v in metrics.items() if k.startswith("acc_")})
    return row


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """mean ± std (sample std, ddof 1; NaN when n = 1) and n per cell × kind × attacked × ε × mode
    (over noise seeds, training seeds and a cell's final seeds)."""
    cols = GROUP_COLUMNS + ["acc_mean", "acc_std", "macro_f1_mean", "macro_f1_std", "n", "n_failed"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    df = with_new_columns(df)
    ok = df[df["status"] == RowStatus.OK]
    g = ok.groupby(GROUP_COLUMNS, sort=False, dropna=False)
    out = g.agg(acc_mean=("acc", "mean"), acc_std=("acc", "std"), macro_f1_mean=("macro_f1", "mean"),
                macro_f1_std=("macro_f1", "std"), n=("acc", "size")).reset_index()
    failed = (df[df["status"] != RowStatus.OK].groupby(GROUP_COLUMNS, sort=False, dropna=False).size()
              .rename("n_failed").reset_index())
    out = out.merge(failed, on=GROUP_COLUMNS, how="outer")
    out["n"] = out["n"].fillna(0).astype(int)
    out["n_failed"] = out["n_failed"].fillna(0).astype(int)
    out["_all"] = out["attacked"] != ALL  # 'all' first: a table picking one row per (kind, ε) shows it
    out = out.sort_values(["cell", "mode", "kind", "_all", "attacked", "eps"], kind="stable")
    return out[cols].reset_index(drop=True)


def with_new_columns(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with the columns older tables lack: attacked 'all', final_seed missing."""
    if "attacked" in df.columns and "final_seed" in df.columns:
        return df
    df = df.copy()
    if "attacked" not in df.columns:
        df["attacked"] = ALL
    if "final_seed" not in df.columns:
        df["final_seed"] = pd.array([None] * len(df), "Int64")
    return df


def tidy(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=ROW_COLUMNS)
    df = with_new_columns(df)
    extra = sorted(c for c in df.columns if c not in ROW_COLUMNS)
    df = df[[c for c in ROW_COLUMNS if c in df.columns] + extra]
    for c in INT_COLUMNS:
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
            df = tidy(pd.concat([keep, df], ignore_index=True).to_dict("records"))
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
        lines.append(f"  {r['cell']:<24} {r['mode']:<10} {r['kind']:<11} {r['attacked']:<8} eps={r['eps']:<5g} "
                     f"acc {mean}{std} (n={r['n']}{fail})")
    return "\n".join(lines)
