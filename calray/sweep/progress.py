"""The sweep's pieces on Ray's side: the manifest/progress callback (`SweepCallback`, built on
calray.ray.progress.TrialProgress, the progress line the robustness retrains print too; give it
to Tune as `calray.ray.progress.tune_callback(cb)`) and the Optuna searcher (`cal_optuna_search`).

Importing this module does not import Ray or Optuna (a sweep's --dry-run must not): the searcher
class, an OptunaSearch subclass, is built on first use. The callback and the searcher are
pickled into Ray's experiment state, so they hold plain data only and rebuild their counters in
`setup`.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from calray.ray.progress import TrialProgress
from calray.ray.trial import FINAL_KEY, TrialStatus, sampled_params
from calray.sweep.outputs import Manifest, clean_metrics

log = logging.getLogger("calray.sweep")


@dataclass
class SweepDisplay:
    """What the sweep's progress lines show beyond one cell's trials, and whether they print:
    cell i of `n_cells` (i: the callback's own `cell_index`, else `cell_index` here), `quiet`
    (--quiet), a heartbeat line at most every `interval_s` seconds while results arrive. One per
    sweep run, owned by calray.sweep.runner and shared by every cell's `SweepCallback` (the cells
    run together). It belongs to this process, so
    a callback's pickle leaves it out: a Tuner restored from tuner.pkl gets the running sweep's
    display through `SweepCallback.show`, not the one of the run that wrote the pickle.
    """

    n_cells: int = 0
    cell_index: int = 0
    quiet: bool = False
    interval_s: float = 30.0


# ---------------------------------------------------------------- the searcher


def cal_optuna_search(**kwargs):
    """A `CalOptunaSearch(**kwargs)` (OptunaSearch's arguments: sampler, storage, study_name, ...)."""
    return _search_class()(**kwargs)


def _rebuild_search(state: dict):
    """Unpickling a CalOptunaSearch: the class by this module's reference, not a copy in the pickle."""
    search = _search_class().__new__(_search_class())
    search.__dict__.update(state)
    return search


@functools.cache
def _search_class():
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState  # heavy: imported when a sweep runs
    from ray.tune.search.optuna import OptunaSearch

    class CalOptunaSearch(OptunaSearch):
        """OptunaSearch that tells Optuna PRUNED (not COMPLETE) for trials a scheduler stopped.

        A finished calray trial sends a final report with `final == 1`; a trial that ends without it
        and without an error was stopped early (ASHA). Ray's OptunaSearch would record such a trial as
        COMPLETE with its last intermediate value, which misleads TPE and optuna-dashboard.
        """

        def __reduce__(self):
            return _rebuild_search, (self.__dict__.copy(),)

        def on_trial_result(self, trial_id: str, result: dict):
            with warnings.catch_warnings():  # a resumed trial re-reports steps Optuna already has
                warnings.filterwarnings("ignore", message=".*is already reported.*")
                try:
                    super().on_trial_result(trial_id, result)
                except UpdateFinishedTrialError:
                    # a restored trial whose Optuna trial a resume already closed (the driver was
                    # killed between Tune's last state save and the trial's end): its record is final
                    log.info("optuna: trial %s is already finished in its study; result not recorded", trial_id)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            if (not error and result is not None and result.get(FINAL_KEY) != 1
                    and trial_id in getattr(self, "_ot_trials", {}) and trial_id not in self._completed_trials):
                ot_trial = self._ot_trials[trial_id]
                try:
                    # the result that made the scheduler stop the trial never reached on_trial_result
                    value = result.get(self.metric)
                    step = result.get("training_iteration")
                    if isinstance(value, (int, float)) and math.isfinite(value) and step is not None:
                        ot_trial.report(value, step)
                    self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
                except Exception as e:  # e.g. the trial was already told
                    log.warning("optuna: could not mark trial %s pruned: %s", trial_id, e)
                self._completed_trials.add(trial_id)
                return
            try:
                super().on_trial_complete(trial_id, result=result, error=error)
            except UpdateFinishedTrialError:  # as in on_trial_result: closed by a resume already
                log.info("optuna: trial %s is already finished in its study; completion not recorded", trial_id)

    return CalOptunaSearch


# ---------------------------------------------------------------- the callback


class SweepCallback(TrialProgress):
    """Appends every trial event to the cell's manifest and prints progress a person can follow."""

    def __init__(self, manifest_path: str, cell_id: str, num_samples: int, metric: str, mode: str,
                 display: SweepDisplay | None = None, cell_index: int | None = None):
        self.manifest_path = str(manifest_path)
        self.cell_id = cell_id
        self.cell_index = cell_index  # this cell's number in the sweep's selection (None: the display's)
        self.metric = metric
        self.mode = mode
        super().__init__(num_samples)
        self.show(display or SweepDisplay())

    def show(self, display: SweepDisplay) -> None:
        """Print with `display`'s context (not pickled: ``_display``; see SweepDisplay)."""
        self._display = display

    def __setstate__(self, state):
        super().__setstate__(state)
        self.show(SweepDisplay())

    @property
    def line_metrics(self) -> tuple[str, ...]:
        return (self.metric, "test_acc")

    def _reset(self):
        super()._reset()
        self._best: tuple[float, str] | None = None

    @property
    def manifest(self) -> Manifest:
        return Manifest(Path(self.manifest_path))

    def _head(self) -> str:
        best = f"best {self.metric} {self._best[0]:.4f} ({self._best[1]})" if self._best else "best -"
        index = self.cell_index or self._display.cell_index
        return (f"[cell {index}/{self._display.n_cells} {self.cell_id}] "
                f"{super()._head()} | {best}")

    def _quiet(self) -> bool:
        return self._display.quiet

    def _interval(self) -> float | None:
        return self._display.interval_s

    # ------------------------------------------------------------------ Tune hooks

    def setup(self, **info):
        super().setup(**info)
        for t in self.manifest.finished().values():
            self._count_end(t["trial_id"], t["status"], t.get("final"))

    def on_trial_start(self, iteration, trials, trial, **info):
        self.manifest.append({"ev": "start", "trial_id": trial.trial_id, "params": sampled_params(trial.config)})
        super().on_trial_start(iteration, trials, trial, **info)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.manifest.append({"ev": "result", "trial_id": trial.trial_id, "metrics": clean_metrics(result)})
        super().on_trial_result(iteration, trials, trial, result, **info)

    def on_trial_complete(self, iteration, trials, trial, **info):
        status = TrialStatus.of_ended(trial.last_result)
        self.manifest.append({"ev": "end", "trial_id": trial.trial_id, "status": status, "error": None})
        super().on_trial_complete(iteration, trials, trial, **info)

    def on_trial_error(self, iteration, trials, trial, **info):
        msg = self._error_message(trial)
        self.manifest.append({"ev": "end", "trial_id": trial.trial_id, "status": TrialStatus.ERROR, "error": msg})
        super().on_trial_error(iteration, trials, trial, **info)

    def on_trial_recover(self, iteration, trials, trial, **info):
        """Tune restarts a failed trial (max_failures): a worker node died, its process was killed,
        or it raised. The trial goes on from its last.pt on any node; the manifest keeps why."""
        reason = retry_reason(trial) or self._error_message(trial)
        failures = getattr(getattr(trial, "run_metadata", None), "num_failures", None)
        self.manifest.append({"ev": "retry", "trial_id": trial.trial_id, "reason": reason, "failures": failures})
        super().on_trial_recover(iteration, trials, trial, **info)

    # ------------------------------------------------------------------ helpers

    def _count_end(self, trial_id: str, status: TrialStatus, final: dict | None):
        super()._count_end(trial_id, status, final)
        if status == TrialStatus.TERMINATED and final:
            v = final.get(self.metric)
            if isinstance(v, (int, float)) and math.isfinite(v):
                better = self._best is None or (v > self._best[0] if self.mode == "max" else v < self._best[0])
                if better:
                    self._best = (v, trial_id)


def retry_reason(trial) -> str | None:
    """The latest failure of a trial Tune restarts, from Tune's error file (one block per failure,
    the newest last; a run dir's error.txt may be an older attempt's): the line saying a node or
    actor died when there is one, else the block's last line (a traceback's "Type: message")."""
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text(errors="replace") if path else ""
    except OSError:
        return None
    block = text.rsplit("Failure # ", 1)[-1].splitlines()[1:] if "Failure # " in text else text.splitlines()
    lines = [ln.strip() for ln in block if ln.strip()]
    if not lines:
        return None
    died = [ln for ln in lines if "node" in ln.lower() and ("died" in ln or "dead" in ln)]
    return (died[0] if died else lines[-1])[:500]


def trial_dirname(trial) -> str:
    """Short Ray trial directory names (the default repeats every parameter)."""
    return trial.trial_id
