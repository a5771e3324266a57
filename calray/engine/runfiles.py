"""What a run writes into its run dir besides checkpoints: config.yaml, env.json, data_info.json
and metrics.jsonl (one JSON row per epoch; resumed runs drop the rows of epochs they re-run)."""

from __future__ import annotations

import json
from pathlib import Path

from calray.config import save_config
from calray.engine.runinfo import environment
from calray.io import append_jsonl, read_jsonl, write_json, write_jsonl

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def seeds(cfg) -> dict:
    return {"runtime": cfg.runtime.seed, "data": cfg.data.seed, "noise": cfg.noise.seed}


def write_run_files(run_dir: Path, cfg, device, splits, warnings: list[str]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    write_json(run_dir / "env.json", {**environment(device), "seeds": seeds(cfg), "warnings": warnings})
    info = {"dataset": cfg.data.dataset, "modalities": splits.modalities, "num_classes": splits.num_classes,
            "class_names": splits.class_names,
            "sizes": {s: len(getattr(splits, s)) for s in ("train", "val", "test")}, **splits.info}
    write_json(run_dir / "data_info.json", info)


def truncate_metrics(run_dir: Path, keep_before: int) -> None:
    """Drop metric rows from epochs that will be re-run, so a resumed history has no repeats."""
    path = run_dir / METRICS_FILE
    if path.exists():
        write_jsonl(path, [r for r in read_jsonl(path) if r.get("epoch", -1) < keep_before])


def append_metrics(run_dir: Path, row: dict) -> None:
    append_jsonl(run_dir / METRICS_FILE, row)


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
