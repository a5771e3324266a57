"""One Ray Tune experiment for all of a sweep's cells: the pieces that keep the cells apart inside it.

* `cell_searcher(cells, max_per_cell)` — a `ray.tune.search.Searcher` holding one searcher per cell
  (a CalOptunaSearch over the cell's own space and Optuna study, or None: the cell's config as
  given). `suggest` picks the cell that still needs trials and has the fewest running (then the
  fewest started, then sweep order), asks that cell's searcher, and returns the cell's fixed config
  (run, runs_root, cell, sweep) with the sampled parameters; results and completions go back to the
  owning cell's searcher; `FINISHED` once every cell has started its budget. The sweep-wide cap
  (`max_concurrent_trials`) is Tune's ConcurrencyLimiter around it; `max_per_cell` caps one cell.
* `cell_scheduler(schedulers)` — a FIFOScheduler that hands every trial event to its cell's own
  scheduler (an ASHAScheduler per cell), so a trial is only ever compared with trials of its cell.
* `cell_callbacks(callbacks)` — a `ray.tune.Callback` that hands every trial hook to its cell's
  callbacks (the cell's SweepCallback: manifest and progress line; its tracking callbacks) and the
  global hooks to all; `on_end(cell_id)` (not pickled) hears each trial end.

A trial's cell is `trial.config["cell"]` (the searcher keeps trial_id → cell, as it sees ids only).
Ray pickles all three into its experiment state (tuner.pkl, the searcher checkpoint), so they hold
plain data and the inner objects, which follow their own pickling rules (CalOptunaSearch.__reduce__);
the classes are built on first use (importing this module imports no Ray) and pickle by reference
to `_rebuild`.
"""

from __future__ import annotations

import functools
import pickle
from typing import Any

FIXED_KEYS = ("run", "runs_root", "cell", "sweep")  # a cell's fixed part of every trial config


def cell_of(trial) -> str | None:
    return (getattr(trial, "config", None) or {}).get("cell")


def cell_searcher(cells: list[dict], max_per_cell: int | None = None, metric: str | None = None,
                  mode: str | None = None):
    """`cells`: [{"id", "fixed" (config dict), "budget" (trials to start), "search" (Searcher | None)}]
    in sweep order."""
    return _classes()["searcher"](cells, max_per_cell, metric, mode)


def cell_scheduler(schedulers: dict[str, Any]):
    return _classes()["scheduler"](schedulers)


def cell_callbacks(callbacks: dict[str, list]):
    return _classes()["callbacks"](callbacks)


def _rebuild(kind: str, state: dict):
    cls = _classes()[kind]
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    if kind == "callbacks":
        obj.on_end = None
    return obj


@functools.cache
def _classes() -> dict[str, type]:
    return {"searcher": _searcher_class(), "scheduler": _scheduler_class(), "callbacks": _callbacks_class()}


class _CellSearching:
    """CellSearcher's logic (every cell's trials from one searcher; see the module doc), without Ray:
    `_searcher_class` mixes it into Ray's Searcher, whose FINISHED and metric/mode it uses."""

    def __init__(self, cells, max_per_cell=None, metric=None, mode=None):
        super().__init__(metric=metric, mode=mode)
        self.order = [c["id"] for c in cells]
        self.fixed = {c["id"]: c["fixed"] for c in cells}
        self.budget = {c["id"]: int(c["budget"]) for c in cells}
        self.searchers = {c["id"]: c.get("search") for c in cells}
        self.started = {c["id"]: 0 for c in cells}
        self.max_per_cell = max_per_cell
        self.owner: dict[str, str] = {}  # trial_id → cell id
        self.live: set[str] = set()  # suggested, not completed

    def __reduce__(self):
        return _rebuild, ("searcher", self.__dict__.copy())

    def running(self, cell_id: str) -> int:
        return sum(self.owner[t] == cell_id for t in self.live)

    def next_cell(self) -> str | None:
        open_ = [c for c in self.order if self.started[c] < self.budget[c]
                 and (self.max_per_cell is None or self.running(c) < self.max_per_cell)]
        if not open_:
            return None
        return min(open_, key=lambda c: (self.running(c), self.started[c], self.order.index(c)))

    def suggest(self, trial_id: str):
        while True:
            if all(self.started[c] >= self.budget[c] for c in self.order):
                return self.FINISHED
            cell = self.next_cell()
            if cell is None:
                return None  # every open cell is at its cap: ask again when a trial ends
            inner = self.searchers[cell]
            params = inner.suggest(trial_id) if inner is not None else {}
            if params is None:
                return None
            if params == self.FINISHED:  # the cell's own searcher has nothing more
                self.budget[cell] = self.started[cell]
                continue
            self.started[cell] += 1
            self.owner[trial_id] = cell
            self.live.add(trial_id)
            return {**self.fixed[cell], **params}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        inner = self.searchers.get(self.owner.get(trial_id))
        if inner is not None:
            inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        cell = self.owner.get(trial_id)
        self.live.discard(trial_id)
        inner = self.searchers.get(cell)
        if inner is not None:
            inner.on_trial_complete(trial_id, result=result, error=error)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        self._metric = self._metric or metric
        self._mode = self._mode or mode
        return True

    def save(self, checkpoint_path: str):
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__.copy(), f)

    def restore(self, checkpoint_path: str):
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


def _searcher_class():
    from ray.tune.search import Searcher  # heavy: imported when a sweep runs

    class CellSearcher(_CellSearching, Searcher):
        """Every cell's trials from one searcher; see the module doc."""

    return CellSearcher


def _scheduler_class():
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    class CellScheduler(FIFOScheduler):
        """Trial events go to the trial's cell's scheduler (FIFO's trial choice is shared)."""

        def __init__(self, schedulers):
            super().__init__()
            self.schedulers = dict(schedulers)
            self._supports_buffered_results = all(s.supports_buffered_results for s in self.schedulers.values())

        def __reduce__(self):
            return _rebuild, ("scheduler", self.__dict__.copy())

        def _of(self, trial):
            return self.schedulers.get(cell_of(trial))

        def set_search_properties(self, metric, mode, **spec) -> bool:
            ok = [s.set_search_properties(metric, mode, **spec) for s in self.schedulers.values()]
            return all(ok) and super().set_search_properties(metric, mode, **spec)

        def on_trial_add(self, tune_controller, trial):
            if (s := self._of(trial)) is not None:
                s.on_trial_add(tune_controller, trial)

        def on_trial_error(self, tune_controller, trial):
            if (s := self._of(trial)) is not None:
                s.on_trial_error(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result):
            s = self._of(trial)
            return TrialScheduler.CONTINUE if s is None else s.on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller, trial, result):
            if (s := self._of(trial)) is not None:
                s.on_trial_complete(tune_controller, trial, result)

        def on_trial_remove(self, tune_controller, trial):
            if (s := self._of(trial)) is not None:
                s.on_trial_remove(tune_controller, trial)

        def debug_string(self) -> str:
            return "\n".join(f"cell {c}: {s.debug_string()}" for c, s in self.schedulers.items())

    return CellScheduler


class _CellRouting:
    """CellCallbacks' logic (trial hooks to the trial's cell's callbacks, global hooks to every
    callback), without Ray: `_callbacks_class` mixes it into Ray's Callback."""

    def __init__(self, callbacks):
        self.callbacks = {c: list(cbs) for c, cbs in callbacks.items()}
        self.on_end = None  # this process's listener of trial ends (cell id); not pickled

    def __reduce__(self):
        return _rebuild, ("callbacks", {"callbacks": self.callbacks})

    def _route(self, hook: str, info: dict) -> None:
        cell = cell_of(info.get("trial"))
        for cb in self.callbacks.get(cell, ()):
            getattr(cb, hook)(**info)
        if hook in ("on_trial_complete", "on_trial_error") and self.on_end is not None and cell is not None:
            self.on_end(cell)

    def _broadcast(self, hook: str, info: dict) -> None:  # a global hook: every cell's callbacks
        for cbs in self.callbacks.values():
            for cb in cbs:
                getattr(cb, hook)(**info)

    def setup(self, **info):
        self._broadcast("setup", info)

    def on_step_begin(self, **info):
        self._broadcast("on_step_begin", info)

    def on_step_end(self, **info):
        self._broadcast("on_step_end", info)

    def on_experiment_end(self, trials, **info):
        for cell, cbs in self.callbacks.items():
            own = [t for t in trials if cell_of(t) == cell]
            for cb in cbs:
                cb.on_experiment_end(trials=own, **info)

    def on_trial_start(self, **info):
        self._route("on_trial_start", info)

    def on_trial_restore(self, **info):
        self._route("on_trial_restore", info)

    def on_trial_save(self, **info):
        self._route("on_trial_save", info)

    def on_trial_result(self, **info):
        self._route("on_trial_result", info)

    def on_trial_complete(self, **info):
        self._route("on_trial_complete", info)

    def on_trial_recover(self, **info):
        self._route("on_trial_recover", info)

    def on_trial_error(self, **info):
        self._route("on_trial_error", info)

    def on_checkpoint(self, **info):
        self._route("on_checkpoint", info)


def _callbacks_class():
    from ray.tune import Callback

    class CellCallbacks(_CellRouting, Callback):
        """Trial hooks to the trial's cell's callbacks, global hooks to every callback."""

    return CellCallbacks


def routed_callbacks(callbacks) -> list:
    """The inner callbacks of the CellCallbacks among `callbacks` (a Tuner's run config's), per cell."""
    kind = _classes()["callbacks"]
    return [cb for cb in callbacks or () if isinstance(cb, kind)]
