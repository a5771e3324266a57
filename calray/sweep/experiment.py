"""The sweep's search: every selected cell's trials scheduled together in ONE Ray Tune experiment.

`run_search` builds (or restores) the experiment `<sweep dir>/ray/search/`: its searcher is a
`calray.sweep.routing` CellSearcher over one CalOptunaSearch per cell (the cell's own space, its
Optuna study `study_name = cell id` in the one journal, its sampler seeded as `search.seed +
trials the cell already finished`), its scheduler routes each trial to its cell's ASHA brackets,
and its callback routes each trial to its cell's SweepCallback (manifest, progress line) and
tracking callbacks. `max_concurrent_trials` caps the whole sweep (Tune's ConcurrencyLimiter;
null: as many as the cluster holds), `max_concurrent_trials_per_cell` one cell.

The per-cell manifests are the record that counts trials. Restoring Ray's experiment is an
optimisation (its unfinished trials continue from their checkpoints) made only when it ran the
same cell selection (`ray/search.cells.json`); otherwise, and for what a restored experiment did
not run (`--num-samples N --resume`, `--retry-failed`), a new experiment runs the remaining trials
after `retire` closed the old one's unfinished trials (ABANDONED in the manifest, FAIL in Optuna).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Callable

from calray.io import OPTUNA_JOURNAL, RAY_DIR, RUNS_DIR, atomic_write_text
from calray.ray.progress import TrialProgress, progress_of, tune_callback
from calray.ray.trial import FINISHED, TIME_ATTR, TrialStatus, run_trial
from calray.sweep.outputs import Manifest, manifest_path
from calray.sweep.progress import SweepCallback, SweepDisplay, cal_optuna_search, trial_dirname
from calray.sweep.routing import cell_callbacks, cell_scheduler, cell_searcher, routed_callbacks
from calray.sweep.spec import Cell, SweepPlan
from calray.sweep.tracking import tracking_callbacks

log = logging.getLogger("calray.sweep")

EXPERIMENT = "search"  # <sweep dir>/ray/search/: Ray Tune's state of the search
EXPERIMENT_CELLS = "search.cells.json"  # <sweep dir>/ray/: the cell selection that experiment runs
PENDING_ENV = "TUNE_MAX_PENDING_TRIALS_PG"


# ---------------------------------------------------------------- building blocks


def journal_storage(sdir: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(sdir / OPTUNA_JOURNAL)))


def _sampler(plan: SweepPlan, cell: Cell, seed_offset: int):
    import optuna

    s = plan.spec.search
    seed = s.seed + seed_offset
    if s.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.algorithm == "grid":
        return optuna.samplers.GridSampler({k: d.grid_values() for k, d in cell.space.items()}, seed=seed)
    kw = {"n_startup_trials": s.n_startup_trials} if s.n_startup_trials else {}
    return optuna.samplers.TPESampler(seed=seed, **kw)


def _domain(dist):
    from ray import tune

    if dist.choice is not None:
        return tune.choice(list(dist.choice))
    if dist.int is not None:
        lo, hi = dist.int
        return tune.lograndint(lo, hi + 1) if dist.log else tune.randint(lo, hi + 1)
    if dist.loguniform is not None:
        return tune.loguniform(*dist.loguniform)
    return tune.uniform(*dist.uniform)


def trainable(plan: SweepPlan):
    from ray import tune

    return tune.with_resources(run_trial, plan.spec.resources.trial_resources())


def cell_run(plan: SweepPlan, cell: Cell) -> dict:
    """The cell's run config with the sweep's resources written into `distributed`."""
    r = plan.spec.resources
    run = json.loads(json.dumps(cell.run))
    run["distributed"].update(workers=r.workers, gpu=r.gpus_per_worker > 0, cpus_per_worker=r.cpus_per_worker)
    if r.gpus_per_worker == 0 and run["runtime"].get("device") == "auto":
        run["runtime"]["device"] = "cpu"
    return run


def _reuse_actors(plan: SweepPlan) -> bool:
    """Trials share processes only when they run in-process: a stopped multi-worker trial's thread
    sits in TorchTrainer.fit and cannot end within Tune's reset timeout, and a failed reuse made
    Tune end the experiment with the next trial never run ("Trials did not complete")."""
    return plan.spec.ray.reuse_actors and plan.spec.resources.workers == 1


def cell_search(plan: SweepPlan, cell: Cell, sdir: Path, seed_offset: int, points: list[dict] | None = None):
    """The cell's CalOptunaSearch over its own space (None for an empty space: its config as given)."""
    if not cell.space:
        return None
    s = plan.spec.search
    search = cal_optuna_search(sampler=_sampler(plan, cell, seed_offset), storage=journal_storage(sdir),
                               study_name=cell.id, points_to_evaluate=points or None)
    search.set_search_properties(s.metric, s.mode, {k: _domain(d) for k, d in cell.space.items()})
    return search


def _scheduler(plan: SweepPlan, cells: list[Cell]):
    from ray.tune.schedulers import ASHAScheduler

    a = plan.spec.scheduler.asha if plan.spec.scheduler else None
    if a is None:
        return None
    return cell_scheduler({c.id: ASHAScheduler(time_attr=TIME_ATTR, max_t=a.max_t or int(c.run["optim"]["epochs"]),
                                               grace_period=a.grace_period, reduction_factor=a.reduction_factor,
                                               stop_last_trials=False) for c in cells})


def new_tuner(plan: SweepPlan, cells: list[Cell], sdir: Path, need: dict[str, int], finished: dict[str, int],
              targets: dict[str, int], display: SweepDisplay, retry: dict[str, list[dict]] | None = None):
    """A Tuner running `need[cell]` new trials of each cell in `need`; `cells` is the sweep's
    selection (its order gives the `[cell i/N]` numbers)."""
    from ray import tune

    spec, s = plan.spec, plan.spec.search
    run_cells = [c for c in cells if need.get(c.id, 0) > 0]
    entries = [{"id": c.id, "budget": need[c.id],
                "fixed": {"run": cell_run(plan, c), "runs_root": str(sdir / RUNS_DIR / c.id), "cell": c.id,
                          "sweep": spec.name},
                "search": cell_search(plan, c, sdir, finished[c.id], (retry or {}).get(c.id))} for c in run_cells]
    searcher = cell_searcher(entries, spec.max_concurrent_trials_per_cell, s.metric, s.mode)
    index = {c.id: i for i, c in enumerate(cells, 1)}
    callbacks = {c.id: [tune_callback(SweepCallback(manifest_path(sdir, c.id), c.id, targets[c.id], s.metric, s.mode,
                                                    display, cell_index=index[c.id])),
                        *tracking_callbacks(spec.tracking, spec.name, c.id, sdir)] for c in run_cells}
    tune_config = tune.TuneConfig(metric=s.metric, mode=s.mode, search_alg=searcher,
                                  scheduler=_scheduler(plan, run_cells), num_samples=sum(need.values()),
                                  max_concurrent_trials=spec.max_concurrent_trials,
                                  reuse_actors=_reuse_actors(plan), trial_dirname_creator=trial_dirname)
    run_config = tune.RunConfig(name=EXPERIMENT, storage_path=str(sdir / RAY_DIR), verbose=0,
                                callbacks=[cell_callbacks(callbacks)],
                                failure_config=tune.FailureConfig(max_failures=spec.max_failures, fail_fast=False))
    return tune.Tuner(trainable(plan), tune_config=tune_config, run_config=run_config)


def show(tuner, display: SweepDisplay, on_end: Callable[[str], None] | None = None) -> None:
    """A restored Tuner's callbacks come from its tuner.pkl: give its SweepCallbacks this sweep's
    display and its CellCallbacks this process's trial-end listener."""
    local = getattr(tuner, "_local_tuner", None)
    run_config = local.get_run_config() if local is not None else None
    progress = list(progress_of(tuner))
    for router in routed_callbacks(getattr(run_config, "callbacks", None)):
        router.on_end = on_end
        progress += [cb.progress for cbs in router.callbacks.values() for cb in cbs
                     if isinstance(getattr(cb, "progress", None), TrialProgress)]
    sweep_callbacks = [p for p in progress if isinstance(p, SweepCallback)]
    if not sweep_callbacks:
        log.warning("restored Tuner: no SweepCallback found; its progress lines ignore --quiet and the cell count")
    for callback in sweep_callbacks:
        callback.show(display)


# ---------------------------------------------------------------- running


def max_pending(plan: SweepPlan) -> int:
    """How many trials of this sweep the cluster's resources hold now (at least 1)."""
    import ray

    r = plan.spec.resources
    total = ray.cluster_resources()
    cpu = r.driver_cpus + r.workers * r.cpus_per_worker if r.workers > 1 else r.cpus_per_worker
    gpu = r.workers * r.gpus_per_worker
    n = total.get("CPU", 0.0) / cpu
    if gpu:
        n = min(n, total.get("GPU", 0.0) / gpu)
    return max(1, math.floor(n + 1e-9))


@contextlib.contextmanager
def _pending_trials(plan: SweepPlan):
    """Without max_concurrent_trials, Tune keeps one trial pending when a searcher is set, so trials
    would start one at a time; let it keep as many pending as the cluster holds (unless the user
    set TUNE_MAX_PENDING_TRIALS_PG)."""
    if plan.spec.max_concurrent_trials is not None or PENDING_ENV in os.environ:
        yield
        return
    os.environ[PENDING_ENV] = str(max_pending(plan))
    try:
        yield
    finally:
        os.environ.pop(PENDING_ENV, None)


def fit(tuner, plan: SweepPlan) -> bool:
    """Tuner.fit; True when Tune stopped on a Ctrl-C before its trials finished."""
    with _pending_trials(plan):
        grid = tuner.fit()
    analysis = getattr(grid, "_experiment_analysis", None)
    trials = getattr(analysis, "trials", None) or []
    ended = (TrialStatus.TERMINATED, TrialStatus.ERROR)  # Ray's Trial.status of a trial that will not run on
    return any(getattr(t, "status", TrialStatus.TERMINATED) not in ended for t in trials)


def stored_cells(sdir: Path) -> list[str] | None:
    path = sdir / RAY_DIR / EXPERIMENT_CELLS
    try:
        return json.loads(path.read_text())["cells"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _aside(path: Path) -> None:
    if path.exists():
        k = 1
        while (path.parent / f"{path.name}.old{k}").exists():
            k += 1
        shutil.move(str(path), str(path.parent / f"{path.name}.old{k}"))


def retire(sdir: Path, cell_ids: list[str]) -> None:
    """Before a new experiment replaces the stored one (or a cell's experiment of an older calray):
    move Ray's dir aside and close the trials it left unfinished (`close_unfinished`)."""
    _aside(sdir / RAY_DIR / EXPERIMENT)
    for cid in cell_ids:
        _aside(sdir / RAY_DIR / cid)  # an experiment per cell (calray before one experiment per sweep)
    close_unfinished(sdir, cell_ids)


def close_unfinished(sdir: Path, cell_ids: list[str]) -> None:
    """Trials no experiment will run on: ABANDONED in the manifests, FAIL in the Optuna studies
    (they would count as running). Also after a restored experiment ended: a trial started after
    Ray's last experiment checkpoint (the driver killed) is in the manifest but not in Ray's state."""
    for cid in cell_ids:
        manifest = Manifest(manifest_path(sdir, cid))
        for tid, t in manifest.trials().items():
            if t["status"] not in (*FINISHED, TrialStatus.ABANDONED, TrialStatus.RETRIED):
                manifest.append({"ev": "end", "trial_id": tid, "status": TrialStatus.ABANDONED, "error": None})
    if not (sdir / OPTUNA_JOURNAL).is_file():
        return
    import optuna
    from optuna.trial import TrialState

    storage = journal_storage(sdir)
    for cid in cell_ids:
        try:
            study = optuna.load_study(study_name=cid, storage=storage)
        except KeyError:
            continue
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


def _restore(plan: SweepPlan, sdir: Path):
    from ray import tune

    exp = sdir / RAY_DIR / EXPERIMENT
    if not (exp.exists() and tune.Tuner.can_restore(str(exp))):
        return None
    try:
        return tune.Tuner.restore(str(exp), trainable=trainable(plan), resume_unfinished=True, resume_errored=False)
    except Exception as e:  # noqa: BLE001 - e.g. a truncated tuner.pkl (ray#58179)
        print(f"cannot restore {exp} ({type(e).__name__}: {e}); a new experiment runs the remaining trials",
              flush=True)
        return None


class Search:
    """One `run_search` call: the cells' manifests, targets and trial-end bookkeeping."""

    def __init__(self, plan: SweepPlan, cells: list[Cell], sdir: Path, on_cell_done: Callable[[str], None]):
        self.plan, self.cells, self.sdir = plan, cells, sdir
        self.manifests = {c.id: Manifest(manifest_path(sdir, c.id)) for c in cells}
        # a cell extended by --num-samples keeps its extra trials
        self.targets = {c.id: max(plan.num_samples(), self.done(c.id)) for c in cells}
        self.on_cell_done = on_cell_done

    def done(self, cid: str, count_errors: bool = True) -> int:
        return sum(count_errors or t["status"] != TrialStatus.ERROR for t in self.manifests[cid].finished().values())

    def check(self, cid: str) -> None:
        """A trial of `cid` ended: announce the cell once it has all its trials."""
        if cid in self.targets and self.done(cid) >= self.targets[cid]:
            self.on_cell_done(cid)

    def mark_retries(self) -> dict[str, list[dict]]:
        """--retry-failed: each failed trial RETRIED, its parameters the new experiment's first points."""
        retry: dict[str, list[dict]] = {}
        for cid, manifest in self.manifests.items():
            for tid, t in manifest.trials().items():
                if t["status"] == TrialStatus.ERROR:
                    manifest.append({"ev": "end", "trial_id": tid, "status": TrialStatus.RETRIED, "error": t["error"]})
                    retry.setdefault(cid, []).append(t["params"])
        return retry

    def short(self) -> dict[str, int]:
        return {cid: self.targets[cid] - self.done(cid) for cid in self.targets if self.done(cid) < self.targets[cid]}


def run_search(plan: SweepPlan, cells: list[Cell], sdir: Path, display: SweepDisplay | None = None,
               retry_failed: bool = False, on_cell_done: Callable[[str], None] = lambda cid: None) -> None:
    """Run (or resume) the trials every cell of `cells` still needs, all in one experiment;
    `on_cell_done(cell_id)` hears each cell that has all its trials (possibly more than once).

    Raises KeyboardInterrupt when Tune stopped early on a Ctrl-C (Tune catches the signal itself,
    saves its state and returns)."""
    display = display or SweepDisplay(n_cells=len(cells))
    run = Search(plan, cells, sdir, on_cell_done)
    for c in cells:
        if run.done(c.id, count_errors=not retry_failed) >= run.targets[c.id]:
            print(f"[cell {c.id}] {run.done(c.id)}/{run.targets[c.id]} trials already finished — skipped", flush=True)
            on_cell_done(c.id)
    if all(run.done(c.id, count_errors=not retry_failed) >= run.targets[c.id] for c in cells):
        return
    ids = [c.id for c in cells]
    stored = stored_cells(sdir)
    tuner = _restore(plan, sdir) if stored == ids else None
    if tuner is not None:
        print(f"resuming Ray experiment {sdir / RAY_DIR / EXPERIMENT} ({sum(map(run.done, ids))}/"
              f"{sum(run.targets.values())} trials of {len(ids)} cells finished)", flush=True)
        show(tuner, display, run.check)
        if fit(tuner, plan):
            raise KeyboardInterrupt
        close_unfinished(sdir, ids)
    retry = run.mark_retries() if retry_failed else {}
    for cid in ids:
        run.check(cid)
    need = run.short()
    if not need:
        return
    if (sdir / RAY_DIR / EXPERIMENT).exists() or any(m.events() for m in run.manifests.values()):
        retire(sdir, list(dict.fromkeys(ids + (stored or []))))
    finished = {cid: run.done(cid) for cid in ids}
    tuner = new_tuner(plan, cells, sdir, need, finished, run.targets, display, retry)
    show(tuner, display, run.check)
    atomic_write_text(sdir / RAY_DIR / EXPERIMENT_CELLS, json.dumps({"cells": ids}) + "\n")
    if fit(tuner, plan) or run.short():
        raise KeyboardInterrupt
