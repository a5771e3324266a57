"""The report's Comparison section (issue 14), first in a sweep report whose sweep ran a final stage:
the protocol as run (final.json), the search budget per variant, the final retrains' multi-seed
estimates (final.csv), and per dataset × noise every variant against the baseline — Δ ± the
t-interval's half-width, p (paired t), Wilcoxon's p, Holm's p, wins/losses, n — for the clean
final runs, the robustness summary score (robust_auc) and the grid's per-ε rows
(comparison.csv, calray.report.comparison), with accuracy-vs-ε curves per variant and t-interval
bands over the final seeds."""

from __future__ import annotations

import pandas as pd

from calray.report.comparison import ROBUST_AUC, curve_table, robustness_means
from calray.report.document import Section
from calray.report.formatting import fmt, num, pct_mean_std, slug
from calray.report.loading import ReportData
from calray.report.plots import plot_eps_curves

COMPARISON = ("comparison", "Comparison: final retrains over paired seeds")
METRIC_LABELS = {"test_acc": "test acc", "test_macro_f1": "test macro-F1", ROBUST_AUC: "robust AUC (rel. to clean)"}


def _value(x, metric: str, signed: bool = False) -> str:
    """A metric value: accuracies in % (differences in percentage points), robust_auc as a ratio."""
    v = num(x)
    if v is None:
        return "—"
    sign = "+" if signed else ""
    return f"{v:{sign}.3f}" if metric == ROBUST_AUC else f"{100 * v:{sign}.2f}"


def _mean_std(mean, std, metric: str) -> str:
    if num(mean) is None:
        return "—"
    return _value(mean, metric) + ("" if num(std) is None else f" ± {_value(std, metric)}")


def _delta(r: pd.Series) -> str:
    """Δ ± the half-width of the CI (the t-interval is symmetric about Δ)."""
    d = _value(r["delta"], r["metric"], signed=True)
    if num(r["ci_low"]) is None or num(r["ci_high"]) is None:
        return d
    return f"{d} ± {_value((r['ci_high'] - r['ci_low']) / 2, r['metric'])}"


def _ci(r: pd.Series) -> str:
    if num(r["ci_low"]) is None:
        return "—"
    return f"[{_value(r['ci_low'], r['metric'], True)}, {_value(r['ci_high'], r['metric'], True)}]"


def _p(x) -> str:
    v = num(x)
    return "—" if v is None else ("< 0.0001" if v < 1e-4 else f"{v:.4f}")


def _stats(r: pd.Series) -> list[str]:
    return [_delta(r), _ci(r), _p(r["p_value"]), _p(r["p_wilcoxon"]), _p(r["p_holm"]),
            f"{int(r['wins'])} / {int(r['losses'])}", str(int(r["n"]))]


STAT_HEADER = ["Δ ± CI half-width", "CI of Δ", "p (paired t)", "p (Wilcoxon)", "p (Holm)", "wins / losses", "n"]


def _protocol(s: Section, data: ReportData) -> None:
    spec = data.final_spec or {}
    conf = float(spec.get("confidence", 0.95))
    seeds = spec.get("seeds", sorted(data.final["seed"].unique().tolist()))
    n_rows = 0 if data.comparison is None else len(data.comparison)
    s.p(f"Each cell's best configuration, selected on validation ({spec.get('selection', 'the search metric')}), "
        f"was retrained once per seed {seeds} (training and data seed; the same seeds in every cell, so runs pair "
        f"across variants) and each retrain tested at its best-validation epoch. Per dataset × noise, every variant "
        f"is compared with the baseline {spec.get('baseline')!r} over the seeds where both retrains finished: "
        f"Δ is the mean of the per-seed differences (variant − baseline; accuracies in percentage points), ± the "
        f"half-width of the {100 * conf:g}% t-interval of that mean; p is the two-sided paired t-test (reported "
        f"because Wilcoxon's exact two-sided p cannot go below 2/2ⁿ — {2 / 2 ** len(seeds):.4g} with the "
        f"{len(seeds)} seeds here); Wilcoxon's "
        f"signed-rank p is shown beside it; Holm's p adjusts the paired-t p over all {n_rows} rows of "
        f"comparison.csv; wins / losses count the seeds where the variant is above / below the baseline.")
    if data.comparison_note:
        s.note(data.comparison_note)
    budget = spec.get("budget") or {}
    if budget:
        s.table(["variant", "trials searched (num_samples)", "searched keys"],
                [[v, b.get("num_samples", "—"), ", ".join(b.get("space") or []) or "(none)"]
                 for v, b in sorted(budget.items())],
                caption="Search budget per variant (equal trials; each variant searches only its own keys)")


def _final_runs(s: Section, final: pd.DataFrame) -> None:
    rows = []
    for (ds, noise, variant), g in final.groupby(["dataset", "noise", "variant"], sort=True):
        ok = g[g["status"].astype(str) == "ok"]
        rows.append([ds, noise, variant, f"{len(ok)} / {len(g)}", pct_mean_std(ok["val_acc"]),
                     pct_mean_std(ok["test_acc"]), pct_mean_std(ok["test_macro_f1"])])
    s.table(["dataset", "noise", "variant", "ok / runs", "val acc %", "test acc %", "test macro-F1 %"], rows,
            caption="Final retrains per variant: mean ± sample std (n) over the ok seeds")
    bad = final[final["status"].astype(str) != "ok"]
    if not bad.empty:
        s.table(["cell", "seed", "status", "error"],
                [[r["cell"], r["seed"], r["status"], str(r.get("error"))[:200]] for _, r in bad.iterrows()],
                caption="Final retrains that did not finish (left out of the pairing)")


def _clean_table(s: Section, sub: pd.DataFrame, baseline: str) -> None:
    clean = sub[sub["kind"].isna()]
    if clean.empty:
        return
    s.table(["variant", "metric", "variant mean ± std", f"{baseline} mean ± std"] + STAT_HEADER,
            [[r["variant"], METRIC_LABELS.get(r["metric"], r["metric"]), _mean_std(r["mean"], r["std"], r["metric"]),
              _mean_std(r["baseline_mean"], r["baseline_std"], r["metric"])] + _stats(r) for _, r in clean.iterrows()],
            caption=f"Final retrains, clean test set: each variant vs {baseline} (paired by seed)")


def _robust_tables(s: Section, sub: pd.DataFrame, baseline: str) -> None:
    auc = sub[sub["metric"] == ROBUST_AUC]
    if not auc.empty:
        s.table(["variant", "mode", "kind", "attacked", "variant mean ± std", f"{baseline} mean ± std"] + STAT_HEADER,
                [[r["variant"], r["mode"], r["kind"], r["attacked"], _mean_std(r["mean"], r["std"], ROBUST_AUC),
                  _mean_std(r["baseline_mean"], r["baseline_std"], ROBUST_AUC)] + _stats(r)
                 for _, r in auc.iterrows()],
                caption="Robustness summary: area under accuracy-vs-ε relative to clean (trapezoid over the grid's "
                        "ε, divided by the ε range; 1 = no loss), per final seed, vs the baseline")
    per_eps = sub[sub["kind"].notna() & (sub["metric"] != ROBUST_AUC)]
    if not per_eps.empty:
        s.table(["variant", "metric", "mode", "kind", "attacked", "ε", "variant mean", f"{baseline} mean"] + STAT_HEADER,
                [[r["variant"], METRIC_LABELS.get(r["metric"], r["metric"]), r["mode"], r["kind"], r["attacked"],
                  fmt(r["eps"]), _value(r["mean"], r["metric"]), _value(r["baseline_mean"], r["metric"])] + _stats(r)
                 for _, r in per_eps.iterrows()],
                caption="Robustness grid of the final runs (noise seeds averaged per final seed, then paired on it)")


def section_comparison(data: ReportData) -> Section:
    s = Section(*COMPARISON)
    _protocol(s, data)
    _final_runs(s, data.final)
    spec = data.final_spec or {}
    baseline = spec.get("baseline")
    if baseline is None:
        s.note("final.baseline is not set: the final stage gives multi-seed estimates only, no variant is "
               "compared with another.")
        return s
    conf = float(spec.get("confidence", 0.95))
    comp = data.comparison if data.comparison is not None else pd.DataFrame()
    curves = curve_table(robustness_means(data.final, data.robustness), conf)
    for (ds, noise), g in data.final.groupby(["dataset", "noise"], sort=True):
        s.h3(f"{ds} · noise {noise}")
        if not (g["variant"] == baseline).any():
            s.note(f"no {baseline!r} variant in {ds} · {noise}: nothing to compare with here.")
            continue
        sub = comp[(comp["dataset"] == ds) & (comp["noise"] == noise)] if not comp.empty else comp
        if sub.empty:
            s.note(f"{ds} · {noise}: no variant besides the baseline {baseline!r}.")
            continue
        _clean_table(s, sub, baseline)
        _robust_tables(s, sub, baseline)
        c = curves[(curves["dataset"] == ds) & (curves["noise"] == noise)]
        if not c.empty:
            s.image(plot_eps_curves(c, f"{ds} · {noise}", conf), f"comparison_eps_{slug(ds)}_{slug(noise)}.png",
                    f"Accuracy vs ε per variant, {ds} · noise {noise}: mean over final seeds (noise seeds "
                    f"averaged first), band = {100 * conf:g}% t-interval of the mean")
    return s


def selection_caption(data: ReportData, caption: str) -> str:
    """A single-trial table's caption, labelled as a selection result when a comparison exists."""
    if data.final is None:
        return caption
    return f"{caption} — selection results: best trial of the search, one seed, selected on validation — not " \
           f"the comparison (see '{COMPARISON[1]}')"


def has_comparison(data: ReportData) -> bool:
    """A sweep whose final stage ran (final.csv): its report opens with the Comparison section."""
    return data.kind == "sweep" and data.final is not None
