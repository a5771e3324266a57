"""Helpers shared by the Table I baseline tests (tests/test_baseline_*.py): plain-SGD tiny configs, one
step of the loop on a known batch, parameter deltas, and a CLI run."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from calray.config import save_config
from calray.engine.trainer import Trainer
from calray.train import main as train_main


def sgd_tree(**method) -> dict:
    """tiny_cfg sections for plain SGD (no momentum, no weight decay: a step moves θ by −lr·g)."""
    return {"method": {"strategy": "none", "aib": "off", **method},
            "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "epochs": 1}}


def first_batch(trainer: Trainer):
    inputs, labels, *_ = next(iter(trainer.train_loader))
    return inputs, labels


def step_delta(trainer: Trainer, inputs, labels, epoch: int = 0, step: int = 0) -> dict[str, torch.Tensor]:
    """θ_after − θ_before of one train_step, by parameter name."""
    model = trainer.raw_model
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    trainer.train_step(inputs, labels, epoch=epoch, step=step)
    return {k: p.detach() - before[k] for k, p in model.named_parameters()}


def branch(name: str) -> str | None:
    """The modality whose branch (encoder / AIB head) a parameter belongs to, else None (shared)."""
    for prefix in ("encoders.", "aib_heads."):
        if name.startswith(prefix):
            return name.split(".")[1]
    return None


def cli_run(cfg, tmp_path: Path, overrides: list[str]) -> dict:
    """`python -m calray.train CFG --set ...` in process; returns summary.json."""
    path = tmp_path / "run.yaml"
    save_config(cfg, path)
    args = [str(path)]
    for o in overrides:
        args += ["--set", o]
    assert train_main(args) == 0
    summary = json.loads((cfg.run_dir() / "summary.json").read_text())
    assert 0.0 <= summary["test_acc"] <= 1.0
    return summary
