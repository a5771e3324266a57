"""What a run writes into its run dir besides checkpoints: config.yaml, env.json, data_info.json,
metrics.jsonl (one JSON row per epoch; resumed runs drop the rows of epochs they re-run),
summary.json and TensorBoard events (calray.engine.tensorboard)."""

from __future__ import annotations

import json
from pathlib import Path

from calray.config import save_config
from calray.engine.runinfo import environment
from calray.engine.tensorboard import TensorBoardLog
from calray.io import (CONFIG_FILE, DATA_INFO_FILE, ENV_FILE, METRICS_FILE, SUMMARY_FILE, append_jsonl, read_jsonl,
                       write_json, write_jsonl)


def seeds(cfg) -> dict:
    return {"runtime": cfg.runtime.seed, "data": cfg.data.seed, "noise": cfg.noise.seed}


def write_run_files(run_dir: Path, cfg, device, splits, warnings: list[str]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG_FILE)
    write_json(run_dir / ENV_FILE, {**environment(device), "seeds": seeds(cfg), "warnings": warnings})
    info = {"dataset": cfg.data.dataset, "modalities": splits.modalities, "num_classes": splits.num_classes,
            "class_names": splits.class_names,
            "sizes": {s: len(getattr(splits, s)) for s in ("train", "val", "test")}, **splits.info}
    write_json(run_dir / DATA_INFO_FILE, info)


def truncate_metrics(run_dir: Path, keep_before: int) -> None:
    """Drop metric rows from epochs that will be re-run, so a resumed history has no repeats."""
    path = run_dir / METRICS_FILE
    if path.exists():
        write_jsonl(path, [r for r in read_jsonl(path) if r.get("epoch", -1) < keep_before])


def append_metrics(run_dir: Path, row: dict) -> None:
    append_jsonl(run_dir / METRICS_FILE, row)


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / SUMMARY_FILE).read_text())


class RunRecorder:
    """What the main rank writes into the run dir: the run files when the run starts, one metrics
    row (and its TensorBoard scalars, `runtime.tensorboard`) per epoch, summary.json at the end.
    On other ranks every method does nothing."""

    def __init__(self, run_dir: Path, cfg, main: bool):
        self.run_dir, self.cfg, self.main = Path(run_dir), cfg, main
        self.tensorboard: TensorBoardLog | None = None

    def start(self, device, splits, warnings: list[str], start_epoch: int) -> None:
        if not self.main:
            return
        write_run_files(self.run_dir, self.cfg, device, splits, warnings)
        truncate_metrics(self.run_dir, start_epoch)
        if self.cfg.runtime.tensorboard:
            self.tensorboard = TensorBoardLog(self.run_dir, self.cfg)

    def epoch(self, row: dict) -> None:
        if self.main:
            append_metrics(self.run_dir, row)
            if self.tensorboard is not None:
                self.tensorboard.epoch(row)

    def finish(self, summary: dict) -> None:
        if self.main:
            write_json(self.run_dir / SUMMARY_FILE, summary)
            if self.tensorboard is not None:
                self.tensorboard.close(summary)
