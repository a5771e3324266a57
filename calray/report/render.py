"""Sweep reports: one self-contained ``report.html`` (plots embedded as base64 PNG) and a
``report.md`` beside it (plots in ``report_files/``), rendered from a finished sweep directory or
a single run directory. Every number comes from the files in that directory; see docs/REPORTS.md
for what each section shows and where its numbers come from.

`python -m calray.report PATH`; `write_report(path) -> (html_path, md_path)`.

Inputs (sweep directory, the calray.sweep.runner output contract): ``cells.json``, ``trials.parquet``
(or ``trials.csv``), ``sweep.yaml``, ``optuna.journal`` (one study per cell), ``best/<cell>.yaml``,
each trial's run dir (``metrics.jsonl``, ``summary.json``, ``config.yaml``) and, when the grid was
run, ``robustness.parquet``/``robustness.csv`` (calray.robustness.grid). A run directory
(``config.yaml`` + ``metrics.jsonl``/``summary.json``) is reported as a one-cell, one-trial sweep.
The paper's numbers come from ``calray/paper_numbers.yaml`` and are always labelled as the paper's.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from calray.io import atomic_write_bytes, atomic_write_text
from calray.errors import CalrayError

PAPER_FILE = Path(__file__).with_name("paper_numbers.yaml")
MIN_TRIALS_FOR_IMPORTANCE = 4  # fewer completed trials: importance is not estimated (a note says so)
FEW_TRIALS_FOR_IMPORTANCE = 10  # below this the estimate is flagged as indicative only
ABLATION_AXES = ("method.strategy", "method.aib", "method.contribution")
AXIS_TITLES = {"method.strategy": "modulation strategy (Fig. 2)", "method.aib": "AIB mode (Table IV)",
               "method.contribution": "contribution measure (Table V)"}
AXIS_ORDER = {
    "method.strategy": ["cal", "null", "weak", "ogm_ge", "ogm_ge_mix", "none"],
    "method.aib": ["mi", "mx", "mx_mi", "inv_beta", "beta", "off"],
    "method.contribution": ["kl", "d_only", "i_only", "d_plus_i", "d_x_i"],
}
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


class ReportError(CalrayError):
    """A missing or corrupt sweep/run directory; names the path at fault."""


# ================================================================= small formatting helpers


def _num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def pct(x, digits: int = 2) -> str:
    """An accuracy in [0, 1] as a percentage string ('—' when missing)."""
    v = _num(x)
    return "—" if v is None else f"{100 * v:.{digits}f}"


def pct_mean_std(values) -> str:
    vals = [v for v in (_num(x) for x in values) if v is not None]
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{100 * vals[0]:.2f} (n=1)"
    return f"{100 * np.mean(vals):.2f} ± {100 * np.std(vals, ddof=1):.2f} (n={len(vals)})"


def fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        return f"{float(x):.{digits}g}"
    return str(x)


def noise_label(noise: dict | None) -> str:
    noise = noise or {}
    kind = noise.get("kind") or "none"
    eps = _num(noise.get("eps")) or 0.0
    if kind == "none" or eps == 0:
        return "clean"
    return f"{kind} ε={eps:g} ({noise.get('mode') or 'test'})"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "x"


# ================================================================= the document model


@dataclass
class Block:
    kind: str  # p | note | table | img | code | h3 | details
    data: Any
    extra: Any = None


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)

    def p(self, text: str) -> None:
        self.blocks.append(Block("p", text))

    def note(self, text: str) -> None:
        self.blocks.append(Block("note", text))

    def h3(self, text: str) -> None:
        self.blocks.append(Block("h3", text))

    def table(self, header: list[str], rows: list[list[Any]], caption: str | None = None) -> None:
        self.blocks.append(Block("table", (header, [[str(c) for c in r] for r in rows]), caption))

    def code(self, text: str, summary: str | None = None) -> None:
        self.blocks.append(Block("code", text, summary))

    def image(self, fig, name: str, alt: str) -> None:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        self.blocks.append(Block("img", buf.getvalue(), (name, alt)))


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{border-bottom:2px solid #446}h2{border-bottom:1px solid #aab;margin-top:2em}h3{margin-top:1.4em;color:#335}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}th,td{border:1px solid #ccd;padding:.25em .55em;
text-align:left;vertical-align:top}th{background:#eef}tr:nth-child(even) td{background:#f8f8fc}
caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0}
.note{background:#fff8e1;border-left:4px solid #e0b000;padding:.4em .8em;margin:.6em 0}
pre{background:#f4f4f8;padding:.6em;overflow-x:auto;font-size:.85em}img{max-width:100%}
nav ul{columns:2}.paper{color:#7a2a00}
"""


def render_html(title: str, sections: list[Section], subtitle: str) -> str:
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p>", "<nav><ul>"]
    out += [f"<li><a href='#{s.id}'>{html.escape(s.title)}</a></li>" for s in sections]
    out.append("</ul></nav>")
    for s in sections:
        out.append(f"<section id='{s.id}'><h2>{html.escape(s.title)}</h2>")
        for b in s.blocks:
            if b.kind == "p":
                out.append(f"<p>{html.escape(b.data)}</p>")
            elif b.kind == "note":
                out.append(f"<p class='note'>{html.escape(b.data)}</p>")
            elif b.kind == "h3":
                out.append(f"<h3>{html.escape(b.data)}</h3>")
            elif b.kind == "code":
                body = f"<pre>{html.escape(b.data)}</pre>"
                out.append(f"<details><summary>{html.escape(b.extra)}</summary>{body}</details>" if b.extra else body)
            elif b.kind == "table":
                header, rows = b.data
                cap = f"<caption>{html.escape(b.extra)}</caption>" if b.extra else ""
                head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
                body = "".join("<tr>" + "".join(
                    f"<td class='paper'>{html.escape(c)}</td>" if r and str(r[0]).startswith("paper") else
                    f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                out.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif b.kind == "img":
                name, alt = b.extra
                data = base64.b64encode(b.data).decode()
                out.append(f"<figure><img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{html.escape(alt)}</figcaption></figure>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


def _md_cell(c: str) -> str:
    return c.replace("|", "\\|").replace("\n", " ")


def render_md(title: str, sections: list[Section], subtitle: str, files_dir: Path) -> str:
    out = [f"# {title}", "", subtitle, ""]
    out += [f"- [{s.title}](#{s.id})" for s in sections]
    out.append("")
    for s in sections:
        out += [f"<a id='{s.id}'></a>", "", f"## {s.title}", ""]
        for b in s.blocks:
            if b.kind == "p":
                out += [b.data, ""]
            elif b.kind == "note":
                out += [f"> **Note:** {b.data}", ""]
            elif b.kind == "h3":
                out += [f"### {b.data}", ""]
            elif b.kind == "code":
                if b.extra:
                    out += [f"*{b.extra}:*", ""]
                out += ["```yaml", b.data.rstrip(), "```", ""]
            elif b.kind == "table":
                header, rows = b.data
                if b.extra:
                    out += [f"**{b.extra}**", ""]
                out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
                out.append("|" + "---|" * len(header))
                out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
                out.append("")
            elif b.kind == "img":
                name, alt = b.extra
                atomic_write_bytes(files_dir / name, lambda f, data=b.data: f.write(data))
                out += [f"![{alt}]({files_dir.name}/{name})", ""]
    return "\n".join(out) + "\n"


# ================================================================= the paper's numbers


@lru_cache(maxsize=1)
def load_paper_numbers() -> dict:
    """The paper's reported numbers (calray/paper_numbers.yaml), checked for shape."""
    try:
        data = yaml.safe_load(PAPER_FILE.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ReportError(f"{PAPER_FILE}: cannot read the paper's numbers ({e})") from None
    for key, t in data.get("tables", {}).items():
        ncols = len(t.get("columns", []))
        rows = t.get("rows") or [r for d in (t.get("datasets") or {}).values() for r in d["rows"]]
        for r in rows:
            if "values" in r and len(r["values"]) != ncols:
                raise ReportError(f"{PAPER_FILE}: tables.{key}: row {r} has {len(r['values'])} values "
                                  f"for {ncols} columns")
    return data


def canonical_dataset(name: str | None) -> str | None:
    if not name:
        return None
    key = str(name).strip().lower()
    for canon, aliases in load_paper_numbers()["dataset_aliases"].items():
        if key == canon or key in aliases:
            return canon
    return None


def paper_value(table: dict, value) -> float:
    """A paper number as a fraction (tables are in percent or fractions, as printed)."""
    return float(value) / 100.0 if table["unit"] == "percent" else float(value)


def paper_str(table: dict, value) -> str:
    return pct(paper_value(table, value))


# ================================================================= loading a directory


@dataclass
class CellInfo:
    cell: str
    record: dict
    label: str  # the cell's dataset label in cells.json
    data_dataset: str | None  # data.dataset of the best config
    noise: dict
    config: dict | None  # best config (complete run config)
    config_path: Path | None
    config_text: str | None
    run_dir: Path | None
    paper_dataset: str | None
    paper_how: str = ""

    @property
    def noise_kind(self) -> str:
        eps = _num(self.noise.get("eps")) or 0.0
        return "none" if eps == 0 else str(self.noise.get("kind") or "none")

    @property
    def eps(self) -> float:
        return 0.0 if self.noise_kind == "none" else float(_num(self.noise.get("eps")) or 0.0)

    @property
    def mode(self) -> str:
        return str(self.noise.get("mode") or "test")


@dataclass
class ReportData:
    kind: str  # sweep | run
    root: Path
    name: str
    sweep_spec: dict | None
    cells: list[CellInfo]
    trials: pd.DataFrame  # per (trial, epoch)
    per_trial: pd.DataFrame  # one row per trial
    journal: Path | None
    robustness: pd.DataFrame | None
    notes: list[str] = field(default_factory=list)

    def trials_of(self, cell: str) -> pd.DataFrame:
        return self.per_trial[self.per_trial["cell"] == cell]


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: corrupt {what} ({type(e).__name__}: {e})") from None


def _read_yaml_file(path: Path, what: str):
    try:
        text = path.read_text()
        return yaml.safe_load(text), text
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ReportError(f"{path}: corrupt {what} ({type(e).__name__}: {e})") from None


def read_metrics_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot read metrics ({e})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):  # a torn last line after a crash: the rows before it stand
                break
            raise ReportError(f"{path}: line {i} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ReportError(f"{path}: line {i} is not a JSON object")
        rows.append(row)
    return rows


def _resolve(root: Path, p) -> Path | None:
    if p is None or (isinstance(p, float) and math.isnan(p)) or str(p) in ("", "nan", "None"):
        return None
    path = Path(str(p))
    if path.is_absolute():
        return path
    for cand in (root / path, Path.cwd() / path):
        if cand.exists():
            return cand
    return root / path


TRIAL_REQUIRED = ("cell", "trial_id", "status")


def _read_trials(root: Path) -> tuple[pd.DataFrame, Path]:
    pq, csv = root / "trials.parquet", root / "trials.csv"
    path = pq if pq.is_file() else csv if csv.is_file() else None
    if path is None:
        raise ReportError(f"{root}: no trials.parquet or trials.csv — not a finished sweep directory")
    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as e:  # pyarrow/parser errors for a truncated or foreign file
        raise ReportError(f"{path}: corrupt trials table ({type(e).__name__}: {e})") from None
    missing = [c for c in TRIAL_REQUIRED if c not in df.columns]
    if missing:
        raise ReportError(f"{path}: trials table lacks column(s) {missing}")
    df["cell"] = df["cell"].astype(str)
    df["trial_id"] = df["trial_id"].astype(str)
    return df, path


def per_trial_table(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per trial: its per-trial columns, param.* and the number of epochs it reported."""
    if trials.empty:
        return pd.DataFrame(columns=list(trials.columns) + ["n_epochs", "order"])
    g = trials.groupby(["cell", "trial_id"], sort=False)
    first = g.first().reset_index()
    epochs = _epoch_rows(trials)
    if "epoch" in epochs.columns:
        n = epochs.dropna(subset=["epoch"]).groupby(["cell", "trial_id"], sort=False)["epoch"].nunique()
        first = first.merge(n.rename("n_epochs").reset_index(), on=["cell", "trial_id"], how="left")
    else:
        first["n_epochs"] = 0
    first["n_epochs"] = first["n_epochs"].fillna(0).astype(int)
    first["status"] = first["status"].astype(str).str.upper()
    first["order"] = range(len(first))
    return first


def _epoch_rows(trials: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch rows only (a `final` summary row, when present, is not an epoch)."""
    if "final" in trials.columns:
        trials = trials[trials["final"].fillna(0).astype(float) != 1]
    return trials


def _cell_info(root: Path, rec: dict, per_trial: pd.DataFrame) -> CellInfo:
    cell = str(rec["cell"])
    cfg_path = _resolve(root, rec.get("best_config") or f"best/{cell}.yaml")
    config, text = (None, None)
    if cfg_path is not None and cfg_path.is_file():
        config, text = _read_yaml_file(cfg_path, f"best config of cell {cell!r}")
        if not isinstance(config, dict):
            raise ReportError(f"{cfg_path}: best config of cell {cell!r} is not a mapping")
    run_dir = _resolve(root, rec.get("best_run_dir"))
    if run_dir is None and rec.get("best_trial") is not None:
        rows = per_trial[(per_trial["cell"] == cell) & (per_trial["trial_id"] == str(rec["best_trial"]))]
        if not rows.empty and "run_dir" in rows.columns:
            run_dir = _resolve(root, rows.iloc[0]["run_dir"])
    if config is None and run_dir is not None and (run_dir / "config.yaml").is_file():
        config, text = _read_yaml_file(run_dir / "config.yaml", "run config")
        cfg_path = run_dir / "config.yaml"
    label = str(rec.get("dataset") or "")
    data_dataset = ((config or {}).get("data") or {}).get("dataset")
    noise = rec.get("noise") or (config or {}).get("noise") or {}
    paper, how = canonical_dataset(data_dataset), f"data.dataset = {data_dataset}"
    if paper is None and canonical_dataset(label):
        paper = canonical_dataset(label)
        how = f"the cell's dataset label {label!r} (data.dataset = {data_dataset})"
    return CellInfo(cell=cell, record=rec, label=label or (data_dataset or "?"), data_dataset=data_dataset,
                    noise=noise, config=config, config_path=cfg_path, config_text=text, run_dir=run_dir,
                    paper_dataset=paper, paper_how=how)


def load_sweep(root: Path) -> ReportData:
    cells_raw = _read_json(root / "cells.json", "cell list")
    if not isinstance(cells_raw, list) or not all(isinstance(c, dict) and "cell" in c for c in cells_raw):
        raise ReportError(f"{root / 'cells.json'}: expected a list of cell records, each with a 'cell' key")
    trials, _ = _read_trials(root)
    per_trial = per_trial_table(trials)
    spec = None
    if (root / "sweep.yaml").is_file():
        spec, _ = _read_yaml_file(root / "sweep.yaml", "sweep file")
    cells = [_cell_info(root, rec, per_trial) for rec in cells_raw]
    journal = root / "optuna.journal"
    from calray.robustness.grid import read_robustness

    name = (spec or {}).get("name") if isinstance(spec, dict) else None
    return ReportData(kind="sweep", root=root, name=name or root.name,
                      sweep_spec=spec if isinstance(spec, dict) else None, cells=cells, trials=trials, per_trial=per_trial,
                      journal=journal if journal.is_file() else None, robustness=read_robustness(root))


def load_run(root: Path) -> ReportData:
    """A single run directory, shaped as a sweep with one cell and one trial."""
    config, text = _read_yaml_file(root / "config.yaml", "run config")
    if not isinstance(config, dict):
        raise ReportError(f"{root / 'config.yaml'}: run config is not a mapping")
    rows = read_metrics_jsonl(root / "metrics.jsonl") if (root / "metrics.jsonl").is_file() else []
    summary = _read_json(root / "summary.json", "run summary") if (root / "summary.json").is_file() else {}
    if not rows and not summary:
        raise ReportError(f"{root}: run directory has neither metrics.jsonl nor summary.json")
    name = root.name
    status = "TERMINATED" if summary else "RUNNING"
    per = {"cell": name, "trial_id": name, "status": status, "error": None,
           "seed": (config.get("runtime") or {}).get("seed"),
           "test_acc": summary.get("test_acc"), "best_val_acc": summary.get("best_val_acc"),
           "best_epoch": summary.get("best_epoch"), "run_dir": str(root)}
    trials = pd.DataFrame([{**per, **r} for r in rows] or [per])
    noise = config.get("noise") or {}
    rec = {"cell": name, "dataset": (config.get("data") or {}).get("dataset"),
           "noise": {k: noise.get(k) for k in ("kind", "eps", "mode")},
           "status": "done" if summary else "partial", "n_trials": 1, "n_failed": 0, "n_pruned": 0,
           "best_trial": name, "best_val_acc": summary.get("best_val_acc"), "best_test_acc": summary.get("test_acc"),
           "best_config": "config.yaml", "best_run_dir": str(root)}
    per_trial = per_trial_table(trials)
    cell = _cell_info(root, rec, per_trial)
    cell.config, cell.config_text, cell.config_path = config, text, root / "config.yaml"
    from calray.robustness.grid import read_robustness

    return ReportData(kind="run", root=root, name=name, sweep_spec=None, cells=[cell], trials=trials,
                      per_trial=per_trial, journal=None, robustness=read_robustness(root))


def load_directory(path: Path) -> ReportData:
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path}: no such sweep or run directory")
    if not path.is_dir():
        raise ReportError(f"{path}: not a directory (expected a sweep or run directory)")
    if (path / "cells.json").exists():
        return load_sweep(path)
    if (path / "config.yaml").exists():
        return load_run(path)
    raise ReportError(f"{path}: not a sweep directory (no cells.json) nor a run directory (no config.yaml)")


# ================================================================= per-cell numbers


def _status_counts(trials: pd.DataFrame) -> dict[str, int]:
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


def _robust_summary(data: ReportData) -> pd.DataFrame | None:
    if data.robustness is None or data.robustness.empty:
        return None
    from calray.robustness.grid import summarize

    return summarize(data.robustness)


def clean_retrains(data: ReportData, cell: str) -> list[float]:
    """Test accuracies of the clean (ε = 0) train+test retrains of a cell, one per training seed."""
    df = data.robustness
    if df is None or df.empty:
        return []
    sel = df[(df["cell"] == cell) & (df["mode"] == "train+test") & (df["eps"] == 0) & (df["status"] == "ok")]
    sel = sel.drop_duplicates(subset=["seed"])
    return sel["acc"].astype(float).tolist()


# ================================================================= plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _modalities_from(rows: list[dict] | pd.DataFrame) -> list[str]:
    keys = rows.columns if isinstance(rows, pd.DataFrame) else (rows[0].keys() if rows else [])
    return [k[2:] for k in keys if k.startswith("a_")]


def plot_dynamics(rows: pd.DataFrame, title: str):
    plt = _plt()
    mods = _modalities_from(rows)
    ep = rows["epoch"].astype(float) + 1
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    if "val_acc" in rows:
        ax.plot(ep, rows["val_acc"], "k-o", ms=3, label="fused val acc")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    for a in axes:
        _integer_x(a)
    ax2 = ax.twinx()
    for m in mods:
        if f"W_{m}" in rows:
            ax2.plot(ep, rows[f"W_{m}"], "--", label=f"W {m}")
    ax2.set_ylabel("contribution W")
    _merge_legends(ax, ax2)
    ax.set_title("fused accuracy and contribution W (Fig. 3 left)")
    ax = axes[1]
    ax2 = ax.twinx()
    for i, m in enumerate(mods):
        color = f"C{i}"
        if f"val_acc_{m}" in rows:
            ax.plot(ep, rows[f"val_acc_{m}"], "-o", ms=3, color=color, label=f"{m} val acc")
        if f"a_{m}" in rows:
            ax2.plot(ep, rows[f"a_{m}"], "--", color=color, label=f"a {m}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("unimodal accuracy")
    ax2.set_ylabel("modulation weight a")
    _merge_legends(ax, ax2)
    ax.set_title("unimodal accuracy and a (Fig. 3 right)")
    ax = axes[2]
    for i, m in enumerate(mods):
        if f"beta_{m}" in rows:
            ax.plot(ep, rows[f"beta_{m}"], "-", color=f"C{i}", label=f"β {m}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("AIB compression β")
    ax.legend(fontsize=8)
    ax.set_title("AIB compression factor β")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _merge_legends(ax, ax2) -> None:
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    if h1 or h2:
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="best")


def plot_importance(imp: dict[str, float], title: str):
    plt = _plt()
    names = list(imp)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1.2))
    ax.barh(names, [imp[n] for n in names], color="C0")
    ax.set_xlabel("importance")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_history(points: list[tuple[int, float, str]], direction: str, title: str, ylabel: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    styles = {"COMPLETE": ("o", "C0"), "PRUNED": ("x", "C7")}
    for state, (marker, color) in styles.items():
        pts = [(n, v) for n, v, s in points if s == state and v is not None]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=color, label=state.lower(), zorder=3)
    failed = [n for n, v, s in points if s == "FAIL" or (s not in styles and v is None)]
    if failed:  # no value: marked on the bottom edge
        ax.scatter(failed, [0.02] * len(failed), marker="v", color="C3", transform=ax.get_xaxis_transform(),
                   label="failed / no value", zorder=3, clip_on=False)
    best, xs, ys = None, [], []
    for n, v, s in sorted(points):
        if s == "COMPLETE" and v is not None:
            best = v if best is None else (max(best, v) if direction == "maximize" else min(best, v))
        if best is not None:
            xs.append(n)
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="C1", label="best so far")
    _integer_x(ax)
    ax.set_xlabel("trial number")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_heatmaps(summary: pd.DataFrame, cell: str):
    plt = _plt()
    modes = [m for m in ("test", "train+test") if (summary["mode"] == m).any()]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 3.2), squeeze=False, layout="constrained")
    vals = summary["acc_mean"].astype(float)
    vmin, vmax = float(np.nanmin(vals)), float(np.nanmax(vals))
    im = None
    for ax, mode in zip(axes[0], modes):
        sub = summary[summary["mode"] == mode]
        piv = sub.pivot_table(index="kind", columns="eps", values="acc_mean", aggfunc="first")
        mat = piv.to_numpy(dtype=float)
        im = ax.imshow(mat, cmap="viridis", vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1e-6, aspect="auto")
        ax.set_xticks(range(len(piv.columns)), [f"{e:g}" for e in piv.columns])
        ax.set_yticks(range(len(piv.index)), list(piv.index))
        ax.set_xlabel("ε")
        ax.set_title(f"{cell}: {mode} (Table {'II' if mode == 'test' else 'III'} protocol)")
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                if not math.isnan(mat[i, j]):
                    ax.text(j, i, f"{100 * mat[i, j]:.1f}", ha="center", va="center",
                            color="white" if mat[i, j] < (vmin + vmax) / 2 else "black", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), label="mean test accuracy")
    return fig


def plot_curves(curves: dict[str, pd.DataFrame], title: str, mods: list[str]):
    """Accuracy vs epoch per axis value (mean over seed replicates, 95% CI band when n ≥ 2)."""
    plt = _plt()
    ncol = 2 if mods else 1
    fig, axes = plt.subplots(1, ncol, figsize=(6.5 * ncol, 4), squeeze=False)
    for a in axes[0]:
        _integer_x(a)
    ax = axes[0][0]
    for i, (label, df) in enumerate(curves.items()):
        _band(ax, df, "val_acc", f"C{i}", label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("fused val accuracy")
    ax.set_title("fused accuracy vs epoch (Fig. 2 left)")
    ax.legend(fontsize=8)
    if mods:
        ax = axes[0][1]
        for i, (label, df) in enumerate(curves.items()):
            for j, m in enumerate(mods):
                _band(ax, df, f"val_acc_{m}", f"C{i}", f"{label} {m}", ls=["-", "--", ":", "-."][j % 4])
        ax.set_xlabel("epoch")
        ax.set_ylabel("unimodal val accuracy")
        ax.set_title("unimodal accuracy vs epoch (Fig. 2 right)")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _band(ax, df: pd.DataFrame, col: str, color: str, label: str, ls: str = "-") -> None:
    if col not in df.columns:
        return
    g = df.dropna(subset=["epoch", col]).groupby("epoch")[col]
    mean, std, n = g.mean(), g.std(), g.size()
    x = mean.index.to_numpy(dtype=float) + 1
    ax.plot(x, mean.to_numpy(), ls, color=color, label=label + (f" (n={int(n.max())})" if n.max() > 1 else ""))
    if n.max() > 1:
        half = 1.96 * (std / np.sqrt(n)).fillna(0).to_numpy()
        ax.fill_between(x, mean.to_numpy() - half, mean.to_numpy() + half, color=color, alpha=0.2)


# ================================================================= sections


def section_overview(data: ReportData) -> Section:
    s = Section(*SECTIONS[0])
    counts = _status_counts(data.per_trial)
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
        k = _status_counts(trials)
        best = best_trial_row(data, c)
        if best is not None:
            reps = seed_replicates(data, c, best)
            row_best = [best["trial_id"], pct(best.get("best_val_acc")), pct(best.get("test_acc")),
                        pct_mean_std(reps.get("best_val_acc", [])), pct_mean_std(reps.get("test_acc", []))]
            for key, col in (("best_val_acc", "best_val_acc"), ("best_test_acc", "test_acc")):
                a, b = _num(c.record.get(key)), _num(best.get(col))
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
    s.table(header, rows, caption="Per cell (accuracies in %; mean ± sample std over seed replicates)")
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
            s.table(["key", "value"], [[f"method.{k}", fmt(_config_value(c.config, f"method.{k}"), 5)] for k in
                                       ("strategy", "T", "eta", "lambda", "n", "aib", "contribution")] +
                    [[f"optim.{k}", fmt(o.get(k), 5)] for k in ("name", "lr", "epochs")] +
                    [["data.dataset", (c.config.get("data") or {}).get("dataset")],
                     ["noise", noise_label(c.config.get("noise"))]])
            s.code(c.config_text or yaml.safe_dump(c.config, sort_keys=False),
                   summary=f"complete run config ({c.config_path})")
        else:
            s.note(f"cell {c.cell}: no best config file (status {c.record.get('status', '?')}).")
    return s


def _load_study(journal: Path, cell: str):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    try:
        storage = JournalStorage(JournalFileBackend(str(journal)))
    except Exception as e:
        raise ReportError(f"{journal}: corrupt Optuna journal ({type(e).__name__}: {e})") from None
    names = [st.study_name for st in storage.get_all_studies()]
    if cell not in names:
        return None
    return optuna.load_study(study_name=cell, storage=storage)


def _studies(data: ReportData) -> dict[str, Any]:
    if data.journal is None:
        return {}
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return {c.cell: _load_study(data.journal, c.cell) for c in data.cells}


def compute_importance(study) -> tuple[dict[str, float] | None, str]:
    """(importances, note). Importances are None, with the reason, when they cannot be estimated."""
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return None, (f"{len(complete)} completed trial(s): too few for a meaningful importance estimate "
                      f"(needs ≥ {MIN_TRIALS_FOR_IMPORTANCE}).")
    varied = sorted({k for t in complete for k in t.params
                     if len({json.dumps(u.params.get(k), default=str) for u in complete}) > 1})
    if not varied:
        return None, "no searched parameter varies across the completed trials."
    target, note = None, ""
    if len(study.directions) > 1:
        target, note = (lambda t: t.values[0]), " Multi-objective study: importance of the first objective."
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            imp = optuna.importance.get_param_importances(study, target=target)
    except Exception as e:  # noqa: BLE001 — the evaluator's own reason goes into the report
        return None, f"importance could not be computed ({type(e).__name__}: {e})."
    msgs = [str(w.message) for w in caught if "importance" in str(w.message).lower()]
    if any("too small" in m for m in msgs):
        return None, f"Optuna: {msgs[0]}"
    if len(complete) < FEW_TRIALS_FOR_IMPORTANCE:
        note += f" Only {len(complete)} completed trials: indicative only."
    return dict(imp), (f"PED-ANOVA (Optuna {optuna.__version__} default evaluator) over {len(complete)} "
                       f"completed trials." + note)


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
        s.image(plot_importance(imp, f"{c.cell}: hyper-parameter importance"), f"importance_{_slug(c.cell)}.png",
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
            import optuna

            direction = "maximize" if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else "minimize"
            pts = []
            for t in study.trials:
                v = t.values[0] if t.values else (t.intermediate_values[max(t.intermediate_values)]
                                                  if t.intermediate_values else None)
                pts.append((t.number, v, t.state.name))
            src = f"Optuna study {c.cell!r} in {data.journal.name}"
        else:
            trials = data.trials_of(c.cell).sort_values("order")
            direction = "maximize"
            pts = [(i, _num(r.get("best_val_acc")), {"TERMINATED": "COMPLETE", "ERROR": "FAIL"}.get(r["status"],
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
                f"history_{_slug(c.cell)}.png", f"Optimisation history, cell {c.cell}")
    return s


def _robust_cell_table(summary: pd.DataFrame, cell: str) -> tuple[list[str], list[list[str]]]:
    sub = summary[summary["cell"] == cell]
    eps_list = sorted(sub["eps"].unique())
    header = ["mode", "kind"] + [f"ε={e:g}" for e in eps_list]
    rows = []
    for mode in ("test", "train+test"):
        for kind in sorted(sub[sub["mode"] == mode]["kind"].unique()):
            cells = []
            for e in eps_list:
                r = sub[(sub["mode"] == mode) & (sub["kind"] == kind) & (sub["eps"] == e)]
                if r.empty:
                    cells.append("—")
                    continue
                r = r.iloc[0]
                std = "" if pd.isna(r["acc_std"]) else f" ± {100 * r['acc_std']:.2f}"
                fail = f", {int(r['n_failed'])} failed" if r["n_failed"] else ""
                cells.append(f"{pct(r['acc_mean'])}{std} (n={int(r['n'])}{fail})")
            rows.append([mode, kind] + cells)
    return header, rows


def section_robustness(data: ReportData) -> Section:
    s = Section(*SECTIONS[5])
    summary = _robust_summary(data)
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
        s.image(plot_heatmaps(summary[summary["cell"] == cell], str(cell)), f"robustness_{_slug(cell)}.png",
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
                t = _epoch_rows(data.trials)
                rows = t[(t["cell"] == c.cell) & (t["trial_id"] == best["trial_id"])].dropna(subset=["epoch"]) \
                    if "epoch" in t.columns else None
                src = "the trials table (the best run's metrics.jsonl is missing)"
        if rows is None or rows.empty or "epoch" not in rows.columns:
            s.note(f"cell {c.cell}: no per-epoch metrics for the best run.")
            continue
        rows = rows.sort_values("epoch")
        mods = _modalities_from(rows)
        s.p(f"Source: {src} ({len(rows)} epochs; modalities {', '.join(mods) or 'none found'}).")
        s.image(plot_dynamics(rows, f"{c.cell}: contribution dynamics"), f"dynamics_{_slug(c.cell)}.png",
                f"Contribution dynamics of the best run, cell {c.cell}")
        last = rows.iloc[-1]
        s.table(["modality", "W (last epoch)", "a", "β", "val acc %", "train acc %"],
                [[m, fmt(last.get(f"W_{m}")), fmt(last.get(f"a_{m}")), fmt(last.get(f"beta_{m}")),
                  pct(last.get(f"val_acc_{m}")), pct(last.get(f"train_acc_{m}"))] for m in mods] +
                [["fused", "", "", "", pct(last.get("val_acc")), pct(last.get("train_acc"))]],
                caption=f"Last epoch ({int(last['epoch']) + 1})")
    return s


# ---------------------------------------------------------------- ablations


def _config_value(tree: dict | None, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return _yaml_word(dotted, node)


def _yaml_word(dotted: str, v):
    """YAML 1.1 reads the strategy `null` as None and the AIB mode `off` as False: undo that."""
    if dotted == "method.strategy" and v is None:
        return "null"
    if dotted == "method.aib" and v is False:
        return "off"
    return v


@lru_cache(maxsize=4096)
def _run_config_cached(path: str) -> dict | None:
    try:
        tree = yaml.safe_load(Path(path).read_text())
        return tree if isinstance(tree, dict) else None
    except (OSError, yaml.YAMLError):
        return None


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
                rd = _resolve(data.root, r.get("run_dir"))
                tree = _run_config_cached(str(rd / "config.yaml")) if rd is not None else None
                v = _config_value(tree, axis)
                if v is None and r["cell"] in cells:
                    v = _config_value(cells[r["cell"]].config, axis)
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
    known = AXIS_ORDER.get(axis, [])
    return sorted(values, key=lambda v: (known.index(v) if v in known else len(known), str(v)))


def _trial_test_unimodal(data: ReportData, r: pd.Series, mods: list[str]) -> dict[str, float | None]:
    out = {m: _num(r.get(f"test_acc_{m}")) for m in mods}
    if any(v is None for v in out.values()):
        rd = _resolve(data.root, r.get("run_dir"))
        if rd is not None and (rd / "summary.json").is_file():
            try:
                test = json.loads((rd / "summary.json").read_text()).get("test") or {}
                out = {m: _num(test.get(f"acc_{m}")) if out[m] is None else out[m] for m in mods}
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
    epoch_rows = _epoch_rows(data.trials)
    for axis in axes:
        s.h3(f"{axis}: {AXIS_TITLES[axis]}")
        col = f"axis:{axis}"
        for key, cells in _groups(data).items():
            names = {c.cell for c in cells}
            g = usable[usable["cell"].isin(names)]
            values = _order(axis, g[col].dropna().unique())
            if len(values) < 2:
                continue
            glabel = _group_label(key)
            paper_ds = next((c.paper_dataset for c in cells if c.paper_dataset), None)
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
                curve = epoch_rows[(epoch_rows["cell"] == best["cell"]) & (epoch_rows["trial_id"].isin(ids))]
                curves[str(v)] = curve
                mods = mods or _modalities_from(curve)
                uni = _trial_test_unimodal(data, best, mods)
                rows.append((v, best, len(gv), len(reps), uni))
            s.image(plot_curves(curves, f"{glabel}: {axis}", mods), f"curves_{_slug(axis)}_{_slug(glabel)}.png",
                    f"Accuracy vs epoch per {axis} value, {glabel} (best trial per value; band: 95% CI over "
                    f"seed replicates when there are several)")
            header = [axis, "trials", "best trial", "best val acc %", "test acc %"] + [f"test acc {m} %" for m in mods]
            body = [[str(v), n, best["trial_id"], pct(best.get("best_val_acc")), pct(best.get("test_acc"))] +
                    [pct(uni.get(m)) for m in mods] for v, best, n, nrep, uni in rows]
            extra_cols, extra = _paper_ablation(paper, axis, paper_ds, key, [r[0] for r in rows], mods)
            if extra_cols:
                header += extra_cols
                body = [b + e for b, e in zip(body, extra)]
            layout = {"method.aib": "Table IV layout", "method.contribution": "Table V layout",
                      "method.strategy": "Fig. 2 final accuracies"}[axis]
            s.table(header, body, caption=f"{glabel} — {layout} (ours: best trial per value; columns marked "
                                          f"'paper' are the paper's reported numbers)")
    return s


def _paper_ablation(paper: dict, axis: str, dataset: str | None, key: tuple, values: list, mods: list[str]):
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


# ---------------------------------------------------------------- paper comparison (Tables I–III)


def section_paper(data: ReportData) -> Section:
    s = Section(*SECTIONS[8])
    pn = load_paper_numbers()
    tables = pn["tables"]
    labels = pn["dataset_labels"]
    s.p(f"Rows whose first column starts with 'paper' are the numbers REPORTED in the paper "
        f"({pn['source']['title']}), transcribed in calray/paper_numbers.yaml with their table references; "
        f"all other rows are this sweep's results. Accuracies in %.")
    matched = [c for c in data.cells if c.paper_dataset]
    if not matched:
        known = ", ".join(pn["dataset_aliases"])
        s.note(f"No cell uses a dataset the paper reports ({known}); the paper's tables are not shown. "
               f"Datasets here: {', '.join(sorted({str(c.data_dataset or c.label) for c in data.cells}))}.")
        return s
    for c in matched:
        s.p(f"Cell {c.cell} is compared as {labels[c.paper_dataset]} (matched by {c.paper_how}).")
    summary = _robust_summary(data)

    # Table I: clean accuracy on the imbalanced audio-visual sets
    t1 = tables["table_I"]
    clean = [c for c in matched if c.paper_dataset in t1["columns"] and c.noise_kind == "none"]
    if clean:
        ds = [d for d in t1["columns"] if any(c.paper_dataset == d for c in clean)]
        s.h3(f"{t1['ref']}: {t1['caption']}")
        header = ["method"] + [labels[d] for d in ds]
        rows = [[f"paper {r['method']}" + (" (CAL)" if r["method"] == t1["cal_row"] else "")] +
                [paper_str(t1, r["values"][t1["columns"].index(d)]) for d in ds] for r in t1["rows"]]
        for c in clean:
            best = best_trial_row(data, c)
            rows.append([f"calray {c.cell}: best trial"] + [pct(best.get("test_acc")) if best is not None and
                                                            d == c.paper_dataset else "" for d in ds])
            retr = clean_retrains(data, c.cell)
            if retr:
                rows.append([f"calray {c.cell}: clean retrains"] + [pct_mean_std(retr) if d == c.paper_dataset
                                                                     else "" for d in ds])
        s.table(header, rows, caption=t1["ref"])
        s.note(f"{t1['ref']}: {t1['notes']}")

    # Tables II and III: noise robustness on NYUD2 / MVSA-Single
    shown = bool(clean)
    for tkey in ("table_II", "table_III"):
        t = tables[tkey]
        for ds, block in t["datasets"].items():
            cells = [c for c in matched if c.paper_dataset == ds]
            if not cells:
                continue
            ours = []
            for c in cells:  # the robustness grid of each matching cell, at the table's columns
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
            # the sweep's own cells whose noise setting is one of the table's columns
            row, names = ["calray: best trial of the matching cell"], []
            for col in t["columns"]:
                hit = [c for c in cells if (c.noise_kind == "none" and col["kind"] == "none") or
                       (c.noise_kind == col["kind"] and c.eps == float(col["eps"]) and c.mode == t["mode"])]
                best = best_trial_row(data, hit[0]) if hit else None
                row.append(pct(best.get("test_acc")) if best is not None else "—")
                if best is not None:
                    names.append(hit[0].cell)
            if names:
                row[0] += f" ({', '.join(names)})"
                ours.append(row)
            title = f"{t['ref']}: {t['caption']} — {labels[ds]}"
            if not ours:
                s.note(f"{title}: no {t['mode']}-noise result for {labels[ds]} here (no finished cell with one of "
                       f"the table's noise settings and no '{t['mode']}' robustness grid), so the paper's table is "
                       f"not shown.")
                continue
            shown = True
            s.h3(title)
            header = ["method"] + [("clean ε=0" if col["kind"] == "none" else f"{col['kind']} ε={col['eps']:g}")
                                   for col in t["columns"]]
            rows = [[f"paper {r['method']}" + (" (CAL)" if r["method"] == t["cal_row"] else "")] +
                    [paper_str(t, v) for v in r["values"]] for r in block["rows"]]
            s.table(header, rows + ours, caption=f"{t['ref']} ({t['mode']} noise)")
            s.note(f"{t['ref']}: {t['notes']}")
    if not shown:
        s.note("The matching datasets have no result in a paper table layout here (e.g. only noisy cells of an "
               "audio-visual dataset, or no robustness grid for NYUD2/MVSA-Single).")
    return s


# ================================================================= entry points


def build_sections(data: ReportData) -> list[Section]:
    studies = _studies(data) if data.kind == "sweep" else {}
    return [section_overview(data), section_cells(data), section_best_configs(data),
            section_importance(data, studies), section_history(data, studies), section_robustness(data),
            section_dynamics(data), section_strategies(data), section_paper(data)]


def write_report(sweep_dir: Path) -> tuple[Path, Path]:
    """Render report.html (self-contained) and report.md (+ report_files/) in `sweep_dir`."""
    root = Path(sweep_dir)
    data = load_directory(root)
    sections = build_sections(data)
    title = f"calray {data.kind} report: {data.name}"
    subtitle = f"Rendered {time.strftime('%Y-%m-%d %H:%M:%S')} from {root.resolve()}."
    files_dir = root / "report_files"
    if files_dir.is_dir():
        for old in files_dir.glob("*.png"):
            old.unlink()
    html_path, md_path = root / "report.html", root / "report.md"
    atomic_write_text(md_path, render_md(title, sections, subtitle, files_dir))
    atomic_write_text(html_path, render_html(title, sections, subtitle))
    return html_path, md_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m calray.report",
                                description="Render report.html and report.md for a sweep or run directory.")
    p.add_argument("path", help="sweep directory (cells.json, trials.parquet, ...) or run directory")
    args = p.parse_args(argv)
    try:
        html_path, md_path = write_report(Path(args.path))
    except CalrayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {html_path}\nwrote {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
