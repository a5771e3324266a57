"""Helpers shared by the Tables II–III robust-fusion baseline tests (tmc, qmf, …): a one-epoch CLI run
of configs/<dataset>.yaml on the NYUD2 / MVSA-Single fixtures (real layouts, tiny images, tiny BERT)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from calray.config import load_config
from calray.train import main as train_main
from tests.test_data_e2e import CONFIGS, fixture_overrides


def fixture_cli_run(tmp: Path, dataset: str, extra: dict) -> tuple[dict, list[dict], object]:
    """`python -m calray.train configs/<dataset>.yaml --set …` for 1 epoch of 2 steps; (summary, rows, cfg)."""
    sets = {**fixture_overrides(dataset, tmp), "runtime.max_steps_per_epoch": 2, "optim.grad_accum": 1,
            "runtime.tensorboard": False, **extra}
    args = [str(CONFIGS / f"{dataset}.yaml")]
    for key, value in sets.items():
        args += ["--set", f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]
    assert train_main(args) == 0
    cfg = load_config(CONFIGS / f"{dataset}.yaml", sets)
    run_dir = cfg.run_dir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return json.loads((run_dir / "summary.json").read_text()), rows, cfg
