"""File writing shared by every layer: atomic writes (temp file + rename, the umask's mode), JSON
and JSON lines, and the names of the files every layer writes (run, sweep and robustness-grid
directories). No torch: the sweep driver stays light."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

_UMASK_LOCK = threading.Lock()

# ---------------------------------------------------------------- file names (every layer's, here)

# a run directory (calray.engine)
CONFIG_FILE = "config.yaml"  # the resolved run config
METRICS_FILE = "metrics.jsonl"  # one row per epoch
SUMMARY_FILE = "summary.json"  # the finished run's numbers
ENV_FILE = "env.json"  # library versions, seeds, warnings
DATA_INFO_FILE = "data_info.json"  # split sizes, validation indices, standardisation
CHECKPOINTS_DIR = "checkpoints"
BEST_CHECKPOINT = "best.pt"  # in CHECKPOINTS_DIR: the best validation epoch
LAST_CHECKPOINT = "last.pt"  # in CHECKPOINTS_DIR: the latest epoch (resume)
# what a Ray Tune trial adds to its run directory (calray.ray.trial)
TRIAL_FILE = "trial.json"
ERROR_FILE = "error.txt"  # a failed trial's one-line error
TRAIN_LOG = "train.log"
# a sweep directory (calray.sweep)
SWEEP_FILE = "sweep.yaml"
CELLS_FILE = "cells.json"
TRIALS_PARQUET = "trials.parquet"
TRIALS_CSV = "trials.csv"
OPTUNA_JOURNAL = "optuna.journal"
MANIFEST_DIR = "manifest"  # <cell>.jsonl: the sweep's own record of its trials
BEST_DIR = "best"  # <cell>.yaml: each cell's best config
RUNS_DIR = "runs"  # <cell>/<trial id>/: the trials' run directories
RAY_DIR = "ray"  # <cell>/: Ray Tune's experiment state
RETRAIN_DIR = "retrain"  # where a best config re-trains
# a robustness grid's outputs, in the sweep or run directory it evaluated (calray.robustness)
ROBUSTNESS_PARQUET = "robustness.parquet"
ROBUSTNESS_CSV = "robustness.csv"
ROBUSTNESS_SUMMARY_PARQUET = "robustness_summary.parquet"
ROBUSTNESS_SUMMARY_CSV = "robustness_summary.csv"
ROBUSTNESS_GRID_FILE = "robustness_grid.json"
ROBUSTNESS_DIR = "robustness"  # runs/<cell>/<retrain>/ and tune/: the train+test retrains
# the final stage (calray.sweep: retrains of each best config over paired seeds) and its comparison
# (calray.report.comparison), in the sweep directory
FINAL_DIR = "final"  # runs/<cell>/seed<s>/: the final retrains; tune/: Ray Tune's state of them
FINAL_CSV = "final.csv"  # one row per (cell, seed)
FINAL_PARQUET = "final.parquet"
FINAL_JSON = "final.json"  # the protocol as run: seeds, baseline, metrics, confidence, budget
COMPARISON_CSV = "comparison.csv"  # every variant against the baseline, paired by seed
COMPARISON_PARQUET = "comparison.parquet"


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows.

    Linux (>= 4.7) shows it as the ``Umask:`` line of /proc/self/status; reading that changes
    nothing, so no other thread (a DataLoader's, Ray's) can create a file under a wrong mask
    meanwhile. Elsewhere `os.umask` is the only reader and it *sets* the mask while reading it:
    set-and-restore under a lock, so two writers here never interleave and leave a wrong mask
    behind (a file another thread creates in that instant is the remaining, tiny, risk). Not
    cached: the mask may change while the process runs.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, writer) -> None:
    """Call `writer(fileobj)` on a temp file beside `path`, fsync, then rename over `path`.

    The file gets the mode a plain `open(path, "w")` would give it, ``0o666 & ~umask`` (0644
    under umask 022): mkstemp creates its temp file 0600, which would keep summaries, reports and
    checkpoints on shared storage from every other user.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            try:
                os.fchmod(f.fileno(), 0o666 & ~current_umask())
            except OSError:  # a filesystem without Unix modes (some CIFS/FUSE mounts) refuses it
                pass
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


# ---------------------------------------------------------------- JSON lines


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; [] when it does not exist. A torn last line (a crash while
    appending) is skipped, any other unreadable line too."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def append_jsonl(path: Path, row: dict, default=str) -> None:
    """Append one row; `default` turns what JSON cannot hold into what it can (json.dumps's)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, default=default) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Replace the file with `rows`, atomically (a truncation never leaves half a file)."""
    atomic_write_text(Path(path), "".join(json.dumps(r, default=str) + "\n" for r in rows))
