"""The strategy comparison (ablation) section: per ablation axis (method.strategy, method.aib,
method.contribution) and per group of cells sharing a dataset and noise setting, accuracy curves
and a table per axis value, with the paper's columns (Fig. 2, Tables IV and V) when they match."""

from __future__ import annotations

import json
import math

import pandas as pd

from calray.io import CONFIG_FILE, SUMMARY_FILE
from calray.registry import AIB_MODES, CONTRIBUTIONS, FUSIONS, STRATEGIES
from calray.report.cellstats import param_columns
from calray.report.comparison_section import selection_caption
from calray.report.document import Section
from calray.report.formatting import num, pct, slug
from calray.report.loading import (CellInfo, ReportData, config_value, epoch_rows, modalities_from,
                                   resolve_path, run_config_cached)
from calray.report.paper_numbers import load_paper_numbers, paper_str
from calray.report.plots import plot_curves
from calray.report.sections import SECTIONS

ABLATION_AXES = ("method.strategy", "method.aib", "method.contribution")
AXIS_TITLES = {"method.strategy": "modulation strategy (Fig. 2)", "method.aib": "AIB mode (Table IV)",
               "method.contribution": "contribution measure (Table V)"}
AXIS_LAYOUTS = {"method.aib": "Table IV layout", "method.contribution": "Table V layout",
                "method.strategy": "Fig. 2 final accuracies"}
# an axis's values are shown in its registry's registration order (calray.registry)
AXIS_REGISTRIES = {r.key: r for r in (STRATEGIES, AIB_MODES, CONTRIBUTIONS, FUSIONS)}


def axis_values(data: ReportData) -> pd.DataFrame:
    """Per trial: the value of each ablation axis (searched param, else the trial's or cell's config)."""
    pt = data.per_trial.copy()
    cells = {c.cell: c for c in data.cells}
    for axis in ABLATION_AXES:
        col = f"param.{axis}"
        vals = []
        for _, r in pt.iterrows():
            v = r.get(col) if col in pt.columns else None
            if v is None or (isinstance(v, float) and math.isnan(v)):
                rd = resolve_path(data.root, r.get("run_dir"))
                tree = run_config_cached(str(rd / CONFIG_FILE)) if rd is not None else None
                v = config_value(tree, axis)
                if v is None and r["cell"] in cells:
                    v = config_value(cells[r["cell"]].config, axis)
            vals.append(v)
        pt[f"axis:{axis}"] = vals
    return pt


def _groups(data: ReportData) -> dict[tuple, list[CellInfo]]:
    """Cells that share a dataset and a noise setting: strategies are compared within a group."""
    out: dict[tuple, list[CellInfo]] = {}
    for c in data.cells:
        out.setdefault((c.label, c.noise_kind, c.eps, c.mode), []).append(c)
    return out


def _group_label(key: tuple) -> str:
    label, kind, eps, mode = key
    return f"{label} {'clean' if kind == 'none' else f'{kind} ε={eps:g} ({mode})'}"


def _order(axis: str, values) -> list:
    """Registered names in registration order, then any other value (and every value of an axis
    without a registry) by name."""
    known = AXIS_REGISTRIES[axis].names() if axis in AXIS_REGISTRIES else []
    return sorted(values, key=lambda v: (known.index(v) if v in known else len(known), str(v)))


def _trial_test_unimodal(data: ReportData, r: pd.Series, mods: list[str]) -> dict[str, float | None]:
    out = {m: num(r.get(f"test_acc_{m}")) for m in mods}
    if any(v is None for v in out.values()):
        rd = resolve_path(data.root, r.get("run_dir"))
        if rd is not None and (rd / SUMMARY_FILE).is_file():
            try:
                test = json.loads((rd / SUMMARY_FILE).read_text()).get("test") or {}
                out = {m: num(test.get(f"acc_{m}")) if out[m] is None else out[m] for m in mods}
            except (OSError, json.JSONDecodeError):
                pass
    return out


def section_strategies(data: ReportData) -> Section:
    s = Section(*SECTIONS[7])
    if data.kind == "run":
        s.note("Not applicable: a single run compares no strategies.")
        return s
    pt = axis_values(data)
    usable = pt[pt["status"] != "ERROR"]
    axes = [a for a in ABLATION_AXES if usable[f"axis:{a}"].dropna().astype(str).nunique() > 1]
    if not axes:
        s.note("This sweep does not compare strategies: method.strategy, method.aib and method.contribution "
               "each take a single value across its trials.")
        return s
    paper = load_paper_numbers()["tables"]
    per_epoch = epoch_rows(data.trials)
    for axis in axes:
        s.h3(f"{axis}: {AXIS_TITLES[axis]}")
        for key, cells in _groups(data).items():
            names = {c.cell for c in cells}
            g = usable[usable["cell"].isin(names)]
            values = _order(axis, g[f"axis:{axis}"].dropna().unique())
            if len(values) >= 2:
                _ablation_table(s, data, axis, key, cells, g, values, paper, per_epoch)
    return s


def _best_per_value(data: ReportData, g: pd.DataFrame, col: str, values: list, per_epoch: pd.DataFrame):
    """Per axis value, its best trial (finished ones first) and the curves of that trial's seed
    replicates: (curves by value, [(value, best, n trials, n replicates, unimodal test acc)], modalities)."""
    curves, rows, mods = {}, [], []
    for v in values:
        gv = g[g[col] == v]
        pool = gv[gv["status"] == "TERMINATED"] if (gv["status"] == "TERMINATED").any() else gv
        best = pool.loc[pool["best_val_acc"].astype(float).idxmax()] if pool["best_val_acc"].notna().any() \
            else pool.iloc[0]
        pcols = [c for c in param_columns(gv) if not c.endswith(".seed")]
        reps = gv
        for pc in pcols:
            reps = reps[(reps[pc] == best[pc]) | (reps[pc].isna() & pd.isna(best[pc]))]
        ids = set(reps["trial_id"])
        curve = per_epoch[(per_epoch["cell"] == best["cell"]) & (per_epoch["trial_id"].isin(ids))]
        curves[str(v)] = curve
        mods = mods or modalities_from(curve)
        uni = _trial_test_unimodal(data, best, mods)
        rows.append((v, best, len(gv), len(reps), uni))
    return curves, rows, mods


def _ablation_table(s: Section, data: ReportData, axis: str, key: tuple, cells: list[CellInfo], g: pd.DataFrame,
                    values: list, paper: dict, per_epoch: pd.DataFrame) -> None:
    """One group's curves and table for one axis, with the paper's columns when they match."""
    glabel = _group_label(key)
    paper_ds = next((c.paper_dataset for c in cells if c.paper_dataset), None)
    curves, rows, mods = _best_per_value(data, g, f"axis:{axis}", values, per_epoch)
    s.image(plot_curves(curves, f"{glabel}: {axis}", mods), f"curves_{slug(axis)}_{slug(glabel)}.png",
            f"Accuracy vs epoch per {axis} value, {glabel} (best trial per value; band: 95% CI over "
            f"seed replicates when there are several)")
    header = [axis, "trials", "best trial", "best val acc %", "test acc %"] + [f"test acc {m} %" for m in mods]
    body = [[str(v), n, best["trial_id"], pct(best.get("best_val_acc")), pct(best.get("test_acc"))] +
            [pct(uni.get(m)) for m in mods] for v, best, n, nrep, uni in rows]
    extra_cols, extra = paper_ablation(paper, axis, paper_ds, key, [r[0] for r in rows], mods)
    if extra_cols:
        header += extra_cols
        body = [b + e for b, e in zip(body, extra)]
    s.table(header, body, caption=selection_caption(data, f"{glabel} — {AXIS_LAYOUTS[axis]} (ours: best trial per "
                                                          f"value; columns marked 'paper' are the paper's reported "
                                                          f"numbers)"))


def paper_ablation(paper: dict, axis: str, dataset: str | None, key: tuple, values: list, mods: list[str]):
    """Paper columns for an ablation table when the dataset (and ε) match; else ([], [])."""
    _, kind, eps, mode = key
    if dataset is None:
        return [], []
    if axis == "method.aib":
        t = paper["table_IV"]
        idx = [i for i, c in enumerate(t["columns"]) if c["dataset"] == dataset and float(c["eps"]) == eps]
        if not idx:
            return [], []
        by_value = {r["value"]: r for r in t["rows"]}
        cols = [f"paper {t['ref'].split(' (')[0]} {t['columns'][i]['label']} %" for i in idx]
        return cols, [[paper_str(t, by_value[v]["values"][i]) if v in by_value else "—" for i in idx] for v in values]
    if axis == "method.contribution":
        t = paper["table_V"]
        if t["dataset"] != dataset or eps != 0:
            return [], []
        by_value = {r["value"]: r for r in t["rows"]}
        cols = [f"paper Table V {lab} %" for lab in t["column_labels"]]
        return cols, [[paper_str(t, x) for x in by_value[v]["values"]] if v in by_value else ["—"] * len(cols)
                      for v in values]
    if axis == "method.strategy":
        t = paper["fig_2"]
        if t["dataset"] != dataset or eps != 0:
            return [], []
        by_value = {r["value"]: r for r in t["rows"]}
        return ["paper Fig. 2 final acc % (prose)"], [[paper_str(t, by_value[v]["final_acc"]) if v in by_value
                                                       else "—"] for v in values]
    return [], []
