"""The comparison protocol's statistics (issue 14): every variant against the baseline variant, per
dataset × noise, over the final stage's retrains paired by seed.

Input: ``final.csv`` (one row per cell × seed, written by the sweep's final stage; docs/SWEEPS.md) and, when the grid
evaluated the final runs, ``robustness.csv`` rows carrying a ``final_seed``. Output:
``comparison.csv`` / ``comparison.parquet``, one row per (dataset, noise, variant ≠ baseline,
metric, and robustness kind/ε/mode/attacked — empty for the clean final runs), columns `COLUMNS`.

The statistics, all from scipy.stats:

- pairing: seed s of a variant pairs with seed s of the baseline in the same dataset × noise; a
  seed counts (n) only where both runs are ok and both values finite.
- delta = the mean of the paired differences d_s = variant_s − baseline_s; ci_low/ci_high = the
  t-interval of the mean paired difference (``ttest_rel(...).confidence_interval(confidence)``).
- p_value = the two-sided paired t-test (``ttest_rel``), the `test` column says "paired t". It is
  the reported test because with the few seeds a final stage affords, Wilcoxon's exact two-sided
  p cannot go below 2/2ⁿ (0.0625 at n = 5): it could never reject at 0.05. ``p_wilcoxon``
  (``wilcoxon``, exact for small n without ties; zero differences dropped, scipy's default) is
  reported beside it; NaN when every difference is 0.
- p_holm = Holm's step-down adjustment of p_value over EVERY row of the file (scipy.stats has only
  the false-discovery-rate ``false_discovery_control``, not Holm's family-wise correction).
- wins / losses = seeds where the variant is above / below the baseline (ties count as neither).
- n < 2: std, CI and p are NaN (a t-test needs two pairs); n = 0 leaves the means NaN too.

Robustness rows: per (cell's dataset, noise, variant, kind, ε, mode, attacked, final seed) the
noise seeds' ok rows are averaged first, then paired on the final seed; ``acc`` is compared as
``test_acc`` and ``macro_f1`` as ``test_macro_f1``. ``robust_auc`` (ε empty) is a per-seed summary
per (kind, mode, attacked): the area under acc(ε)/acc(0) over the grid's ε values (trapezoid rule),
divided by the ε range — 1 means no loss under noise, 0.5 a linear fall to zero. A seed missing
any ε of its group's grid (or with acc(0) = 0) has no value; a group whose grid lacks ε = 0 or has
a single ε has no robust_auc row.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import integrate, stats

from calray.io import (COMPARISON_CSV, COMPARISON_PARQUET, FINAL_CSV, FINAL_JSON, FINAL_PARQUET,
                       atomic_write_bytes)
from calray.report.errors import ReportError
from calray.robustness.grid import read_robustness

COLUMNS = ["dataset", "noise", "variant", "baseline", "metric", "kind", "eps", "mode", "attacked", "n", "mean",
           "std", "baseline_mean", "baseline_std", "delta", "ci_low", "ci_high", "p_value", "p_holm", "wins",
           "losses", "test", "p_wilcoxon"]
SCOPE = ["kind", "eps", "mode", "attacked"]  # a robustness row's setting; empty for the clean final runs
ROBUST_METRICS = {"test_acc": "acc", "test_macro_f1": "macro_f1"}  # final.csv metric -> robustness column
ROBUST_AUC = "robust_auc"
DEFAULT_METRICS = ["test_acc", "test_macro_f1"]
TEST_NAME = "paired t"
# the long table every comparison is computed from: one value per (group, variant, seed)
LONG = ["dataset", "noise", "variant", "metric", *SCOPE, "seed", "value"]


def holm(p) -> np.ndarray:
    """Holm's step-down adjusted p-values; NaN entries stay NaN and do not count in m.

    Sorted ascending, p_(i) becomes max_{j ≤ i} min(1, (m − j + 1) · p_(j)) (i, j from 1)."""
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if m:
        order = ok[np.argsort(p[ok], kind="stable")]
        out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


def paired_stats(x, y, confidence: float) -> dict:
    """Variant values `x` against baseline values `y`, paired by position (the same seeds)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    d = x - y
    n = len(d)
    out = {"n": n, "mean": math.nan, "std": math.nan, "baseline_mean": math.nan, "baseline_std": math.nan,
           "delta": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan,
           "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "test": TEST_NAME, "p_wilcoxon": math.nan}
    if n == 0:
        return out
    out.update(mean=float(x.mean()), baseline_mean=float(y.mean()), delta=float(d.mean()))
    if n < 2:
        return out
    out.update(std=float(x.std(ddof=1)), baseline_std=float(y.std(ddof=1)))
    with warnings.catch_warnings():  # identical pairs: scipy warns and returns NaN, which is the answer
        warnings.simplefilter("ignore", RuntimeWarning)
        t = stats.ttest_rel(x, y)
        ci = t.confidence_interval(confidence_level=confidence)
        out.update(ci_low=float(ci.low), ci_high=float(ci.high), p_value=float(t.pvalue))
        if np.any(d != 0):
            out["p_wilcoxon"] = float(stats.wilcoxon(x, y).pvalue)
    return out


def _check(baseline, metrics, confidence) -> None:
    if not isinstance(baseline, str) or not baseline:
        raise ReportError(f"final.baseline: expected a variant name, got {baseline!r}")
    if not metrics or not all(isinstance(m, str) for m in metrics):
        raise ReportError(f"final.metrics: expected a list of metric names, got {metrics!r}")
    if not isinstance(confidence, (int, float)) or not 0 < float(confidence) < 1:
        raise ReportError(f"final.confidence: expected a number in (0, 1), got {confidence!r}")


def final_values(final: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """final.csv as the long table: one value per (dataset, noise, variant, metric, seed); NaN where
    the run failed. The clean final runs have no kind/ε/mode/attacked."""
    missing = [c for c in ["dataset", "noise", "variant", "seed", "status", *metrics] if c not in final.columns]
    if missing:
        raise ReportError(f"final table lacks column(s) {missing}")
    ok = final["status"].astype(str) == "ok"
    parts = []
    for m in metrics:
        part = final[["dataset", "noise", "variant", "seed"]].copy()
        part["metric"] = m
        part["value"] = pd.to_numeric(final[m], errors="coerce").where(ok)
        parts.append(part)
    out = pd.concat(parts, ignore_index=True)
    for c in SCOPE:
        out[c] = None if c != "eps" else math.nan
    return out[LONG]


def robustness_means(final: pd.DataFrame, robustness: pd.DataFrame | None) -> pd.DataFrame:
    """The grid's rows of the final runs averaged over noise seeds: one row per (dataset, noise,
    variant, kind, ε, mode, attacked, seed = final seed) with acc, macro_f1 (NaN when no noise seed
    was ok) and n_noise_seeds (the ok ones). Empty without final-seed rows."""
    cols = ["dataset", "noise", "variant", *SCOPE, "seed", "acc", "macro_f1", "n_noise_seeds"]
    if robustness is None or robustness.empty or "final_seed" not in robustness.columns:
        return pd.DataFrame(columns=cols)
    rob = robustness[pd.to_numeric(robustness["final_seed"], errors="coerce").notna()].copy()
    cells = final[["cell", "dataset", "noise", "variant"]].drop_duplicates("cell")
    rob = rob.drop(columns=[c for c in ("dataset", "noise", "variant") if c in rob.columns])
    rob = rob.merge(cells, on="cell", how="inner")
    if rob.empty:
        return pd.DataFrame(columns=cols)
    rob["attacked"] = rob["attacked"].fillna("all").astype(str) if "attacked" in rob.columns else "all"
    rob["seed"] = pd.to_numeric(rob["final_seed"]).astype(int)
    rob["eps"] = rob["eps"].astype(float)
    ok = rob["status"].astype(str) == "ok"
    for c in ("acc", "macro_f1"):
        rob[c] = pd.to_numeric(rob[c], errors="coerce").where(ok)
    rob["n_noise_seeds"] = rob["acc"].notna().astype(int)
    keys = ["dataset", "noise", "variant", *SCOPE, "seed"]
    out = rob.groupby(keys, sort=True, dropna=False).agg(
        acc=("acc", "mean"), macro_f1=("macro_f1", "mean"), n_noise_seeds=("n_noise_seeds", "sum")).reset_index()
    return out[cols]


def robustness_values(means: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """The noise-seed means as the long table, for the metrics the grid has (acc, macro_f1)."""
    parts = []
    for m in metrics:
        if m in ROBUST_METRICS and not means.empty:
            part = means[["dataset", "noise", "variant", *SCOPE, "seed"]].copy()
            part["metric"] = m
            part["value"] = means[ROBUST_METRICS[m]].astype(float)
            parts.append(part)
    return pd.concat(parts, ignore_index=True)[LONG] if parts else pd.DataFrame(columns=LONG)


def auc_relative(eps, acc) -> float:
    """∫ acc(ε)/acc(0) dε / (ε_max − ε_min) by the trapezoid rule over the given ε (ε_min must be 0)."""
    eps, acc = np.asarray(eps, dtype=float), np.asarray(acc, dtype=float)
    order = np.argsort(eps)
    eps, acc = eps[order], acc[order]
    if len(eps) < 2 or eps[0] != 0 or not np.all(np.isfinite(acc)) or acc[0] == 0:
        return math.nan
    return float(integrate.trapezoid(acc / acc[0], eps) / (eps[-1] - eps[0]))


def robust_auc_values(means: pd.DataFrame) -> pd.DataFrame:
    """robust_auc per (dataset, noise, variant, kind, mode, attacked, seed) as the long table. The ε
    grid of a (dataset, noise, kind, mode, attacked) group is the union over its variants and seeds;
    a seed without a finite acc at every one of them gets NaN."""
    rows = []
    if means.empty:
        return pd.DataFrame(columns=LONG)
    group = ["dataset", "noise", "kind", "mode", "attacked"]
    for key, g in means.groupby(group, sort=True, dropna=False):
        grid = np.sort(g["eps"].unique())
        if len(grid) < 2 or grid[0] != 0:
            continue
        for (variant, seed), s in g.groupby(["variant", "seed"], sort=True):
            acc = s.groupby("eps")["acc"].mean().reindex(grid)
            rows.append({**dict(zip(group, key)), "variant": variant, "seed": seed, "metric": ROBUST_AUC,
                         "eps": math.nan, "value": auc_relative(grid, acc.to_numpy())})
    return pd.DataFrame(rows, columns=LONG) if rows else pd.DataFrame(columns=LONG)


def compare_long(long: pd.DataFrame, baseline: str, confidence: float) -> list[dict]:
    """Per group (everything but variant and seed), each variant ≠ baseline against the baseline,
    over the seeds where both have a finite value."""
    rows = []
    keys = ["dataset", "noise", "metric", *SCOPE]
    for key, g in long.groupby(keys, sort=False, dropna=False):
        base = g[g["variant"] == baseline].dropna(subset=["value"]).groupby("seed")["value"].first()
        if g["variant"].eq(baseline).sum() == 0:
            continue
        for variant, gv in g[g["variant"] != baseline].groupby("variant", sort=True):
            vals = gv.dropna(subset=["value"]).groupby("seed")["value"].first()
            seeds = sorted(set(vals.index) & set(base.index))
            st = paired_stats(vals.loc[seeds].to_numpy(), base.loc[seeds].to_numpy(), confidence)
            rows.append({**dict(zip(keys, key)), "variant": variant, "baseline": baseline, **st})
    return rows


def _sorted(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Clean rows, then per-ε robustness rows, then robust_auc, per dataset/noise/variant."""
    part = np.where(df["kind"].isna(), 0, np.where(df["metric"] == ROBUST_AUC, 2, 1))
    order = {m: i for i, m in enumerate([*metrics, ROBUST_AUC])}
    df = df.assign(_part=part, _m=df["metric"].map(order).fillna(len(order)))
    df = df.sort_values(["dataset", "noise", "variant", "_part", "kind", "mode", "attacked", "eps", "_m"],
                        kind="stable", na_position="first")
    return df.drop(columns=["_part", "_m"]).reset_index(drop=True)


def compare(final: pd.DataFrame, baseline: str, metrics: list[str], confidence: float,
            robustness: pd.DataFrame | None = None) -> pd.DataFrame:
    """The comparison rows (columns `COLUMNS`) of a final stage's table and, optionally, its grid."""
    _check(baseline, metrics, confidence)
    means = robustness_means(final, robustness)
    long = pd.concat([x for x in (final_values(final, metrics), robustness_values(means, metrics),
                                  robust_auc_values(means)) if not x.empty] or [pd.DataFrame(columns=LONG)],
                     ignore_index=True)
    rows = compare_long(long, baseline, float(confidence))
    df = pd.DataFrame(rows, columns=COLUMNS)
    if df.empty:
        return df
    df = _sorted(df, list(metrics))
    df["p_holm"] = holm(df["p_value"].to_numpy(dtype=float))
    for c in ("n", "wins", "losses"):
        df[c] = df[c].astype(int)
    for c in ("eps", "mean", "std", "baseline_mean", "baseline_std", "delta", "ci_low", "ci_high", "p_value",
              "p_holm", "p_wilcoxon"):
        df[c] = df[c].astype(float)
    return df[COLUMNS]


def curve_table(means: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """Accuracy vs ε per variant over the final seeds (noise seeds averaged first): mean and the
    t-interval of the mean (``ttest_1samp(...).confidence_interval``, n − 1 degrees of freedom;
    NaN for n < 2; the mean itself when the seeds agree exactly)."""
    cols = ["dataset", "noise", "variant", "kind", "mode", "attacked", "eps", "n", "mean", "ci_low", "ci_high"]
    rows = []
    keys = cols[:7]
    for key, g in (means.groupby(keys, sort=True, dropna=False) if not means.empty else []):
        v = g["acc"].dropna().to_numpy(dtype=float)
        lo = hi = math.nan
        if len(v) >= 2:
            with warnings.catch_warnings():  # identical values: scipy warns, the interval is the point
                warnings.simplefilter("ignore", RuntimeWarning)
                lo, hi = stats.ttest_1samp(v, 0.0).confidence_interval(confidence_level=confidence)
        rows.append({**dict(zip(keys, key)), "n": len(v), "mean": float(v.mean()) if len(v) else math.nan,
                     "ci_low": float(lo), "ci_high": float(hi)})
    return pd.DataFrame(rows, columns=cols)


# ---------------------------------------------------------------- the sweep directory's files


def _read_table(root: Path, parquet: str, csv: str, what: str) -> pd.DataFrame | None:
    pq, cs = root / parquet, root / csv
    path = pq if pq.is_file() else cs if cs.is_file() else None
    if path is None:
        return None
    try:
        return pd.read_parquet(path) if path == pq else pd.read_csv(path)
    except Exception as e:  # pyarrow / parser errors on a truncated or foreign file
        raise ReportError(f"{path}: corrupt {what} ({type(e).__name__}: {e})") from None


def read_final(root: Path) -> pd.DataFrame | None:
    """final.parquet (else final.csv) of a sweep directory; None when the final stage has not run."""
    return _read_table(Path(root), FINAL_PARQUET, FINAL_CSV, "final-stage table")


def read_final_spec(root: Path) -> dict:
    """final.json: the protocol as run (seeds, baseline, metrics, confidence, budget)."""
    path = Path(root) / FINAL_JSON
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: missing — the final stage writes it beside final.csv") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: corrupt final-stage record ({type(e).__name__}: {e})") from None
    if not isinstance(spec, dict) or "baseline" not in spec:
        raise ReportError(f"{path}: expected an object with a 'baseline' key")
    return spec


def read_comparison(root: Path) -> pd.DataFrame | None:
    """comparison.parquet (else comparison.csv); None when absent."""
    return _read_table(Path(root), COMPARISON_PARQUET, COMPARISON_CSV, "comparison table")


def comparison_of(root: Path, final: pd.DataFrame | None = None) -> pd.DataFrame:
    """The comparison of a sweep directory's final stage (final.csv, final.json, robustness.csv); no
    rows when final.json's baseline is null (multi-seed estimates only, nothing to compare with)."""
    root = Path(root)
    final = read_final(root) if final is None else final
    if final is None:
        raise ReportError(f"{root}: no {FINAL_CSV} — the sweep has no final stage (a `final:` block)")
    spec = read_final_spec(root)
    if spec["baseline"] is None:
        return pd.DataFrame(columns=COLUMNS)
    return compare(final, spec["baseline"], spec.get("metrics") or DEFAULT_METRICS,
                   spec.get("confidence", 0.95), read_robustness(root))


def write_comparison(sweep_dir: Path) -> pd.DataFrame:
    """Write comparison.csv and comparison.parquet in `sweep_dir` (atomically); returns the rows."""
    root = Path(sweep_dir)
    df = comparison_of(root)
    atomic_write_bytes(root / COMPARISON_CSV, lambda f: f.write(df.to_csv(index=False).encode()))
    atomic_write_bytes(root / COMPARISON_PARQUET, lambda f: df.to_parquet(f, index=False))
    return df
