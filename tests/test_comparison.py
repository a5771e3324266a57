"""The comparison protocol's statistics (calray.report.comparison) against independent computations:
a paired t-test and its CI from the closed-form t CDF with 4 degrees of freedom, Wilcoxon's exact
p by enumerating sign flips, Holm on a known list; pairing on common ok seeds; NaN behaviour; the
robustness rows (noise seeds averaged, paired on the final seed) and robust_auc; the files."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest

from calray.report.comparison import (COLUMNS, auc_relative, compare, holm, read_comparison, write_comparison)
from calray.report.errors import ReportError

BASE = np.array([0.70, 0.72, 0.69, 0.75, 0.71])
CAL = np.array([0.74, 0.73, 0.73, 0.78, 0.70])  # d = 0.04, 0.01, 0.04, 0.03, -0.01
FINAL_COLUMNS = ["cell", "dataset", "noise", "variant", "seed", "status", "val_acc", "test_acc", "test_macro_f1",
                 "run_dir", "error"]


def final_table(values: dict[str, np.ndarray], dataset="ds", noise="none", status=None, f1_shift=-0.05):
    """A final.csv: one row per (variant, seed); `status[(variant, seed)]` = 'failed' marks failures."""
    rows = []
    for variant, vals in values.items():
        cell = f"{dataset}__{noise}__{variant}"
        for s, v in enumerate(vals):
            st = (status or {}).get((variant, s), "ok")
            ok = st == "ok" and not math.isnan(v)
            rows.append({"cell": cell, "dataset": dataset, "noise": noise, "variant": variant, "seed": s,
                         "status": st, "val_acc": v if ok else math.nan, "test_acc": v if ok else math.nan,
                         "test_macro_f1": v + f1_shift if ok else math.nan, "run_dir": f"/r/{cell}/seed{s}",
                         "error": None if ok else "TrainingError: boom"})
    return pd.DataFrame(rows, columns=FINAL_COLUMNS)


def t4_cdf(t: float) -> float:
    """Student's t CDF with ν = 4, in closed form: 1/2 + (3/4)·u·(1 − u²/3), u = t/√(4 + t²)."""
    u = t / math.sqrt(4 + t * t)
    return 0.5 + 0.75 * u * (1 - u * u / 3)


def t4_quantile(q: float) -> float:
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t4_cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def wilcoxon_exact(d) -> float:
    """Two-sided exact signed-rank p: zeros dropped, every sign assignment of the ranks enumerated."""
    d = np.asarray([x for x in d if x != 0])
    ranks = pd.Series(np.abs(d)).rank().to_numpy()
    t_obs = ranks[d > 0].sum()
    mean = ranks.sum() / 2
    sums = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(d))]
    return min(1.0, sum(abs(s - mean) >= abs(t_obs - mean) - 1e-12 for s in sums) / len(sums))


def row(df, variant, metric="test_acc", **scope):
    sel = (df["variant"] == variant) & (df["metric"] == metric)
    for k, v in scope.items():
        sel &= df[k] == v
    if not scope:
        sel &= df["kind"].isna()
    hit = df[sel]
    assert len(hit) == 1, hit
    return hit.iloc[0]


def test_holm_on_a_known_list():
    p = [0.01, 0.04, 0.03, 0.005, math.nan]
    # by hand, m = 4 (the NaN does not count): sorted 0.005, 0.01, 0.03, 0.04 → 4·0.005 = 0.02,
    # 3·0.01 = 0.03, 2·0.03 = 0.06, 1·0.04 = 0.04 → running max 0.02, 0.03, 0.06, 0.06
    out = holm(p)
    assert np.allclose(out[:4], [0.03, 0.06, 0.06, 0.02]) and math.isnan(out[4])
    assert np.allclose(holm([0.5, 0.6]), [1.0, 1.0])  # 2·0.5 = 1, capped; the next is held at the max
    assert np.allclose(holm([0.2]), [0.2]) and holm([]).shape == (0,)


def test_paired_t_ci_and_wilcoxon_against_hand_computations():
    df = compare(final_table({"concat": BASE, "cal": CAL}), "concat", ["test_acc"], 0.95)
    assert list(df.columns) == COLUMNS and len(df) == 1
    r = row(df, "cal")
    d = CAL - BASE
    n = len(d)
    mean_d = sum(d) / n
    sd_d = math.sqrt(sum((x - mean_d) ** 2 for x in d) / (n - 1))
    t = mean_d / (sd_d / math.sqrt(n))
    p = 2 * (1 - t4_cdf(abs(t)))
    half = t4_quantile(0.975) * sd_d / math.sqrt(n)
    assert r["n"] == 5 and r["test"] == "paired t" and r["baseline"] == "concat"
    assert r["delta"] == pytest.approx(mean_d, abs=1e-12)
    assert r["p_value"] == pytest.approx(p, rel=1e-6)
    assert r["ci_low"] == pytest.approx(mean_d - half, rel=1e-6) and r["ci_high"] == pytest.approx(mean_d + half, rel=1e-6)
    assert r["mean"] == pytest.approx(CAL.mean()) and r["baseline_mean"] == pytest.approx(BASE.mean())
    assert r["std"] == pytest.approx(CAL.std(ddof=1)) and r["baseline_std"] == pytest.approx(BASE.std(ddof=1))
    assert (r["wins"], r["losses"]) == (4, 1)
    assert r["p_wilcoxon"] == pytest.approx(wilcoxon_exact(d))
    assert r["p_holm"] == pytest.approx(r["p_value"])  # one row: Holm leaves it alone
    # a 90% interval is narrower, around the same delta
    r90 = row(compare(final_table({"concat": BASE, "cal": CAL}), "concat", ["test_acc"], 0.90), "cal")
    assert r90["ci_high"] - r90["ci_low"] < r["ci_high"] - r["ci_low"]


def test_wilcoxon_exact_p_is_coarse_with_five_seeds():
    """All five differences positive: the smallest two-sided exact p there is, 2/2⁵ > 0.05, while the
    paired t rejects at 0.05."""
    df = compare(final_table({"concat": BASE, "cal": BASE + np.array([0.01, 0.02, 0.03, 0.04, 0.05])}),
                 "concat", ["test_acc"], 0.95)
    r = row(df, "cal")
    assert r["p_wilcoxon"] == pytest.approx(2 / 32) and r["p_value"] < 0.05 and (r["wins"], r["losses"]) == (5, 0)


def test_pairing_uses_only_seeds_ok_in_both():
    cal = np.append(CAL, 0.9)  # an extra seed 5 the baseline does not have
    status = {("concat", 4): "failed", ("cal", 0): "failed"}
    df = compare(final_table({"concat": BASE, "cal": cal}, status=status), "concat", ["test_acc"], 0.95)
    r = row(df, "cal")
    seeds = [1, 2, 3]
    d = CAL[seeds] - BASE[seeds]
    assert r["n"] == 3 and r["delta"] == pytest.approx(d.mean())
    assert r["mean"] == pytest.approx(CAL[seeds].mean()) and r["baseline_mean"] == pytest.approx(BASE[seeds].mean())
    assert (r["wins"], r["losses"]) == (int((d > 0).sum()), int((d < 0).sum()))


def test_seeds_pair_by_seed_not_by_position():
    """Rows in a different order still pair seed s with seed s."""
    table = final_table({"concat": BASE, "cal": CAL})
    shuffled = table.sample(frac=1.0, random_state=3).reset_index(drop=True)
    a = row(compare(table, "concat", ["test_acc"], 0.95), "cal")
    b = row(compare(shuffled, "concat", ["test_acc"], 0.95), "cal")
    assert a["delta"] == pytest.approx(b["delta"]) and a["p_value"] == pytest.approx(b["p_value"])


def test_nan_behaviour_for_few_or_identical_pairs():
    status = {("one", s): "failed" for s in range(1, 5)} | {("none", s): "failed" for s in range(5)}
    df = compare(final_table({"concat": BASE, "one": CAL, "none": CAL, "same": BASE}, status=status),
                 "concat", ["test_acc"], 0.95)
    one = row(df, "one")  # n = 1: the means and the difference, no spread, no test
    assert one["n"] == 1 and one["delta"] == pytest.approx(CAL[0] - BASE[0]) and one["wins"] == 1
    assert all(math.isnan(one[c]) for c in ("std", "ci_low", "ci_high", "p_value", "p_wilcoxon", "p_holm"))
    none = row(df, "none")
    assert none["n"] == 0 and none["wins"] == none["losses"] == 0
    assert all(math.isnan(none[c]) for c in ("mean", "delta", "p_value", "p_holm"))
    same = row(df, "same")  # every difference 0: no test can say anything
    assert same["n"] == 5 and same["delta"] == 0 and (same["wins"], same["losses"]) == (0, 0)
    assert math.isnan(same["p_value"]) and math.isnan(same["p_wilcoxon"]) and math.isnan(same["p_holm"])


def test_rows_per_metric_and_group_holm_over_every_row():
    clean = final_table({"concat": BASE, "cal": CAL, "ogm": BASE + 0.01 * np.arange(5)})
    noisy = final_table({"concat": BASE - 0.1, "cal": CAL - 0.05}, noise="gaussian_eps10_test")
    other = final_table({"concat": BASE, "cal": CAL[::-1]}, dataset="av")
    solo = final_table({"cal": CAL}, dataset="nobase")  # no baseline variant here: no rows
    df = compare(pd.concat([clean, noisy, other, solo]), "concat", ["test_acc", "test_macro_f1"], 0.95)
    assert len(df) == 2 * (2 + 1 + 1) and "nobase" not in set(df["dataset"])
    assert "concat" not in set(df["variant"]) and set(df["baseline"]) == {"concat"}
    assert df["kind"].isna().all() and df["eps"].isna().all() and df["attacked"].isna().all()
    assert list(df[["dataset", "noise", "variant", "metric"]].itertuples(index=False, name=None)) == [
        ("av", "none", "cal", "test_acc"), ("av", "none", "cal", "test_macro_f1"),
        ("ds", "gaussian_eps10_test", "cal", "test_acc"), ("ds", "gaussian_eps10_test", "cal", "test_macro_f1"),
        ("ds", "none", "cal", "test_acc"), ("ds", "none", "cal", "test_macro_f1"),
        ("ds", "none", "ogm", "test_acc"), ("ds", "none", "ogm", "test_macro_f1")]
    # macro F1 is the accuracy shifted by a constant in this table: the same differences
    assert row(df, "cal", "test_macro_f1", dataset="ds", noise="none")["delta"] == pytest.approx(
        row(df, "cal", "test_acc", dataset="ds", noise="none")["delta"])
    assert np.allclose(df["p_holm"], holm(df["p_value"]), equal_nan=True)
    assert (df["p_holm"] >= df["p_value"] - 1e-15).all()


def test_bad_protocol_values_name_the_key():
    t = final_table({"concat": BASE, "cal": CAL})
    with pytest.raises(ReportError, match="final.confidence"):
        compare(t, "concat", ["test_acc"], 1.5)
    with pytest.raises(ReportError, match="final.baseline"):
        compare(t, None, ["test_acc"], 0.95)
    with pytest.raises(ReportError, match=r"lacks column\(s\) \['val_loss'\]"):
        compare(t, "concat", ["val_loss"], 0.95)


# ---------------------------------------------------------------- robustness rows

ACC = {"concat": {0: 0.70, 5: 0.60, 10: 0.40}, "cal": {0: 0.74, 5: 0.68, 10: 0.55}}


def grid_rows(final: pd.DataFrame, seeds=range(3), noise_seeds=(0, 1), attacked=None) -> pd.DataFrame:
    """Test-mode grid rows of every final run: acc(ε) + a per-seed shift ± a noise-seed wobble, and
    one classic best-trial row (final_seed NaN) that must be ignored."""
    rows = []
    for cell, variant in final[["cell", "variant"]].drop_duplicates().itertuples(index=False):
        for s in seeds:
            for eps, acc in ACC[variant].items():
                for ns in noise_seeds:
                    a = acc + 0.01 * s + (0.004 if ns else -0.004) * (eps > 0)
                    rows.append({"dataset": "ds", "strategy": variant, "cell": cell, "kind": "gaussian",
                                 "eps": float(eps), "mode": "test", "seed": ns, "acc": a, "macro_f1": a - 0.1,
                                 "status": "ok", "final_seed": float(s), "noise_seed": ns,
                                 **({"attacked": attacked} if attacked else {})})
        rows.append({"dataset": "ds", "strategy": variant, "cell": cell, "kind": "gaussian", "eps": 5.0,
                     "mode": "test", "seed": 0, "acc": 0.0, "macro_f1": 0.0, "status": "ok",
                     "final_seed": math.nan, "noise_seed": 0})
    return pd.DataFrame(rows)


def test_robustness_rows_average_noise_seeds_then_pair_on_final_seed():
    final = final_table({"concat": BASE[:3], "cal": CAL[:3]})
    rob = grid_rows(final)
    rob.loc[(rob["strategy"] == "cal") & (rob["final_seed"] == 2) & (rob["eps"] == 10) & (rob["noise_seed"] == 1),
            ["status", "acc", "macro_f1"]] = ["failed", math.nan, math.nan]
    df = compare(final, "concat", ["test_acc", "test_macro_f1"], 0.95, rob)
    r = row(df, "cal", "test_acc", kind="gaussian", eps=10.0, mode="test", attacked="all")
    assert r["n"] == 3 and r["noise"] == "none"
    # per seed: concat averages its two noise seeds (∓0.004) to 0.40 + 0.01 s; cal too, except seed 2 whose
    # only ok noise seed is noise seed 0, the −0.004 one
    cal = np.array([0.55, 0.56, 0.57 - 0.004])
    base = np.array([0.40, 0.41, 0.42])
    assert r["mean"] == pytest.approx(cal.mean()) and r["baseline_mean"] == pytest.approx(base.mean())
    assert r["delta"] == pytest.approx((cal - base).mean()) and (r["wins"], r["losses"]) == (3, 0)
    f1 = row(df, "cal", "test_macro_f1", kind="gaussian", eps=10.0, mode="test", attacked="all")
    assert f1["mean"] == pytest.approx(cal.mean() - 0.1)
    eps_rows = df[(df["kind"] == "gaussian") & (df["metric"] == "test_acc")]
    assert sorted(eps_rows["eps"].dropna()) == [0.0, 5.0, 10.0]
    r5 = row(df, "cal", "test_acc", kind="gaussian", eps=5.0, mode="test", attacked="all")
    assert r5["baseline_mean"] == pytest.approx(0.61) and r5["mean"] == pytest.approx(0.69)  # the classic rows
    # (final_seed NaN, acc 0 at ε = 5) are counted nowhere
    assert (df["p_holm"].to_numpy() >= df["p_value"].to_numpy() - 1e-15)[df["p_value"].notna()].all()


def test_robust_auc_against_a_hand_trapezoid():
    assert auc_relative([0, 5, 10], [0.8, 0.6, 0.4]) == pytest.approx(((1 + 0.75) / 2 * 5 + (0.75 + 0.5) / 2 * 5) / 10)
    assert auc_relative([10, 0, 5], [0.4, 0.8, 0.6]) == pytest.approx(0.75)  # any order
    assert math.isnan(auc_relative([5, 10], [0.6, 0.4])) and math.isnan(auc_relative([0], [0.8]))
    assert math.isnan(auc_relative([0, 5], [0.0, 0.1])) and math.isnan(auc_relative([0, 5], [0.8, math.nan]))

    final = final_table({"concat": BASE[:3], "cal": CAL[:3]})
    df = compare(final, "concat", ["test_acc"], 0.95, grid_rows(final, attacked="audio"))
    r = row(df, "cal", "robust_auc", kind="gaussian", mode="test", attacked="audio")
    assert math.isnan(r["eps"]) and r["n"] == 3

    def auc(accs):  # by hand: ε = 0, 5, 10, equal steps
        a0, a5, a10 = accs
        return ((a0 + a5) / 2 * 5 + (a5 + a10) / 2 * 5) / a0 / 10

    cal = [auc([ACC["cal"][e] + 0.01 * s for e in (0, 5, 10)]) for s in range(3)]
    base = [auc([ACC["concat"][e] + 0.01 * s for e in (0, 5, 10)]) for s in range(3)]
    assert r["mean"] == pytest.approx(np.mean(cal)) and r["baseline_mean"] == pytest.approx(np.mean(base))
    assert r["delta"] == pytest.approx(np.mean(np.subtract(cal, base))) and r["wins"] == 3
    # the robust_auc rows come after the per-ε rows of their variant
    assert list(df["metric"])[-1] == "robust_auc"


# ---------------------------------------------------------------- the sweep directory's files


def test_write_comparison_on_a_fabricated_sweep_dir(tmp_path):
    final = final_table({"concat": BASE, "cal": CAL})
    final.to_csv(tmp_path / "final.csv", index=False)
    with pytest.raises(ReportError, match="final.json"):
        write_comparison(tmp_path)
    (tmp_path / "final.json").write_text(json.dumps({
        "seeds": [0, 1, 2, 3, 4], "baseline": "concat", "metrics": ["test_acc"], "confidence": 0.9,
        "budget": {"concat": {"num_samples": 4, "space": ["optim.lr"]}}}))
    grid_rows(final, seeds=range(5)).to_csv(tmp_path / "robustness.csv", index=False)
    df = write_comparison(tmp_path)
    assert (tmp_path / "comparison.csv").is_file() and (tmp_path / "comparison.parquet").is_file()
    again = compare(final, "concat", ["test_acc"], 0.9, pd.read_csv(tmp_path / "robustness.csv"))
    pd.testing.assert_frame_equal(df, again)
    back = read_comparison(tmp_path)
    assert list(back.columns) == COLUMNS
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    csv = pd.read_csv(tmp_path / "comparison.csv")
    assert list(csv.columns) == COLUMNS and len(csv) == len(df) == 1 + 3 + 1
    assert csv["kind"].isna().iloc[0] and csv["metric"].tolist()[-1] == "robust_auc"


def test_write_comparison_without_a_final_stage(tmp_path):
    with pytest.raises(ReportError, match="no final.csv"):
        write_comparison(tmp_path)
    (tmp_path / "final.parquet").write_bytes(b"PAR1 broken")
    with pytest.raises(ReportError, match="final.parquet: corrupt"):
        write_comparison(tmp_path)


# ---------------------------------------------------------------- the report's Comparison section


def fabricated_sweep(root, with_final=True, baseline="concat", status=None):
    """A finished sweep directory without any training: cells.json and trials.csv of two variant cells
    (one trial each), plus a final stage's final.csv/final.json and the grid's final-seed rows."""
    root.mkdir(parents=True)
    final = final_table({"concat": BASE, "cal": CAL}, status=status)
    cells, trials = [], []
    for cell, variant in final[["cell", "variant"]].drop_duplicates().itertuples(index=False):
        cells.append({"cell": cell, "dataset": "ds", "variant": variant, "noise": {"kind": "none", "eps": 0.0,
                      "mode": "test"}, "status": "done", "n_trials": 1, "best_trial": f"{variant}_t0"})
        trials.append({"cell": cell, "trial_id": f"{variant}_t0", "status": "TERMINATED", "best_val_acc": 0.8,
                       "test_acc": 0.7, "run_dir": f"runs/{cell}/{variant}_t0"})
    (root / "cells.json").write_text(json.dumps(cells))
    pd.DataFrame(trials).to_csv(root / "trials.csv", index=False)
    if with_final:
        final.to_csv(root / "final.csv", index=False)
        (root / "final.json").write_text(json.dumps({
            "seeds": [0, 1, 2, 3, 4], "baseline": baseline, "metrics": ["test_acc", "test_macro_f1"],
            "confidence": 0.95, "selection": "val_acc (max) on the validation split",
            "budget": {"concat": {"num_samples": 4, "space": ["optim.lr"]},
                       "cal": {"num_samples": 4, "space": ["method.T", "optim.lr"]}}}))
    grid_rows(final, seeds=range(5)).to_csv(root / "robustness.csv", index=False)
    return final


def _md_row(md: str, *first: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[:len(first)] == list(first):
            return cells
    raise AssertionError(f"no table row starting with {first!r}")


def test_report_opens_with_the_comparison(tmp_path):
    from calray.report.render import write_report

    root = tmp_path / "sweep"
    final = fabricated_sweep(root)
    _, md_path = write_report(root)
    md = md_path.read_text()
    assert md.index("## Comparison: final retrains over paired seeds") < md.index("## Overview")
    assert "comparison.csv is missing" in md  # computed in memory: no comparison.csv was written
    comp = write_comparison(root)
    _, md_path = write_report(root)
    md = md_path.read_text()
    assert "comparison.csv is missing" not in md
    r = row(comp, "cal")
    cells = _md_row(md, "cal", "test acc")
    half = (r["ci_high"] - r["ci_low"]) / 2
    assert cells[4] == f"{100 * r['delta']:+.2f} ± {100 * half:.2f}"
    assert cells[6] == f"{r['p_value']:.4f}" and cells[7] == f"{r['p_wilcoxon']:.4f}"
    assert cells[8] == f"{r['p_holm']:.4f}" and cells[9] == "4 / 1" and cells[10] == "5"
    assert cells[2] == f"{100 * CAL.mean():.2f} ± {100 * CAL.std(ddof=1):.2f}"
    auc = row(comp, "cal", "robust_auc", kind="gaussian", mode="test", attacked="all")
    cells = _md_row(md, "cal", "test", "gaussian", "all")
    assert cells[4] == f"{auc['mean']:.3f} ± {auc['std']:.3f}" and cells[6].startswith(f"{auc['delta']:+.3f} ± ")
    assert _md_row(md, "ds", "none", "cal", "5 / 5")[5] == f"{100 * CAL.mean():.2f} ± {100 * CAL.std(ddof=1):.2f} (n=5)"
    assert _md_row(md, "cal", "4", "method.T, optim.lr")  # the budget per variant
    assert "Holm's p adjusts the paired-t p over all" in md and f"over all {len(comp)} rows" in md
    assert "cannot go below 2/2ⁿ — 0.0625 with the 5 seeds here" in md
    assert (root / "report_files" / "comparison_eps_ds_none.png").is_file()
    assert "selection results: best trial of the search, one seed, selected on validation" in md


def test_report_without_a_final_stage_is_unchanged(tmp_path):
    from calray.report.render import write_report

    root = tmp_path / "sweep"
    fabricated_sweep(root, with_final=False)
    _, md_path = write_report(root)
    md = md_path.read_text()
    assert "Comparison" not in md.split("## Overview")[0] and "## Comparison" not in md
    assert "selection results" not in md


def test_report_with_no_baseline_gives_the_estimates_only(tmp_path):
    from calray.report.render import write_report

    root = tmp_path / "sweep"
    fabricated_sweep(root, baseline=None, status={("concat", 4): "failed"})
    assert write_comparison(root).empty
    md = write_report(root)[1].read_text()
    assert "multi-seed estimates only" in md
    ok = BASE[:4]  # the failed seed is left out of the estimate and listed with its error
    assert _md_row(md, "ds", "none", "concat", "4 / 5")[5] == f"{100 * ok.mean():.2f} ± {100 * ok.std(ddof=1):.2f} (n=4)"
    assert _md_row(md, "ds__none__concat", "4", "failed", "TrainingError: boom")


def test_robustness_section_splits_rows_by_attacked():
    from calray.report.plots import plot_heatmaps
    from calray.report.sections import _robust_cell_table

    summary = pd.DataFrame([{"cell": "c", "mode": "test", "kind": "gaussian", "attacked": att, "eps": e,
                             "acc_mean": acc - e / 100, "acc_std": math.nan, "n": 1, "n_failed": 0}
                            for att, acc in (("all", 0.8), ("audio", 0.9)) for e in (0.0, 5.0)])
    header, rows = _robust_cell_table(summary, "c")
    assert header == ["mode", "kind", "ε=0", "ε=5"]
    assert rows == [["test", "gaussian (attacked: all)", "80.00 (n=1)", "75.00 (n=1)"],
                    ["test", "gaussian (attacked: audio)", "90.00 (n=1)", "85.00 (n=1)"]]
    header, rows = _robust_cell_table(summary[summary["attacked"] == "all"], "c")
    assert rows == [["test", "gaussian", "80.00 (n=1)", "75.00 (n=1)"]]
    fig = plot_heatmaps(summary, "c")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["gaussian (all)", "gaussian (audio)"]


def test_curve_bands_are_t_intervals_over_final_seeds():
    from calray.report.comparison import curve_table, robustness_means

    final = final_table({"concat": BASE[:3], "cal": CAL[:3]})
    rob = grid_rows(final)
    rob.loc[rob["strategy"] == "concat", "acc"] = 0.5  # every concat seed agrees: the band is the point
    c = curve_table(robustness_means(final, rob), 0.95)
    assert len(c) == 2 * 3 and set(c["n"]) == {3}
    r = c[(c["variant"] == "cal") & (c["eps"] == 5.0)].iloc[0]
    v = np.array([0.68, 0.69, 0.70])  # noise seeds average out; +0.01 per final seed
    # by hand: mean ± t_{0.975, 2} · s/√n, t_{0.975, 2} = 4.302652729749464 (from t_2's closed-form CDF:
    # F(t) = 1/2 + t / (2√(2 + t²)), so t = √(2·q'² / (1 − q'²)) with q' = 2·0.975 − 1)
    q = 2 * 0.975 - 1
    t2 = math.sqrt(2 * q * q / (1 - q * q))
    half = t2 * v.std(ddof=1) / math.sqrt(3)
    assert r["mean"] == pytest.approx(v.mean()) and r["ci_low"] == pytest.approx(v.mean() - half)
    assert r["ci_high"] == pytest.approx(v.mean() + half)
    flat = c[c["variant"] == "concat"]
    assert np.allclose(flat["ci_low"], 0.5) and np.allclose(flat["ci_high"], 0.5)
