"""The robustness grid's test mode in parallel: one Ray task per (target, kind), with the grid's
``cpus_per_trial`` / ``gpus_per_trial`` as its resources and at most ``max_concurrent_trials`` in
flight (None: as many as the cluster's resources allow; Ray queues the rest).

Why (target, kind): a task loads the checkpoint, builds the model and the clean test set once and
reuses them for every (attacked, ε, noise seed) of its kind — the loading costs about as much as one
evaluation, so a task per ε or per seed would repeat it for every row; and targets × kinds (a
sweep's cells × final seeds × kinds) already gives more tasks than a cluster has slots.

The task (`calray.robustness.evaluation.kind_task`) returns its rows and log lines; the driver
prints a progress line per task as results arrive, plus the task's lines unless `quiet`. A task
that raises or whose worker dies gives failed rows for all of its settings. `run_serial` is the
same work one (target, kind) after another in this process (``test_tasks: false``); both give the
same rows in the same order (targets, then kinds, as the grid lists them).
"""

from __future__ import annotations

import time

from calray.robustness.evaluation import error_line, failed_rows, kind_task, run_kind
from calray.robustness.spec import GridSpec
from calray.robustness.targets import Target, say

PREFIX = "[robustness test]"


def units(targets: list[Target], spec: GridSpec) -> list[tuple[Target, str]]:
    return [(t, kind) for t in targets for kind in spec.kinds]


def run_serial(targets: list[Target], spec: GridSpec, quiet: bool = False) -> list[dict]:
    """Every (target, kind) one after another in this process."""
    results: list[list[dict]] = []
    work = units(targets, spec)
    log = (lambda _msg: None) if quiet else say
    for i, (target, kind) in enumerate(work, 1):
        t0 = time.time()
        results.append(run_kind(target, kind, spec, log))
        _progress(i, len(work), 0, _n_failed_units(results), target, kind, results[-1], time.time() - t0)
    return [r for got in results for r in got]


def _n_failed_units(results: list[list[dict]]) -> int:
    return sum(bool(r) and all(x["status"] != "ok" for x in r) for r in results)


def _progress(done: int, total: int, running: int, failed: int, target: Target, kind: str,
              rows: list[dict], seconds: float) -> None:
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        what = f"{len(ok)}/{len(rows)} rows ok in {seconds:.1f}s"
    else:
        what = f"FAILED: {rows[0]['error'] if rows else 'no rows'}"
    print(f"{PREFIX} tasks {done}/{total} finished, {running} running, {failed} failed | "
          f"{target.label} {kind}: {what}", flush=True)


def run_tasks(targets: list[Target], spec: GridSpec, quiet: bool = False) -> list[dict]:
    """Every (target, kind) as a Ray task on the Ray instance this process is connected to."""
    import ray  # heavy: only when the grid runs as tasks

    work = units(targets, spec)
    remote = ray.remote(kind_task).options(num_cpus=spec.cpus_per_trial, num_gpus=spec.gpus_per_trial,
                                           max_retries=0, name="robustness_test")
    cap = spec.max_concurrent_trials or len(work)
    results: dict[int, list[dict]] = {}
    in_flight: dict = {}  # ObjectRef -> unit index
    next_unit = 0
    say(f"test mode: {len(work)} Ray tasks (target × kind), {spec.cpus_per_trial:g} CPU / "
        f"{spec.gpus_per_trial:g} GPU each, at most {cap} in flight")
    while next_unit < len(work) or in_flight:
        while next_unit < len(work) and len(in_flight) < cap:
            target, kind = work[next_unit]
            in_flight[remote.remote(target, kind, spec)] = next_unit
            next_unit += 1
        (ref,), _ = ray.wait(list(in_flight), num_returns=1)
        i = in_flight.pop(ref)
        target, kind = work[i]
        try:
            out = ray.get(ref)
            rows, lines, seconds = out["rows"], out["lines"], out["seconds"]
        except Exception as e:  # noqa: BLE001 - RayTaskError, a dead worker: this task's rows fail
            rows, lines, seconds = failed_rows(target, kind, spec, error_line(_cause(e))), [], 0.0
        results[i] = rows
        for line in ([] if quiet else lines):
            say(line)
        _progress(len(results), len(work), len(in_flight), _n_failed_units(list(results.values())),
                  target, kind, rows, seconds)
    return [r for i in range(len(work)) for r in results[i]]


def _cause(e: BaseException) -> BaseException:
    """The user-level exception inside a RayTaskError (its `cause`), else `e`."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e
