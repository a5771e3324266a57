"""TensorBoard events of a run, in its run dir (`runtime.tensorboard`, on by default).

Every numeric column of each epoch's metrics row becomes a scalar, grouped by prefix so TensorBoard
shows one panel per family: `loss/…` (train_loss and the loss terms), `acc/…` (train, val and
per-modality accuracies), `contribution/<W|D|I|phi|R|P|kl|a|beta>/<modality>`, `lr/…`, `time/…`.
The run's hyper-parameters (the config, flattened) go to the HParams view with the final test and
best validation accuracy. Written by the main rank only — under Ray Train rank 0 — so
`tensorboard --logdir runs/sweeps/<name>` shows every sweep trial beside its parameters. Uses
tensorboardX (a Ray dependency), which writes the standard event format.
"""

from __future__ import annotations

from pathlib import Path

from calray.config import flatten

EVENTS_DIR = "tensorboard"
CONTRIBUTION_KEYS = ("W", "D", "I", "phi", "R", "P", "kl", "a", "beta")


def scalar_tag(key: str) -> str:
    """metrics.jsonl column → TensorBoard tag (`val_acc_audio` → `acc/val_audio`)."""
    head, _, mod = key.partition("_")
    if head in CONTRIBUTION_KEYS and mod:
        return f"contribution/{head}/{mod}"
    if "loss" in key or key.startswith("train_aib_kl"):
        return f"loss/{key}"
    if "acc" in key or "f1" in key:
        return f"acc/{key}"
    if key == "lr" or key.startswith("lr_"):
        return f"lr/{key}"
    if key.endswith("_s") or key == "train_samples":
        return f"time/{key}"
    return f"other/{key}"


def hparams(cfg) -> dict:
    """The config as flat scalars/strings (TensorBoard's HParams accepts no lists)."""
    out = {}
    for key, value in flatten(cfg.to_dict()).items():
        if isinstance(value, (int, float, str)):  # bool is an int
            out[key] = value
        elif value is not None:
            out[key] = str(value)
    return out


class TensorBoardLog:
    def __init__(self, run_dir: Path, cfg):
        from tensorboardX import SummaryWriter  # ~1 s to import: only for runs that write events

        self.cfg = cfg
        self.writer = SummaryWriter(logdir=str(Path(run_dir) / EVENTS_DIR), flush_secs=30)

    def epoch(self, row: dict) -> None:
        step = int(row["epoch"])
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(scalar_tag(key), value, step)
        self.writer.flush()

    def close(self, summary: dict) -> None:
        metrics = {"hparam/test_acc": summary["test_acc"], "hparam/best_val_acc": summary["best_val_acc"]}
        self.writer.add_hparams(hparams(self.cfg), metrics, name="hparams")  # its own event file, in a subdir
        self.writer.close()
