"""Every selected cell's trials in one Ray Tune experiment (issue 17.1; calray.sweep.routing and
calray.sweep.experiment): the CellSearcher (cell order, per-cell budget and cap, FINISHED, routing,
pickling), the routing scheduler (ASHA brackets per cell), the routing callback, and on one local
Ray a 2-cell sweep whose cells' trials overlap in time, and a kill -9 of the driver with both cells
running followed by --resume (every cell gets its trials once)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from calray.sweep.outputs import Manifest

from tests.conftest import tiny_run_dict
from tests.test_sweep import _journal_trials, _wait_for

REPO = Path(__file__).resolve().parent.parent
SPACE = {"method.T": {"loguniform": [0.5, 5.0]}, "method.eta": {"uniform": [0.0, 2.0]}}

pytest.importorskip("ray.tune")


class FakeSearch:
    """A cell's inner searcher: numbered params, and a record of what reached it."""

    def __init__(self, name: str):
        self.name, self.n, self.results, self.completed = name, 0, [], []

    def suggest(self, trial_id):
        self.n += 1
        return {"method.T": float(self.n), "who": self.name}

    def on_trial_result(self, trial_id, result):
        self.results.append(trial_id)

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.completed.append((trial_id, error))


def _searcher(max_per_cell=2):
    from calray.sweep.routing import cell_searcher

    cells = [{"id": "A", "fixed": {"cell": "A", "run": {"x": 1}}, "budget": 3, "search": FakeSearch("a")},
             {"id": "B", "fixed": {"cell": "B", "run": {"x": 2}}, "budget": 2, "search": FakeSearch("b")},
             {"id": "C", "fixed": {"cell": "C", "run": {"x": 3}}, "budget": 1, "search": None}]
    return cell_searcher(cells, max_per_cell=max_per_cell, metric="val_acc", mode="max")


def test_cell_searcher_order_budget_cap_routing_and_finished():
    from ray.tune.search import Searcher

    s = _searcher(max_per_cell=2)
    got = {t: s.suggest(t) for t in ("t1", "t2", "t3", "t4", "t5")}
    # fewest running first, then fewest started, then sweep order
    assert [got[t]["cell"] for t in got] == ["A", "B", "C", "A", "B"]
    assert got["t1"] == {"cell": "A", "run": {"x": 1}, "method.T": 1.0, "who": "a"}  # fixed config + its params
    assert got["t4"]["method.T"] == 2.0 and got["t3"] == {"cell": "C", "run": {"x": 3}}  # C: its config as given
    assert s.suggest("t6") is None  # A at its cap (2 running), B and C have their budget: wait
    s.on_trial_result("t1", {"val_acc": 0.5})
    s.on_trial_complete("t1", {"val_acc": 0.5})
    s.on_trial_complete("t3", {"val_acc": 0.1}, error=True)
    assert s.searchers["A"].results == ["t1"] and s.searchers["A"].completed == [("t1", False)]
    assert s.searchers["B"].completed == []  # a completion reaches its own cell's searcher only
    assert s.suggest("t6")["cell"] == "A"  # A's cap freed a place; its third and last trial
    assert s.suggest("t7") == Searcher.FINISHED  # every cell has started its budget
    assert s.started == {"A": 3, "B": 2, "C": 1}

    uncapped = _searcher(max_per_cell=None)
    assert [uncapped.suggest(f"u{i}")["cell"] for i in range(6)] == ["A", "B", "C", "A", "B", "A"]


def test_cell_searcher_pickles_and_restores_its_state(tmp_path):
    s = _searcher()
    for t in ("t1", "t2", "t3"):
        s.suggest(t)
    s.on_trial_complete("t2", {"val_acc": 0.3})
    copy = pickle.loads(pickle.dumps(s))  # tuner.pkl
    assert type(copy) is type(s)
    assert (copy.started, copy.owner, copy.live, copy.budget) == (s.started, s.owner, s.live, s.budget)
    assert copy.searchers["B"].completed == [("t2", False)] and copy.metric == "val_acc"
    assert copy.suggest("t4") == s.suggest("t4")  # the same next step: it carries on where it was
    s.save(str(tmp_path / "searcher.pkl"))  # Tune's searcher checkpoint
    fresh = _searcher()
    fresh.restore(str(tmp_path / "searcher.pkl"))
    assert fresh.started == s.started and fresh.owner == s.owner and fresh.suggest("t5") == s.suggest("t5")


def _trial(trial_id, cell):
    return SimpleNamespace(trial_id=trial_id, config={"cell": cell})


def test_routing_scheduler_keeps_asha_brackets_per_cell():
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from calray.sweep.routing import cell_scheduler

    def asha():
        return ASHAScheduler(time_attr="epochs_done", max_t=8, grace_period=1, reduction_factor=2,
                             stop_last_trials=False)

    router = cell_scheduler({"A": asha(), "B": asha()})
    assert router.set_search_properties("val_acc", "max")
    shared = asha()  # the control: one bracket for every cell
    shared.set_search_properties("val_acc", "max")
    b1, b2, a1, a2 = _trial("b1", "B"), _trial("b2", "B"), _trial("a1", "A"), _trial("a2", "A")
    for t in (b1, b2, a1, a2):
        router.on_trial_add(None, t)
        shared.on_trial_add(None, t)

    def result(v):
        return {"epochs_done": 1, "val_acc": v}

    for sched in (router, shared):
        assert sched.on_trial_result(None, b1, result(0.9)) == TrialScheduler.CONTINUE
        assert sched.on_trial_result(None, b2, result(0.95)) == TrialScheduler.CONTINUE
    # cell A's weak trial meets only cell A's results: its first is never stopped by cell B's
    assert router.on_trial_result(None, a1, result(0.1)) == TrialScheduler.CONTINUE
    assert shared.on_trial_result(None, a1, result(0.1)) == TrialScheduler.STOP
    # within a cell ASHA still halves: a worse second trial of A stops
    assert router.on_trial_result(None, a2, result(0.05)) == TrialScheduler.STOP
    router.on_trial_complete(None, a1, result(0.1))
    router.on_trial_remove(None, a2)
    assert set(router.schedulers["A"]._trial_info) == set() and set(router.schedulers["B"]._trial_info) == {"b1", "b2"}
    assert pickle.loads(pickle.dumps(router)).schedulers.keys() == {"A", "B"}


class Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, hook):
        if not hook.startswith(("on_", "setup")):
            raise AttributeError(hook)
        return lambda **info: self.calls.append((hook, getattr(info.get("trial"), "trial_id", None)))


def test_routing_callback_sends_trial_hooks_to_their_cell_and_global_hooks_to_all():
    from calray.sweep.routing import cell_callbacks

    a, b = Recorder(), Recorder()
    router = cell_callbacks({"A": [a], "B": [b]})
    ends = []
    router.on_end = ends.append
    router.setup(stop=None, num_samples=2, total_num_samples=2)
    t = _trial("a1", "A")
    router.on_trial_start(iteration=0, trials=[t], trial=t)
    router.on_trial_result(iteration=0, trials=[t], trial=t, result={})
    router.on_trial_complete(iteration=0, trials=[t], trial=t)
    router.on_step_end(iteration=1, trials=[t])
    assert a.calls == [("setup", None), ("on_trial_start", "a1"), ("on_trial_result", "a1"),
                       ("on_trial_complete", "a1"), ("on_step_end", None)]
    assert b.calls == [("setup", None), ("on_step_end", None)] and ends == ["A"]
    copy = pickle.loads(pickle.dumps(cell_callbacks({"A": [], "B": []})))
    assert copy.on_end is None and set(copy.callbacks) == {"A", "B"}  # the listener is this process's


# ---------------------------------------------------------------- on a local Ray



CELLS = {"noise": [{"kind": "none"}, {"kind": "gaussian", "eps": 5, "mode": "test"}]}
IDS = ["synthetic__none", "synthetic__gaussian_eps5_test"]


def write_sweep(tmp_path: Path, name: str, run: dict, **blocks) -> Path:
    tree = {"name": name, "run": run, "cells": CELLS, "search": {"num_samples": 3, "seed": 0, "space": SPACE},
            "resources": {"workers": 1, "cpus_per_worker": 1}, "ray": {"storage_path": str(tmp_path / "sweeps")}}
    tree.update(blocks)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def _spans(sdir: Path, cell: str) -> list[tuple[float, float]]:
    out = []
    for p in sorted((sdir / "runs" / cell).glob("*/summary.json")):
        s = json.loads(p.read_text())
        out.append((s["started_at"], s["finished_at"]))
    return out


def test_two_cells_trials_run_together_with_their_own_outputs_and_studies(ray_tune_local, tmp_path, capfd):
    import pandas as pd

    from calray.sweep.runner import main

    run = tiny_run_dict(tmp_path)
    run["data"]["params"]["n_train"] = 3000  # trials of ~1 s: 0.2 s ones could run one after another
    path = write_sweep(tmp_path, "together", run, max_concurrent_trials=4)
    assert main([str(path)]) == 0
    out = capfd.readouterr().out
    sdir = tmp_path / "sweeps" / "together"
    spans = {c: _spans(sdir, c) for c in IDS}
    assert all(len(s) == 3 for s in spans.values())
    overlap = [(a, b) for a in spans[IDS[0]] for b in spans[IDS[1]] if a[0] < b[1] and b[0] < a[1]]
    assert overlap, f"no trial of {IDS[0]} overlapped one of {IDS[1]}: {spans}"
    assert "[cell 1/2 synthetic__none]" in out and "[cell 2/2 synthetic__gaussian_eps5_test]" in out
    assert "cells done 1/2" in out and "cells done 2/2" in out
    cells = {c["cell"]: c for c in json.loads((sdir / "cells.json").read_text())}
    df = pd.read_parquet(sdir / "trials.parquet")
    studies = _journal_trials(sdir)
    assert set(studies) == set(IDS)
    for cid in IDS:
        assert cells[cid]["status"] == "done" and cells[cid]["n_trials"] == 3
        sub = df[df.cell == cid]
        assert sub.trial_id.nunique() == 3 and set(sub.status) == {"TERMINATED"}
        assert all(Path(r).parent == sdir / "runs" / cid for r in sub.run_dir)
        assert [t.state.name for t in studies[cid]] == ["COMPLETE"] * 3
        assert max(t.value for t in studies[cid]) == pytest.approx(cells[cid]["best_val_acc"])
        # each study's values are its own cell's trials' (the routing of completions)
        finals = {round(v, 6) for v in sub.groupby("trial_id").best_val_acc.first()}
        assert {round(t.value, 6) for t in studies[cid]} == finals
    assert not df.duplicated(["trial_id", "epoch"]).any()


def test_kill_minus_nine_with_both_cells_running_then_resume(ray_tune_local, tmp_path, capfd):
    import pandas as pd

    from calray.sweep.runner import main

    run = tiny_run_dict(tmp_path, optim={"name": "sgd", "lr": 0.05, "epochs": 4})
    run["data"]["params"]["n_train"] = 6000  # trials of a few seconds: the kill lands mid-trial
    path = write_sweep(tmp_path, "killed", run, max_concurrent_trials=2, max_concurrent_trials_per_cell=1)
    sdir = tmp_path / "sweeps" / "killed"
    manifests = [Manifest(sdir / "manifest" / f"{c}.jsonl") for c in IDS]
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    proc = subprocess.Popen([sys.executable, "-m", "calray.sweep", str(path), "--address", ray_tune_local],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    def running(m, with_epoch):
        return any(t["status"] == "RUNNING" and (t["epochs"] or not with_epoch) for t in m.trials().values())

    try:  # both cells have a running trial, one of them past its first epoch (on a fast machine
        # requiring an epoch in both raced the short trials: they finished between two polls)
        _wait_for(lambda: all(running(m, False) for m in manifests) and any(running(m, True) for m in manifests),
                  400, "a running trial in both cells, one with an epoch", proc, poll=0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = [m.trials() for m in manifests]
    assert all(any(t["status"] == "RUNNING" for t in b.values()) for b in before)

    capfd.readouterr()
    assert main([str(path), "--resume", "--quiet"]) == 0
    out = capfd.readouterr().out
    assert "resuming Ray experiment" in out, out[-3000:]  # the one experiment of both cells, restored
    df = pd.read_parquet(sdir / "trials.parquet")
    studies = _journal_trials(sdir)
    for cid, m, b in zip(IDS, manifests, before):
        sub = df[df.cell == cid]
        assert sub.trial_id.nunique() == 3, (cid, out[-3000:])
        assert set(sub.status) == {"TERMINATED"}
        assert all(list(g) == [0, 1, 2, 3] for _, g in sub.groupby("trial_id").epoch)
        done_before = {t for t, v in b.items() if v["status"] == "TERMINATED"}
        assert done_before <= set(sub.trial_id)  # nothing finished is lost or run again
        states = [t.state.name for t in studies[cid]]  # a trial lost with the driver: FAIL (ABANDONED)
        assert states.count("COMPLETE") == 3 and set(states) <= {"COMPLETE", "FAIL"}, states
        assert not [t for t in m.trials().values() if t["status"] == "RUNNING"]
    assert not df.duplicated(["trial_id", "epoch"]).any()
    assert all(c["status"] == "done" and c["n_trials"] == 3 for c in json.loads((sdir / "cells.json").read_text()))


def test_null_cap_lets_tune_keep_as_many_trials_pending_as_the_cluster_holds(tmp_path, monkeypatch):
    """Ray 2.60 keeps ONE trial pending when a searcher runs without max_concurrent_trials (trials
    would start one at a time); the sweep lets it keep as many as the cluster's resources hold."""
    import ray

    from calray.sweep import experiment
    from calray.sweep.spec import load_sweep

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    monkeypatch.delenv(experiment.PENDING_ENV, raising=False)
    plan = load_sweep(write_sweep(tmp_path, "p", tiny_run_dict(tmp_path)))
    assert experiment.max_pending(plan) == 8
    gpu = load_sweep(write_sweep(tmp_path, "g", tiny_run_dict(tmp_path),
                                 resources={"workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 1}))
    assert experiment.max_pending(gpu) == 1  # 2 GPUs / (2 workers × 1 GPU); CPUs: 8 / 2.5
    seen = []
    with experiment._pending_trials(plan):
        seen.append(os.environ.get(experiment.PENDING_ENV))
    assert seen == ["8"] and experiment.PENDING_ENV not in os.environ
    capped = load_sweep(write_sweep(tmp_path, "c", tiny_run_dict(tmp_path), max_concurrent_trials=3))
    with experiment._pending_trials(capped):  # a cap: Tune's ConcurrencyLimiter sets the pending count
        assert experiment.PENDING_ENV not in os.environ


def test_retire_moves_the_experiment_aside_and_abandons_its_unfinished_trials(tmp_path):
    """A resume with another cell selection (or one the stored experiment cannot serve) runs the rest
    in a new experiment: the old one's dir is kept aside, its unfinished trials close as ABANDONED."""
    from calray.sweep.experiment import EXPERIMENT, retire

    (tmp_path / "ray" / EXPERIMENT).mkdir(parents=True)
    (tmp_path / "ray" / "A").mkdir()  # a per-cell experiment of an older calray
    a = Manifest(tmp_path / "manifest" / "A.jsonl")
    a.append({"ev": "start", "trial_id": "a1", "params": {}})
    a.append({"ev": "start", "trial_id": "a2", "params": {}})
    a.append({"ev": "end", "trial_id": "a2", "status": "TERMINATED", "error": None})
    retire(tmp_path, ["A", "B"])
    assert {t: v["status"] for t, v in a.trials().items()} == {"a1": "ABANDONED", "a2": "TERMINATED"}
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == ["A.old1", f"{EXPERIMENT}.old1"]
    (tmp_path / "ray" / EXPERIMENT).mkdir()
    retire(tmp_path, ["A"])
    assert (tmp_path / "ray" / f"{EXPERIMENT}.old2").is_dir() and len(a.events()) == 4  # nothing closed twice
