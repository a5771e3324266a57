"""The report's sections built from loaded data: overview, cells, best configs, importance,
optimisation history, robustness grid and contribution dynamics. `SECTIONS` is the outline (id,
title) every report follows; the ablation and paper sections live in calray.report.ablation and
calray.report.paper."""

from __future__ import annotations

import json

import pandas as pd
import yaml

from calray.report.cellstats import (best_trial_row, clean_retrains, param_columns, robust_summary,
                                     seed_replicates, status_counts)
from calray.report.comparison_section import selection_caption
from calray.report.document import Section
from calray.report.formatting import fmt, noise_label, num, pct, pct_mean_std, slug
from calray.report.loading import ReportData, config_value, epoch_rows, modalities_from, read_metrics_jsonl
from calray.report.plots import plot_dynamics, plot_heatmaps, plot_history, plot_importance
from calray.report.studies import compute_importance, history_points


SECTIONS = [  # (id, title) in report order; every report has all of them
    ("overview", "Overview"),
    ("cells", "Cells: best results and trial counts"),
    ("best-configs", "Best configuration per cell"),
    ("importance", "Hyper-parameter importance"),
    ("history", "Optimisation history"),
    ("robustness", "Robustness grid"),
    ("dynamics", "Contribution dynamics of the best run"),
    ("strategies", "Strategy comparison (ablations)"),
    ("paper", "The paper's reported numbers beside ours"),
]


def section_overview(data: ReportData) -> Section:
    s = Section(*SECTIONS[0])
    counts = status_counts(data.per_trial)
    rows = [["directory", str(data.root)], ["kind", data.kind], ["name", data.name],
            ["cells", len(data.cells)], ["trials", counts["trials"]],
            ["finished / failed / pruned", f"{counts['finished']} / {counts['failed']} / {counts['pruned']}"],
            ["robustness grid", "yes" if data.robustness is not None else "not run"],
            ["optuna journal", str(data.journal) if data.journal else "none"]]
    spec = data.sweep_spec or {}
    search = spec.get("search") if isinstance(spec.get("search"), dict) else {}
    for key in ("algorithm", "num_samples", "metric", "mode", "seed"):
        if key in search:
            rows.append([f"search.{key}", search[key]])
    s.table(["item", "value"], rows)
    space = search.get("space") if isinstance(search.get("space"), dict) else None
    if space:
        s.table(["searched key", "distribution"], [[k, json.dumps(v)] for k, v in space.items()],
                caption="Search space (sweep.yaml)")
    if data.kind == "run":
        s.note("A single run directory: the report covers this run alone (no search, importance or "
               "strategy comparison).")
    for n in data.notes:
        s.note(n)
    return s


def section_cells(data: ReportData) -> Section:
    s = Section(*SECTIONS[1])
    variants = any(c.record.get("variant") for c in data.cells)
    header = ["cell", "dataset", "noise"] + (["variant"] if variants else []) + [
              "status", "trials", "finished", "failed", "pruned", "best trial",
              "best val acc %", "test acc % (best trial)", "val acc % over seeds", "test acc % over seeds",
              "clean retrain test acc % (robustness)"]
    rows, problems = [], []
    for c in data.cells:
        trials = data.trials_of(c.cell)
        k = status_counts(trials)
        best = best_trial_row(data, c)
        if best is not None:
            reps = seed_replicates(data, c, best)
            row_best = [best["trial_id"], pct(best.get("best_val_acc")), pct(best.get("test_acc")),
                        pct_mean_std(reps.get("best_val_acc", [])), pct_mean_std(reps.get("test_acc", []))]
            for key, col in (("best_val_acc", "best_val_acc"), ("best_test_acc", "test_acc")):
                a, b = num(c.record.get(key)), num(best.get(col))
                if a is not None and b is not None and abs(a - b) > 1e-9:
                    problems.append(f"cell {c.cell}: cells.json {key} = {a:.6f} but the trials table gives "
                                    f"{b:.6f} for trial {best['trial_id']}; the table's value is shown.")
        else:
            row_best = ["—"] * 5
        rec_n = c.record.get("n_trials")
        if rec_n is not None and int(rec_n) != k["trials"]:
            problems.append(f"cell {c.cell}: cells.json n_trials = {rec_n}, the trials table has {k['trials']}.")
        retr = clean_retrains(data, c.cell)
        rows.append([c.cell, c.label, noise_label(c.noise)] + ([c.record.get("variant") or "—"] if variants else []) +
                    [c.record.get("status", "?"), k["trials"], k["finished"],
                     k["failed"], k["pruned"], *row_best, pct_mean_std(retr) if retr else "—"])
    s.table(header, rows, caption=selection_caption(data, "Per cell (accuracies in %; mean ± sample std over seed "
                                                              "replicates)"))
    s.p("Finished = TERMINATED, failed = ERROR, pruned = stopped by the scheduler (PRUNED). 'Over seeds' "
        "groups the trials whose searched parameters equal the best trial's and differ only in seed; "
        "'clean retrain' is the robustness grid's ε = 0 train+test retrains of the best config.")
    failed = data.per_trial[data.per_trial["status"] == "ERROR"]
    if not failed.empty:
        err_col = failed["error"] if "error" in failed.columns else pd.Series(["?"] * len(failed))
        s.table(["cell", "trial", "error"], [[r["cell"], r["trial_id"], str(e)[:200]]
                                             for (_, r), e in zip(failed.iterrows(), err_col)],
                caption="Failed trials")
    for p in problems:
        s.note(p)
    return s


def section_best_configs(data: ReportData) -> Section:
    s = Section(*SECTIONS[2])
    for c in data.cells:
        s.h3(f"{c.cell}")
        best = best_trial_row(data, c)
        params = [(k[len("param."):], best[k]) for k in param_columns(data.per_trial)
                  if best is not None and not pd.isna(best.get(k))] if best is not None else []
        if params:
            s.table(["searched parameter", "best value"], [[k, fmt(v, 5)] for k, v in params])
        if c.config is not None:
            o = c.config.get("optim") or {}
            s.table(["key", "value"], [[f"method.{k}", fmt(config_value(c.config, f"method.{k}"), 5)] for k in
                                       ("strategy", "T", "eta", "lambda", "n", "aib", "contribution")] +
                    [[f"optim.{k}", fmt(o.get(k), 5)] for k in ("name", "lr", "epochs")] +
                    [["data.dataset", (c.config.get("data") or {}).get("dataset")],
                     ["noise", noise_label(c.config.get("noise"))]])
            s.code(c.config_text or yaml.safe_dump(c.config, sort_keys=False),
                   summary=f"complete run config ({c.config_path})")
        else:
            s.note(f"cell {c.cell}: no best config file (status {c.record.get('status', '?')}).")
    return s


def section_importance(data: ReportData, studies: dict) -> Section:
    s = Section(*SECTIONS[3])
    if data.kind == "run":
        s.note("Not applicable: a single run has no search.")
        return s
    if data.journal is None:
        s.note(f"No optuna.journal in {data.root}: the persisted studies are needed for importance.")
        return s
    for c in data.cells:
        s.h3(c.cell)
        study = studies.get(c.cell)
        if study is None:
            s.note(f"no study named {c.cell!r} in {data.journal}.")
            continue
        imp, note = compute_importance(study)
        if imp is None:
            s.note(f"cell {c.cell}: {note}")
            continue
        s.table(["parameter", "importance"], [[k, f"{v:.3f}"] for k, v in imp.items()], caption=note)
        s.image(plot_importance(imp, f"{c.cell}: hyper-parameter importance"), f"importance_{slug(c.cell)}.png",
                f"Hyper-parameter importance, cell {c.cell}")
    return s


def section_history(data: ReportData, studies: dict) -> Section:
    s = Section(*SECTIONS[4])
    if data.kind == "run":
        s.note("Not applicable: a single run has no search.")
        return s
    metric = ((data.sweep_spec or {}).get("search") or {}).get("metric", "val_acc") \
        if isinstance((data.sweep_spec or {}).get("search"), dict) else "val_acc"
    for c in data.cells:
        s.h3(c.cell)
        study = studies.get(c.cell)
        if study is not None:
            direction, pts = history_points(study)
            src = f"Optuna study {c.cell!r} in {data.journal.name}"
        else:
            trials = data.trials_of(c.cell).sort_values("order")
            direction = "maximize"
            pts = [(i, num(r.get("best_val_acc")), {"TERMINATED": "COMPLETE", "ERROR": "FAIL"}.get(r["status"],
                                                                                              r["status"]))
                   for i, (_, r) in enumerate(trials.iterrows())]
            src = "the trials table (no persisted study for this cell)"
        if not pts:
            s.note(f"cell {c.cell}: no trials.")
            continue
        done = [p for p in pts if p[2] == "COMPLETE" and p[1] is not None]
        best = (max if direction == "maximize" else min)((p[1] for p in done), default=None)
        s.p(f"{len(pts)} trial(s) from {src}; objective {metric} ({direction}); best value "
            f"{fmt(best, 5)}.")
        s.image(plot_history(pts, direction, f"{c.cell}: optimisation history", metric),
                f"history_{slug(c.cell)}.png", f"Optimisation history, cell {c.cell}")
    return s


def _robust_cell_table(summary: pd.DataFrame, cell: str) -> tuple[list[str], list[list[str]]]:
    sub = summary[summary["cell"] == cell]
    eps_list = sorted(sub["eps"].unique())
    header = ["mode", "kind"] + [f"ε={e:g}" for e in eps_list]
    rows = []
    attacked = sub["attacked"].fillna("all").astype(str) if "attacked" in sub.columns else pd.Series("all", sub.index)
    several = attacked.nunique() > 1
    for mode in ("test", "train+test"):
        for kind, att in sorted(set(zip(sub[sub["mode"] == mode]["kind"], attacked[sub["mode"] == mode]))):
            cells = []
            for e in eps_list:
                r = sub[(sub["mode"] == mode) & (sub["kind"] == kind) & (attacked == att) & (sub["eps"] == e)]
                if r.empty:
                    cells.append("—")
                    continue
                r = r.iloc[0]
                std = "" if pd.isna(r["acc_std"]) else f" ± {100 * r['acc_std']:.2f}"
                fail = f", {int(r['n_failed'])} failed" if r["n_failed"] else ""
                cells.append(f"{pct(r['acc_mean'])}{std} (n={int(r['n'])}{fail})")
            rows.append([mode, f"{kind} (attacked: {att})" if several else kind] + cells)
    return header, rows


def section_robustness(data: ReportData) -> Section:
    s = Section(*SECTIONS[5])
    summary = robust_summary(data)
    if summary is None:
        s.note(f"No robustness grid in {data.root} (robustness.parquet/robustness.csv). Run "
               f"`python -m calray.robustness {data.root}` (or a sweep with a `robustness:` block).")
        return s
    s.p("Test accuracy (%) of each cell's best model under every noise kind × ε: 'test' = the checkpoint "
        "evaluated on the attacked test set (paper Table II protocol), 'train+test' = the best config retrained "
        "on attacked data and tested on attacked data (Table III protocol). Mean ± sample std over seeds "
        "(noise seeds for test, training seeds for train+test); ε = 0 is the clean test set.")
    present = list(summary["cell"].unique())
    order = [c.cell for c in data.cells if c.cell in present] + [c for c in present if c not in
                                                                 {x.cell for x in data.cells}]
    for cell in order:
        s.h3(str(cell))
        header, rows = _robust_cell_table(summary, cell)
        s.table(header, rows)
        s.image(plot_heatmaps(summary[summary["cell"] == cell], str(cell)), f"robustness_{slug(cell)}.png",
                f"Robustness heat map (noise kind × ε), cell {cell}")
    return s


def section_dynamics(data: ReportData) -> Section:
    s = Section(*SECTIONS[6])
    s.p("Per epoch of each cell's best run: fused validation accuracy beside the contributions W per "
        "modality (the paper's Fig. 3 left), unimodal validation accuracy beside the modulation weights "
        "a = softmax(T·W) (Fig. 3 right), and the AIB compression factors β.")
    for c in data.cells:
        s.h3(c.cell)
        rows, src = None, None
        if c.run_dir is not None and (c.run_dir / "metrics.jsonl").is_file():
            rows = pd.DataFrame(read_metrics_jsonl(c.run_dir / "metrics.jsonl"))
            src = str(c.run_dir / "metrics.jsonl")
        else:
            best = best_trial_row(data, c)
            if best is not None:
                t = epoch_rows(data.trials)
                rows = t[(t["cell"] == c.cell) & (t["trial_id"] == best["trial_id"])].dropna(subset=["epoch"]) \
                    if "epoch" in t.columns else None
                src = "the trials table (the best run's metrics.jsonl is missing)"
        if rows is None or rows.empty or "epoch" not in rows.columns:
            s.note(f"cell {c.cell}: no per-epoch metrics for the best run.")
            continue
        rows = rows.sort_values("epoch")
        mods = modalities_from(rows)
        s.p(f"Source: {src} ({len(rows)} epochs; modalities {', '.join(mods) or 'none found'}).")
        s.image(plot_dynamics(rows, f"{c.cell}: contribution dynamics"), f"dynamics_{slug(c.cell)}.png",
                f"Contribution dynamics of the best run, cell {c.cell}")
        last = rows.iloc[-1]
        s.table(["modality", "W (last epoch)", "a", "β", "val acc %", "train acc %"],
                [[m, fmt(last.get(f"W_{m}")), fmt(last.get(f"a_{m}")), fmt(last.get(f"beta_{m}")),
                  pct(last.get(f"val_acc_{m}")), pct(last.get(f"train_acc_{m}"))] for m in mods] +
                [["fused", "", "", "", pct(last.get("val_acc")), pct(last.get("train_acc"))]],
                caption=f"Last epoch ({int(last['epoch']) + 1})")
    return s
