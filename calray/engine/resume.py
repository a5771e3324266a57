"""When a run directory may be resumed: the one rule every layer applies (CLI runs, Ray Train runs,
sweep trials, robustness retrains all reach it through `Trainer.fit`).

A run dir is resumed only when its stored `config.yaml` equals the new resolved config except for
the keys below, which only extend a run (more epochs, a later stop) or observe it (progress bars,
checkpoint cadence, where Ray runs). Anything else — the strategy, the AIB mode, a learning rate,
the data — would silently continue one experiment under another's name, so it is an error that
names the run dir and the differing keys and says how to start fresh.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calray.config import absolute_paths, flatten, read_yaml
from calray.errors import CalrayError
from calray.io import CONFIG_FILE

# keys whose change keeps a run the same experiment (extend or observe only)
RESUME_COMPATIBLE_KEYS = frozenset({
    "optim.epochs",
    "optim.early_stop_patience",
    "runtime.progress",
    "runtime.tensorboard",
    "runtime.checkpoint_every",
    "runtime.resume",
    "runtime.output_dir",  # with run_name: *where* the run dir is, already the same dir here
    "runtime.run_name",
    "data.num_workers",
    "data.eval_batch_size",
    "distributed.address",
    "distributed.storage_path",
    "distributed.check_consistency",
    "distributed.collective_timeout_s",
    "distributed.max_failures",
})
MISSING = "<absent>"
SHOWN_DIFFERENCES = 3


class RunMismatchError(CalrayError):
    """The run dir holds a run of a different config; nothing was written."""


def config_differences(stored: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(key, stored value, current value) for every key outside RESUME_COMPATIBLE_KEYS that differs,
    sorted by key."""
    a, b = flatten(stored), flatten(current)
    # paths compared absolute: the Ray layers store absolute paths where the CLI config had relative ones
    abs_a, abs_b = flatten(absolute_paths(stored)), flatten(absolute_paths(current))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUME_COMPATIBLE_KEYS:
            continue
        if _plain(abs_a.get(key, MISSING)) != _plain(abs_b.get(key, MISSING)):
            diffs.append((key, a.get(key, MISSING), b.get(key, MISSING)))
    return diffs


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_resumable(run_dir: Path, current: dict) -> None:
    """Raise RunMismatchError when `run_dir/config.yaml` is a different experiment than `current`
    (a RunConfig.to_dict()). No stored config: nothing to protect."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return
    try:
        stored = read_yaml(path)
    except CalrayError as e:
        raise RunMismatchError(f"{run_dir}: cannot read the stored config to check it matches ({e}); "
                               "move the run dir away or start fresh (--fresh / --set runtime.resume=false)") from None
    diffs = config_differences(stored, current)
    if not diffs:
        return
    shown = "; ".join(f"{k}: {old!r} → {new!r}" for k, old, new in diffs[:SHOWN_DIFFERENCES])
    more = f" and {len(diffs) - SHOWN_DIFFERENCES} more" if len(diffs) > SHOWN_DIFFERENCES else ""
    raise RunMismatchError(
        f"{run_dir} holds a run with a different config ({shown}{more}); resuming would mix two experiments. "
        "Nothing was changed. Keep it and train elsewhere with --set name=<new name>, or replace it with "
        "--fresh (= --set runtime.resume=false)")
