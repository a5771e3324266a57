"""The paper's section: Table I (clean accuracy on CREMA-D / KS / AVE) and Tables II and III (NYU
Depth V2 / MVSA-Single under noise, test-only and train+test), every paper row prefixed "paper",
beside our rows for the cells matched to a paper dataset (calray.report.paper_numbers)."""

from __future__ import annotations

import pandas as pd

from calray.report.cellstats import best_trial_row, clean_retrains, robust_summary
from calray.report.comparison_section import selection_caption
from calray.report.document import Section
from calray.report.formatting import pct, pct_mean_std
from calray.report.loading import CellInfo, ReportData
from calray.report.paper_numbers import load_paper_numbers, paper_str
from calray.report.sections import SECTIONS


def section_paper(data: ReportData) -> Section:
    s = Section(*SECTIONS[8])
    pn = load_paper_numbers()
    tables = pn["tables"]
    labels = pn["dataset_labels"]
    s.p(f"Rows whose first column starts with 'paper' are the numbers REPORTED in the paper "
        f"({pn['source']['title']}), transcribed in calray/report/paper_numbers.yaml with their table "
        f"references; all other rows are this sweep's results. Accuracies in %.")
    matched = [c for c in data.cells if c.paper_dataset]
    if not matched:
        known = ", ".join(pn["dataset_aliases"])
        s.note(f"No cell uses a dataset the paper reports ({known}); the paper's tables are not shown. "
               f"Datasets here: {', '.join(sorted({str(c.data_dataset or c.label) for c in data.cells}))}.")
        return s
    for c in matched:
        s.p(f"Cell {c.cell} is compared as {labels[c.paper_dataset]} (matched by {c.paper_how}).")
    summary = robust_summary(data)
    shown = _table_I(s, data, tables["table_I"], labels, matched)
    for tkey in ("table_II", "table_III"):  # noise robustness on NYUD2 / MVSA-Single
        t = tables[tkey]
        for ds, block in t["datasets"].items():
            cells = [c for c in matched if c.paper_dataset == ds]
            if cells and _noise_table(s, data, t, block, labels[ds], cells, summary):
                shown = True
    if not shown:
        s.note("The matching datasets have no result in a paper table layout here (e.g. only noisy cells of an "
               "audio-visual dataset, or no robustness grid for NYUD2/MVSA-Single).")
    return s


def _paper_rows(t: dict, rows: list[dict], values) -> list[list[str]]:
    """The paper's rows of a table, labelled "paper <method>" ("(CAL)" on the paper's own method)."""
    return [[f"paper {r['method']}" + (" (CAL)" if r["method"] == t["cal_row"] else "")] + values(r) for r in rows]


def _table_I(s: Section, data: ReportData, t1: dict, labels: dict, matched: list[CellInfo]) -> bool:
    """Table I (clean accuracy on the imbalanced audio-visual sets) beside the clean matching cells;
    False (nothing shown) when there is none."""
    clean = [c for c in matched if c.paper_dataset in t1["columns"] and c.noise_kind == "none"]
    if not clean:
        return False
    ds = [d for d in t1["columns"] if any(c.paper_dataset == d for c in clean)]
    s.h3(f"{t1['ref']}: {t1['caption']}")
    header = ["method"] + [labels[d] for d in ds]
    value = lambda r: [paper_str(t1, r["values"][t1["columns"].index(d)]) for d in ds]  # noqa: E731
    by_variant = {r.get("variant"): r for r in t1["rows"]}
    ours: dict[str | None, list[list[str]]] = {}  # a paper row's variant → our rows for it
    for c in clean:
        variant = c.record.get("variant")
        ours.setdefault(variant if variant in by_variant else None, []).extend(_our_rows(data, c, ds))
    rows = []
    for r in t1["rows"]:  # each paper row, then our cells running that method (sweeps/table1_*.yaml)
        rows += _paper_rows(t1, [r], value) + ours.get(r.get("variant"), [])
    rows += ours.get(None, [])
    s.table(header, rows, caption=selection_caption(data, t1["ref"]))
    s.note(f"{t1['ref']}: {t1['notes']}")
    return True


def _our_rows(data: ReportData, c: CellInfo, ds: list[str]) -> list[list[str]]:
    """A clean cell's rows of Table I: its best trial, clean retrains (grid) and final retrains."""
    col = lambda text: [text if d == c.paper_dataset else "" for d in ds]  # noqa: E731
    best = best_trial_row(data, c)
    rows = [[f"calray {c.cell}: best trial"] + col(pct(best.get("test_acc")) if best is not None else "")]
    retr = clean_retrains(data, c.cell)
    if retr:
        rows.append([f"calray {c.cell}: clean retrains"] + col(pct_mean_std(retr)))
    fin = _final_test_accs(data, c.cell)
    if fin:
        rows.append([f"calray {c.cell}: final retrains"] + col(pct_mean_std(fin)))
    return rows


def _final_test_accs(data: ReportData, cell: str) -> list[float]:
    """The test accuracies of a cell's ok final retrains (final.csv), one per seed."""
    if data.final is None:
        return []
    f = data.final[(data.final["cell"] == cell) & (data.final["status"].astype(str) == "ok")]
    return f["test_acc"].astype(float).tolist()


def _noise_table(s: Section, data: ReportData, t: dict, block: dict, label: str, cells: list[CellInfo],
                 summary: pd.DataFrame | None) -> bool:
    """Table II or III's block for one dataset beside our rows; a note instead (and False) when we
    have no result at the table's noise settings."""
    ours = _grid_rows(t, cells, summary)
    row = _matching_best_row(data, t, cells)
    if row is not None:
        ours.append(row)
    title = f"{t['ref']}: {t['caption']} — {label}"
    if not ours:
        s.note(f"{title}: no {t['mode']}-noise result for {label} here (no finished cell with one of "
               f"the table's noise settings and no '{t['mode']}' robustness grid), so the paper's table is "
               f"not shown.")
        return False
    s.h3(title)
    header = ["method"] + [("clean ε=0" if col["kind"] == "none" else f"{col['kind']} ε={col['eps']:g}")
                           for col in t["columns"]]
    rows = _paper_rows(t, block["rows"], lambda r: [paper_str(t, v) for v in r["values"]])
    s.table(header, rows + ours, caption=selection_caption(data, f"{t['ref']} ({t['mode']} noise)")
            if row is not None else f"{t['ref']} ({t['mode']} noise)")
    s.note(f"{t['ref']}: {t['notes']}")
    return True


def _grid_rows(t: dict, cells: list[CellInfo], summary: pd.DataFrame | None) -> list[list[str]]:
    """The robustness grid of each matching cell at the table's (kind, ε) columns, mean ± std."""
    ours = []
    for c in cells:
        sub = summary[(summary["cell"] == c.cell) & (summary["mode"] == t["mode"])] \
            if summary is not None else pd.DataFrame()
        if sub.empty:
            continue
        row = [f"calray {c.cell}: robustness grid ({t['mode']}), mean ± std"]
        for col in t["columns"]:
            hit = sub[sub["eps"] == 0] if col["kind"] == "none" else \
                sub[(sub["kind"] == col["kind"]) & (sub["eps"] == float(col["eps"]))]
            if hit.empty:
                row.append("—")
                continue
            r = hit.iloc[0]
            std = "" if pd.isna(r["acc_std"]) else f" ± {100 * r['acc_std']:.2f}"
            row.append(f"{pct(r['acc_mean'])}{std} (n={int(r['n'])})")
        ours.append(row)
    return ours


def _matching_best_row(data: ReportData, t: dict, cells: list[CellInfo]) -> list[str] | None:
    """The best trial of the sweep's own cell whose noise setting is each of the table's columns;
    None when no column has one."""
    row, names = ["calray: best trial of the matching cell"], []
    for col in t["columns"]:
        hit = [c for c in cells if (c.noise_kind == "none" and col["kind"] == "none") or
               (c.noise_kind == col["kind"] and c.eps == float(col["eps"]) and c.mode == t["mode"])]
        best = best_trial_row(data, hit[0]) if hit else None
        row.append(pct(best.get("test_acc")) if best is not None else "—")
        if best is not None:
            names.append(hit[0].cell)
    if not names:
        return None
    row[0] += f" ({', '.join(names)})"
    return row
