"""The per-trial progress line on the driver's console: `TrialProgress`, the one implementation,
and `RetrainProgress`, the robustness retrains' line. The sweep's cells build on it
(calray.sweep.progress.SweepCallback).

They are plain objects with Ray Tune's callback hooks (`setup`, `on_trial_start`, ...), so
importing this module does not import Ray (a sweep's --dry-run must not); `tune_callback(p)`
makes one a `ray.tune.Callback` for `RunConfig(callbacks=[...])`. Ray pickles callbacks into its
experiment state (tuner.pkl), so they hold plain data only and rebuild their counters in `setup`.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

from calray.io import ERROR_FILE
from calray.ray.trial import TIME_ATTR, TrialStatus, sampled_params


def _err_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    if not lines:
        return "unknown error"
    # the last line of a traceback is "Type: message"; prefer our own one-line record
    return lines[-1][:500]


class TrialProgress:
    """The per-trial progress line on the driver's console: the one implementation, shared by the
    sweep's cells (`SweepCallback`) and the robustness retrains (`RetrainProgress`).

    Prints ``<head> | trial <id> <event>`` when a trial ends (TERMINATED with its numbers, PRUNED,
    ERROR with the one-line error), is retried, and, when `announce_starts`, when it starts; plus
    the head alone at most every `_interval()` seconds while results arrive (None: never).
    Subclasses give the head, the quiet switch, the trial description and where a trial's run dir
    is. Plain data only: Ray pickles callbacks into its experiment state; the counters (attributes
    starting with ``_``) are rebuilt in `setup`.
    """

    announce_starts = True
    line_metrics: tuple[str, ...] = ("test_acc",)  # shown for a TERMINATED trial

    def __init__(self, num_samples: int):
        self.num_samples = num_samples
        self._reset()

    def _reset(self):
        self._running: set[str] = set()
        self._finished = 0
        self._failed = 0
        self._pruned = 0
        self._last_print = 0.0

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    # ------------------------------------------------------------------ what subclasses decide

    def _head(self) -> str:
        return (f"trials {self._finished}/{self.num_samples} finished, {len(self._running)} running, "
                f"{self._failed} failed, {self._pruned} pruned")

    def _quiet(self) -> bool:
        return False

    def _interval(self) -> float | None:
        return None

    def _describe(self, trial) -> str:
        return f"trial {trial.trial_id}"

    def _run_dir(self, trial) -> Path | None:
        cfg = trial.config or {}
        if cfg.get("run_dir"):
            return Path(cfg["run_dir"])
        return Path(cfg["runs_root"]) / trial.trial_id if cfg.get("runs_root") else None

    # ------------------------------------------------------------------ Tune hooks

    def setup(self, **info):
        self._reset()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._running.add(trial.trial_id)
        if self.announce_starts:
            self._print(f"{self._describe(trial)} started {_fmt_params(sampled_params(trial.config))}", force=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._print(None)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        status = TrialStatus.of_ended(last)
        self._count_end(trial.trial_id, status, last)
        if status == TrialStatus.TERMINATED:
            extra = "".join(f" {k}={_num(last.get(k))}" for k in self.line_metrics)
        else:
            key = self.line_metrics[0]
            extra = f" at epoch {last.get(TIME_ATTR, '?')} ({key}={_num(last.get(key))})"
        self._print(f"{self._describe(trial)} {status}{extra}", force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._count_end(trial.trial_id, TrialStatus.ERROR, None)
        self._print(f"{self._describe(trial)} ERROR: {self._error_message(trial)}", force=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._print(f"{self._describe(trial)} failed, retrying: {self._error_message(trial)}", force=True)

    # ------------------------------------------------------------------ helpers

    def _error_message(self, trial) -> str:
        run_dir = self._run_dir(trial)
        if run_dir is not None:
            p = Path(run_dir) / ERROR_FILE
            if p.is_file():
                return _err_line(p.read_text())
        try:
            path = getattr(trial, "error_file", None) or getattr(trial, "pickled_error_file", None)
            if path and Path(path).is_file():
                return _err_line(Path(path).read_text(errors="replace"))
        except OSError:
            pass
        return "unknown error (see the trial's error file under ray/)"

    def _count_end(self, trial_id: str, status: TrialStatus, final: dict | None):
        self._running.discard(trial_id)
        self._finished += 1
        self._failed += status == TrialStatus.ERROR
        self._pruned += status == TrialStatus.PRUNED

    def _print(self, event: str | None, force: bool = False):
        if self._quiet():
            return
        now = time.time()
        if not force:
            interval = self._interval()
            if interval is None or now - self._last_print < interval:
                return
        self._last_print = now
        print(self._head() + (f" | {event}" if event else ""), flush=True)


class RetrainProgress(TrialProgress):
    """Progress of calray.robustness.grid's train+test retrains: one line per retrain as it ends.

    The trials are Tune's grid over plan indices (``config["index"]``); `labels` and `run_dirs`
    name each index's retrain. `quiet` comes from the caller (``--quiet``), not from PROGRESS.
    """

    announce_starts = False  # a retrain's parameters are in its label, shown when it ends
    line_metrics = ("test_acc", "test_macro_f1")

    def __init__(self, labels: list[str], run_dirs: list[str], title: str = "robustness train+test",
                 quiet: bool = False):
        self.labels = list(labels)
        self.run_dirs = [str(d) for d in run_dirs]
        self.title = title
        self.quiet = quiet
        super().__init__(len(self.labels))

    def _index(self, trial) -> int | None:
        idx = (trial.config or {}).get("index")
        return idx if isinstance(idx, int) and 0 <= idx < len(self.labels) else None

    def _head(self) -> str:
        return (f"[{self.title}] retrains {self._finished}/{self.num_samples} finished, "
                f"{len(self._running)} running, {self._failed} failed")

    def _quiet(self) -> bool:
        return self.quiet

    def _describe(self, trial) -> str:
        idx = self._index(trial)
        return f"trial {trial.trial_id}" + ("" if idx is None else f" ({self.labels[idx]})")

    def _run_dir(self, trial) -> Path | None:
        idx = self._index(trial)
        return None if idx is None else Path(self.run_dirs[idx])


def _num(v) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"


def _fmt_params(params: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


# ---------------------------------------------------------------- as a Ray Tune callback


def tune_callback(progress: TrialProgress):
    """`progress` as a `ray.tune.Callback`: Tune's trial events are passed on to it."""
    return _callback_class()(progress)


def progress_of(tuner) -> list[TrialProgress]:
    """The `TrialProgress` objects among a Tuner's callbacks; for a Tuner from `Tuner.restore`, the
    ones unpickled from its tuner.pkl. [] where Ray keeps the run config out of reach (the Tuner's
    in-process `TunerInternal` is Ray 2.60's `_local_tuner`; a Ray Client Tuner has none)."""
    local = getattr(tuner, "_local_tuner", None)
    run_config = local.get_run_config() if local is not None else None
    callbacks = getattr(run_config, "callbacks", None) or []
    return [cb.progress for cb in callbacks if isinstance(getattr(cb, "progress", None), TrialProgress)]


@functools.cache
def _callback_class():
    from ray.tune import Callback  # heavy: imported when Tune runs, not when this module is

    class ProgressCallback(Callback):
        """Passes Tune's trial events on to a `TrialProgress`; pickles as `tune_callback(progress)`,
        so tuner.pkl names this module's function, not a class defined here."""

        def __init__(self, progress: TrialProgress):
            self.progress = progress

        def __reduce__(self):
            return tune_callback, (self.progress,)

        def setup(self, **info):
            self.progress.setup(**info)

        def on_trial_start(self, iteration, trials, trial, **info):
            self.progress.on_trial_start(iteration, trials, trial, **info)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.progress.on_trial_result(iteration, trials, trial, result, **info)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.progress.on_trial_complete(iteration, trials, trial, **info)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.progress.on_trial_error(iteration, trials, trial, **info)

        def on_trial_recover(self, iteration, trials, trial, **info):
            self.progress.on_trial_recover(iteration, trials, trial, **info)

    return ProgressCallback
