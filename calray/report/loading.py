"""Reading a sweep or run directory into `ReportData` (the cells, the trials table, one row per trial,
the Optuna journal's path, the robustness grid). Every reader names the file at fault in a
`ReportError`.

Inputs (sweep directory, the calray.sweep.runner output contract): ``cells.json``, ``trials.parquet``
(or ``trials.csv``), ``sweep.yaml``, ``optuna.journal`` (one study per cell), ``best/<cell>.yaml``,
each trial's run dir (``metrics.jsonl``, ``summary.json``, ``config.yaml``) and, when the grid was
run, ``robustness.parquet``/``robustness.csv`` (calray.robustness.grid); after a final stage,
``final.parquet``/``final.csv``, ``final.json`` and ``comparison.parquet``/``comparison.csv``
(calray.report.comparison; computed here from final.csv when the file is missing). A run directory
(``config.yaml`` + ``metrics.jsonl``/``summary.json``) is reported as a one-cell, one-trial sweep.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pandas as pd
import yaml

from calray.io import CONFIG_FILE, SUMMARY_FILE
from calray.report.comparison import comparison_of, read_comparison, read_final, read_final_spec
from calray.report.errors import ReportError
from calray.report.formatting import num
from calray.report.paper_numbers import canonical_dataset
from calray.robustness.grid import read_robustness


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
        eps = num(self.noise.get("eps")) or 0.0
        return "none" if eps == 0 else str(self.noise.get("kind") or "none")

    @property
    def eps(self) -> float:
        return 0.0 if self.noise_kind == "none" else float(num(self.noise.get("eps")) or 0.0)

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
    final: pd.DataFrame | None = None  # final.csv: the final stage's retrains, one row per (cell, seed)
    final_spec: dict | None = None  # final.json: the protocol as run
    comparison: pd.DataFrame | None = None  # comparison.csv (or computed from final.csv)
    comparison_note: str | None = None  # how the comparison was obtained, when not from comparison.csv

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


def resolve_path(root: Path, p) -> Path | None:
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
    epochs = epoch_rows(trials)
    if "epoch" in epochs.columns:
        n = epochs.dropna(subset=["epoch"]).groupby(["cell", "trial_id"], sort=False)["epoch"].nunique()
        first = first.merge(n.rename("n_epochs").reset_index(), on=["cell", "trial_id"], how="left")
    else:
        first["n_epochs"] = 0
    first["n_epochs"] = first["n_epochs"].fillna(0).astype(int)
    first["status"] = first["status"].astype(str).str.upper()
    first["order"] = range(len(first))
    return first


def epoch_rows(trials: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch rows only (a `final` summary row, when present, is not an epoch)."""
    if "final" in trials.columns:
        trials = trials[trials["final"].fillna(0).astype(float) != 1]
    return trials


def _cell_info(root: Path, rec: dict, per_trial: pd.DataFrame) -> CellInfo:
    cell = str(rec["cell"])
    cfg_path = resolve_path(root, rec.get("best_config") or f"best/{cell}.yaml")
    config, text = (None, None)
    if cfg_path is not None and cfg_path.is_file():
        config, text = _read_yaml_file(cfg_path, f"best config of cell {cell!r}")
        if not isinstance(config, dict):
            raise ReportError(f"{cfg_path}: best config of cell {cell!r} is not a mapping")
    run_dir = resolve_path(root, rec.get("best_run_dir"))
    if run_dir is None and rec.get("best_trial") is not None:
        rows = per_trial[(per_trial["cell"] == cell) & (per_trial["trial_id"] == str(rec["best_trial"]))]
        if not rows.empty and "run_dir" in rows.columns:
            run_dir = resolve_path(root, rows.iloc[0]["run_dir"])
    if config is None and run_dir is not None and (run_dir / CONFIG_FILE).is_file():
        config, text = _read_yaml_file(run_dir / CONFIG_FILE, "run config")
        cfg_path = run_dir / CONFIG_FILE
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
    name = (spec or {}).get("name") if isinstance(spec, dict) else None
    data = ReportData(kind="sweep", root=root, name=name or root.name,
                      sweep_spec=spec if isinstance(spec, dict) else None, cells=cells, trials=trials,
                      per_trial=per_trial, journal=journal if journal.is_file() else None, robustness=read_robustness(root))
    _load_final(data)
    return data


def _load_final(data: ReportData) -> None:
    """final.csv, final.json and comparison.csv of a sweep with a final stage (nothing without one)."""
    data.final = read_final(data.root)
    if data.final is None:
        return
    data.final_spec = read_final_spec(data.root)
    data.comparison = read_comparison(data.root)
    if data.comparison is None:
        data.comparison = comparison_of(data.root, data.final)
        data.comparison_note = ("comparison.csv is missing: the rows below were computed from final.csv (and "
                                "robustness.csv) by calray.report.comparison.compare for this report.")


def load_run(root: Path) -> ReportData:
    """A single run directory, shaped as a sweep with one cell and one trial."""
    config, text = _read_yaml_file(root / CONFIG_FILE, "run config")
    if not isinstance(config, dict):
        raise ReportError(f"{root / 'config.yaml'}: run config is not a mapping")
    rows = read_metrics_jsonl(root / "metrics.jsonl") if (root / "metrics.jsonl").is_file() else []
    summary = _read_json(root / SUMMARY_FILE, "run summary") if (root / SUMMARY_FILE).is_file() else {}
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
           "best_config": CONFIG_FILE, "best_run_dir": str(root)}
    per_trial = per_trial_table(trials)
    cell = _cell_info(root, rec, per_trial)
    cell.config, cell.config_text, cell.config_path = config, text, root / CONFIG_FILE
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
    if (path / CONFIG_FILE).exists():
        return load_run(path)
    raise ReportError(f"{path}: not a sweep directory (no cells.json) nor a run directory (no config.yaml)")


# ---------------------------------------------------------------- configs and metrics columns


def config_value(tree: dict | None, dotted: str):
    """The value at a dotted key of a config tree (None when absent), YAML 1.1 words undone."""
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
def run_config_cached(path: str) -> dict | None:
    """A run's config.yaml as a tree, None when unreadable (cached: ablations read one per trial)."""
    try:
        tree = yaml.safe_load(Path(path).read_text())
        return tree if isinstance(tree, dict) else None
    except (OSError, yaml.YAMLError):
        return None


def modalities_from(rows: list[dict] | pd.DataFrame) -> list[str]:
    """The modalities of per-epoch metrics rows, from their `a_<modality>` columns."""
    keys = rows.columns if isinstance(rows, pd.DataFrame) else (rows[0].keys() if rows else [])
    return [k[2:] for k in keys if k.startswith("a_")]
