"""calray.sweep.runner: sweep-file validation, --dry-run without Ray, trial determinism, and on one local
Ray instance a tiny sweep (outputs, journal, best configs, failed cell) and --resume after a
Ctrl-C (no trial lost, none duplicated)."""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from calray.config import load_config
from calray.errors import ConfigError
from calray.sweep.spec import load_sweep
from calray.ray.trial import FINAL_KEY, execute_trial

from tests.conftest import tiny_run_dict

REPO = Path(__file__).resolve().parent.parent
SPACE = {"method.T": {"loguniform": [0.5, 5.0]}, "method.eta": {"uniform": [0.0, 2.0]},
         "method.lambda": {"loguniform": [0.01, 1.0]}, "method.n": {"choice": [1, 2]}}


def write_sweep(tmp_path: Path, name: str, **blocks) -> Path:
    tree = {"name": name, "run": tiny_run_dict(tmp_path), "search": {"num_samples": 3, "seed": 0, "space": SPACE},
            "resources": {"workers": 1, "cpus_per_worker": 1}, "max_concurrent_trials": 2,
            "ray": {"storage_path": str(tmp_path / "sweeps")}}
    tree.update(blocks)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


# ---------------------------------------------------------------- no Ray


@pytest.mark.parametrize("patch, key", [
    ({"serach": {}}, "serach: unknown key"),
    ({"search": {"space": {"method.T": {"loguniform": [0, 1]}}}}, "search.space.method.T"),
    ({"search": {"space": {"method.TT": {"uniform": [0, 1]}}}}, "search.space.method.TT: unknown key"),
    ({"search": {"space": {"method.eta": {"uniform": [-1, 1]}}}}, "search.space.method.eta"),
    ({"search": {"space": {"method.T": {"uniform": [1, 2], "choice": [1]}}}}, "search.space.method.T"),
    ({"search": {"algorithm": "grid", "space": {"method.T": {"uniform": [1, 2]}}}}, "search"),
    ({"cells": {"noise": [{"kind": "gaussian", "eps": 5, "mod": "test"}]}}, "cells.noise.0.mod: unknown key"),
    ({"cells": {"noise": [{"kind": "gausian"}]}}, "cells.noise.0.kind"),
    ({"resources": {"workers": 2, "gpus_per_worker": 0.5}}, "resources"),
    ({"scheduler": {"asha": {"grace_period": 0}}}, "scheduler.asha.grace_period"),
    ({"run": None, "base": "missing.yaml"}, "base: run config 'missing.yaml' not found"),
    ({"set": {"optim.lrr": 0.1}}, "optim.lrr: unknown key"),
    ({"robustness": {"kinds": ["gaussian"], "epz": [5]}}, "robustness.epz: unknown key"),
    ({"robustness": {"eps": [5, -1]}}, "robustness.eps.1"),
])
def test_bad_sweep_file_names_file_and_key(tmp_path, patch, key):
    path = write_sweep(tmp_path, "bad", **patch)
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg and key in msg, msg


def test_cli_reports_one_line_error(tmp_path):
    from calray.sweep.runner import main

    path = write_sweep(tmp_path, "bad", search={"space": {"method.TT": {"uniform": [0, 1]}}})
    r = subprocess.run([sys.executable, "-m", "calray.sweep", str(path), "--dry-run"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "search.space.method.TT: unknown key" in r.stderr
    assert main([str(path), "--dry-run", "--cells", "nope*"]) == 2


def test_cells_expand_dataset_noise_variants(tmp_path):
    path = write_sweep(tmp_path, "cells", cells={
        "dataset": [{"name": "synthetic"},
                    {"name": "other", "set": {"data.params.dim": 8}, "noise": [{"kind": "none"}]}],
        "noise": [{"kind": "none"}, {"kind": "gaussian", "eps": [5, 2.5], "mode": ["test", "train+test"]}],
        "variants": [{"name": "cal", "set": {"method.strategy": "cal"}},
                     {"name": "null", "set": {"method.strategy": "null"}}]})
    plan = load_sweep(path)
    ids = [c.id for c in plan.cells]
    assert len(ids) == 5 * 2 + 1 * 2 and len(set(ids)) == len(ids)
    assert "synthetic__gaussian_eps5_test__cal" in ids
    assert "synthetic__gaussian_eps2p5_train_test__null" in ids
    assert "other__none__null" in ids
    cell = next(c for c in plan.cells if c.id == "synthetic__gaussian_eps5_test__null")
    assert cell.run["noise"]["eps"] == 5.0 and cell.run["noise"]["mode"] == "test"
    assert cell.run["method"]["strategy"] == "null"
    assert next(c for c in plan.cells if c.id.startswith("other")).run["data"]["params"]["dim"] == 8


def test_dry_run_imports_no_ray_and_ready_sweeps_validate():
    sweeps = sorted(str(p) for p in (REPO / "sweeps").glob("*.yaml"))
    names = {Path(s).stem for s in sweeps}
    assert {"quickstart", "nyud2_noise", "mvsa_noise", "cremad_imbalance", "ks_imbalance", "ave_imbalance",
            "ablation_modulation", "ablation_aib", "ablation_contribution"} <= names
    code = ("import sys, io, contextlib\n"
            "from calray.sweep.runner import main\n"
            f"for s in {sweeps!r}:\n"
            "    buf = io.StringIO()\n"
            "    with contextlib.redirect_stdout(buf):\n"
            "        rc = main([s, '--dry-run'])\n"
            "    assert rc == 0, s\n"
            "    assert 'resolved run config' in buf.getvalue(), s\n"
            "assert 'ray' not in sys.modules, 'dry run imported ray'\n"
            "print('OK')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]


def test_same_trial_config_and_seed_gives_same_metrics(tmp_path):
    config = {"run": tiny_run_dict(tmp_path), "method.T": 2.0, "method.eta": 1.5, "method.n": 1}
    reports = []
    for i in range(2):
        got = []
        execute_trial({**config, "run_dir": str(tmp_path / f"r{i}")}, got.append, f"t{i}")
        reports.append([{k: v for k, v in r.items() if k not in ("time_s", "train_time_s", "run_dir")} for r in got])
    assert len(reports[0]) == 3 and reports[0][-1][FINAL_KEY] == 1
    assert reports[0] == reports[1]
    trial = json.loads((tmp_path / "r0" / "trial.json").read_text())
    assert trial["seed"] == 0 and trial["params"]["method.T"] == 2.0 and trial["versions"]["torch"]
    resolved = load_config(tmp_path / "r0" / "config.yaml")
    assert resolved.method.T == 2.0 and resolved.method.n == 1


def _fake_trial(trial_id: str, config: dict, last_result: dict | None = None):
    from types import SimpleNamespace

    return SimpleNamespace(trial_id=trial_id, config=config, last_result=last_result, error_file=None)


def test_progress_lines_of_sweep_trials_and_robustness_retrains(tmp_path, capsys):
    """One progress-line implementation: the sweep's cell line, the retrains' line, and their quiet switches."""
    from calray.ray.progress import RetrainProgress
    from calray.sweep.progress import SweepCallback, SweepDisplay

    display = SweepDisplay(n_cells=2, cell_index=1, quiet=False, interval_s=30.0)
    cb = SweepCallback(tmp_path / "manifest" / "c.jsonl", "c", 3, "val_acc", "max", display)
    cb.setup()
    t1 = _fake_trial("t1", {"method.T": 2.0, "run_dir": str(tmp_path / "t1")})
    cb.on_trial_start(0, [], t1)
    cb.on_trial_complete(0, [], _fake_trial("t1", t1.config, {FINAL_KEY: 1, "val_acc": 0.5, "test_acc": 0.25}))
    (tmp_path / "t2").mkdir()
    (tmp_path / "t2" / "error.txt").write_text("TrainingError: non-finite loss\n")
    cb.on_trial_error(0, [], _fake_trial("t2", {"run_dir": str(tmp_path / "t2")}))
    assert capsys.readouterr().out.splitlines() == [
        "[cell 1/2 c] trials 0/3 finished, 1 running, 0 failed, 0 pruned | best - | trial t1 started method.T=2",
        "[cell 1/2 c] trials 1/3 finished, 0 running, 0 failed, 0 pruned | best val_acc 0.5000 (t1) | "
        "trial t1 TERMINATED val_acc=0.5000 test_acc=0.2500",
        "[cell 1/2 c] trials 2/3 finished, 0 running, 1 failed, 0 pruned | best val_acc 0.5000 (t1) | "
        "trial t2 ERROR: TrainingError: non-finite loss"]
    assert [e["ev"] for e in cb.manifest.events()] == ["start", "end", "end"]
    display.quiet = True
    cb.on_trial_start(0, [], _fake_trial("t3", {}))
    assert capsys.readouterr().out == ""

    for quiet in (False, True):
        rp = RetrainProgress(["tiny none eps=0 train seed 0", "tiny gaussian eps=5 train seed 0"],
                             [tmp_path / "a", tmp_path / "b"], quiet=quiet)
        rp.setup()
        for i in range(2):
            trial = _fake_trial(f"r{i}", {"index": i})
            rp.on_trial_start(0, [], trial)
            rp.on_trial_result(0, [], trial, {FINAL_KEY: 0})
            trial.last_result = {FINAL_KEY: 1, "test_acc": 0.5, "test_macro_f1": 0.25}
            rp.on_trial_complete(0, [], trial)
        lines = capsys.readouterr().out.splitlines()
        assert lines == ([] if quiet else [
            "[robustness train+test] retrains 1/2 finished, 0 running, 0 failed | "
            "trial r0 (tiny none eps=0 train seed 0) TERMINATED test_acc=0.5000 test_macro_f1=0.2500",
            "[robustness train+test] retrains 2/2 finished, 0 running, 0 failed | "
            "trial r1 (tiny gaussian eps=5 train seed 0) TERMINATED test_acc=0.5000 test_macro_f1=0.2500"])


def _noop_trainable(config):
    pass


def test_a_restored_tuner_prints_with_the_running_sweeps_display(tmp_path):
    """The display (cell i/n, --quiet) belongs to the sweep process: tuner.pkl leaves it out, and the
    SweepCallback a restored Tuner unpickles gets the running sweep's."""
    tune = pytest.importorskip("ray.tune")
    from calray.ray.progress import progress_of, tune_callback
    from calray.sweep.progress import SweepCallback, SweepDisplay
    from calray.sweep.experiment import show as _show

    first = SweepDisplay(n_cells=3, cell_index=2, quiet=False)
    cb = SweepCallback(tmp_path / "manifest" / "c.jsonl", "c", 3, "val_acc", "max", first)
    tune.Tuner(_noop_trainable, run_config=tune.RunConfig(name="exp", storage_path=str(tmp_path / "ray"),
                                                          callbacks=[tune_callback(cb)]))
    restored = tune.Tuner.restore(str(tmp_path / "ray" / "exp"), trainable=_noop_trainable)
    (again,) = progress_of(restored)
    assert again is not cb and (again.cell_id, again.metric, again.num_samples) == ("c", "val_acc", 3)
    assert again._display == SweepDisplay()  # not the pickling run's
    resumed = SweepDisplay(n_cells=1, cell_index=1, quiet=True)
    _show(restored, resumed)
    assert again._display is resumed and again._quiet()


class _FakeSplits:
    """A stand-in for DatasetSplits: 2 × `mb` MiB of float32, train's and one tensor val and test share."""

    built: list = []

    def __init__(self, cfg, mb: int = 1):
        self.eps = cfg.noise.eps
        self.train = torch.zeros(mb * 2**18)
        self.val = self.test = torch.zeros(mb * 2**18)


def _fake_build_mb(mb: int, cfg):
    _FakeSplits.built.append(cfg.noise.eps)
    return _FakeSplits(cfg, mb)


def _fake_build(mb: int):
    return functools.partial(_fake_build_mb, mb)  # picklable


def test_splits_cache_keeps_alternating_blocks_within_its_budget_and_pickles_empty(tiny_cfg):
    import pickle

    from calray.ray.splits import SplitsCache

    _FakeSplits.built = []
    cache = SplitsCache(build=_fake_build(1), max_bytes=5 * 2**20)  # 2 MiB per entry: two fit, not three
    clean, noisy, noisier = (tiny_cfg(), tiny_cfg(noise={"kind": "gaussian", "eps": 5.0}),
                             tiny_cfg(noise={"kind": "gaussian", "eps": 10.0}))
    first, seconds = cache.lookup(clean)
    assert seconds is not None and seconds >= 0
    assert cache.lookup(clean) == (first, None)  # the same blocks: reused, no build time
    for _ in range(3):  # cells alternating in one worker: each built once
        assert cache.get(noisy).eps == 5.0 and cache.get(clean) is first
    assert _FakeSplits.built == [0.0, 5.0]
    cache.get(noisier)  # a third block: the least recently used (noisy) goes
    assert [json.loads(k)["noise"]["eps"] for k in cache.keys()] == [0.0, 10.0]
    assert cache.get(clean) is first and cache.get(noisy).eps == 5.0
    assert _FakeSplits.built == [0.0, 5.0, 10.0, 5.0]
    copy = pickle.loads(pickle.dumps(cache))  # a copy in another process starts empty
    assert copy.keys() == [] and copy.max_bytes == cache.max_bytes and copy.get(noisy).eps == 5.0


def test_splits_cache_frees_a_dataset_over_its_budget_before_building_the_next(tiny_cfg):
    from calray.ray.splits import SplitsCache

    cached_at_build = []
    cache = SplitsCache(max_bytes=3 * 2**20)

    def build(cfg):  # 4 MiB each: over the budget alone
        cached_at_build.append(len(cache._entries))  # under the lookup's lock
        return _FakeSplits(cfg, 2)

    cache._build = build
    clean, noisy = tiny_cfg(), tiny_cfg(noise={"kind": "gaussian", "eps": 5.0})
    big = cache.get(clean)
    assert cache.get(clean) is big  # the newest is kept whatever its size
    cache.get(noisy)
    assert cached_at_build == [0, 0] and len(cache.keys()) == 1  # freed before the build, as one slot did


def test_resident_bytes_counts_each_storage_once_and_no_file_pages(tmp_path):
    import numpy as np

    from calray.ray.splits import resident_bytes

    t = torch.zeros(1000)  # 4,000 bytes; its views share them
    a = np.ones((10, 10))  # 800 bytes
    mm = np.lib.format.open_memmap(tmp_path / "m.npy", mode="w+", dtype=np.float32, shape=(10_000,))

    class Holder:
        def __init__(self):
            self.parts = {"t": t, "view": t[10:20], "list": [a, a[2:]], "mm": mm, "n": 3, "s": "x" * 100}

    h = Holder()
    assert resident_bytes(h) == 4000 + 800
    assert resident_bytes([h, Holder(), t.clone()]) == 4000 + 800 + 4000


def test_sweep_quiet_reaches_the_robustness_stage(tmp_path, monkeypatch):
    from calray.report import render as report
    from calray.robustness import grid as robustness
    from calray.sweep.runner import finish_hooks

    plan = load_sweep(write_sweep(tmp_path, "rob", robustness={"modes": ["train+test"], "eps": [5]}))
    calls = []
    monkeypatch.setattr(robustness, "run_grid", lambda *a, **kw: calls.append(kw))
    monkeypatch.setattr(report, "write_report", lambda sdir: None)
    for quiet in (True, False):
        assert finish_hooks(plan, plan.cells, tmp_path, None, quiet=quiet) == 0
    assert [kw.get("quiet") for kw in calls] == [True, False]


# ---------------------------------------------------------------- on a local Ray



def _journal_trials(sdir: Path) -> dict[str, list]:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(sdir / "optuna.journal")))
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage).trials
            for s in optuna.get_all_study_summaries(storage)}


def test_tiny_sweep_outputs(ray_tune_local, tmp_path):
    import pandas as pd

    from calray.sweep.runner import main
    from calray.engine.trainer import train

    path = write_sweep(
        tmp_path, "tiny",
        cells={"dataset": [{"name": "synthetic"},
                           {"name": "diverge", "set": {"optim.lr": 1.0e30}, "noise": [{"kind": "none"}]}],
               "noise": [{"kind": "none"}, {"kind": "gaussian", "eps": 5, "mode": "test"}]},
        scheduler={"asha": {"grace_period": 1, "reduction_factor": 2}})
    assert main([str(path), "--quiet"]) == 0
    sdir = tmp_path / "sweeps" / "tiny"
    for f in ("sweep.yaml", "cells.json", "trials.parquet", "trials.csv", "optuna.journal"):
        assert (sdir / f).is_file(), f

    ok_cells = ["synthetic__none", "synthetic__gaussian_eps5_test"]
    df = pd.read_parquet(sdir / "trials.parquet")
    assert len(pd.read_csv(sdir / "trials.csv")) == len(df)
    for col in ("sweep", "cell", "trial_id", "status", "error", "seed", "param.method.T", "param.method.n",
                "epoch", "val_acc", "train_loss", "a_audio", "W_visual", "test_acc", "best_val_acc",
                "best_epoch", "run_dir"):
        assert col in df.columns, col
    assert not df.duplicated(["trial_id", "epoch"]).any()
    for cell in ok_cells:
        sub = df[df.cell == cell]
        assert sub.trial_id.nunique() == 3
        assert set(sub.status) <= {"TERMINATED", "PRUNED"} and "TERMINATED" in set(sub.status)
        done = sub[sub.status == "TERMINATED"]
        for _, g in done.groupby("trial_id"):
            assert list(g.epoch) == [0, 1]
            assert g.test_acc.nunique() == 1 and 0 <= g.test_acc.iloc[0] <= 1
            assert g.best_val_acc.iloc[0] == pytest.approx(g.val_acc.max())
            assert (Path(g.run_dir.iloc[0]) / "checkpoints" / "best.pt").is_file()
            assert Path(g.run_dir.iloc[0]).parent == sdir / "runs" / cell
    failed = df[df.cell == "diverge__none"]
    assert failed.trial_id.nunique() == 3 and set(failed.status) == {"ERROR"}
    assert failed.epoch.isna().all() and failed.error.str.contains("non-finite loss").all()

    cells = {c["cell"]: c for c in json.loads((sdir / "cells.json").read_text())}
    assert cells["diverge__none"]["status"] == "failed" and cells["diverge__none"]["n_failed"] == 3
    assert cells["diverge__none"]["best_config"] is None

    studies = _journal_trials(sdir)
    assert set(studies) == set(cells)
    for cell in ok_cells:
        rec = cells[cell]
        assert rec["status"] == "done" and rec["n_trials"] == 3
        assert rec["noise"]["kind"] == ("none" if cell.endswith("none") else "gaussian")
        assert [t.state.name for t in studies[cell]].count("RUNNING") == 0 and len(studies[cell]) == 3
        complete = [t for t in studies[cell] if t.state.name == "COMPLETE"]
        assert max(t.value for t in complete) == pytest.approx(rec["best_val_acc"])
        # the best config is complete and re-trains
        cfg = load_config(sdir / rec["best_config"], {"optim.epochs": 1, "runtime.output_dir": str(tmp_path / "re")})
        assert cfg.method.T == pytest.approx(rec["best_params"]["method.T"])
        assert cfg.noise.kind == rec["noise"]["kind"]
        assert 0.0 <= train(cfg)["test_acc"] <= 1.0
        break  # one re-train is enough
    assert all(t.state.name == "FAIL" for t in studies["diverge__none"])

    # the same sweep again without --resume is refused with a hint
    assert main([str(path), "--quiet"]) == 2


def _wait_for(predicate, timeout: float, what: str, proc=None, poll: float = 0.5):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"sweep process exited early ({proc.returncode}) while waiting for {what}: "
                                 f"{proc.stdout.read()[-3000:]}")
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def test_resume_after_interrupt_adds_no_duplicates(ray_tune_local, tmp_path, capfd):
    import pandas as pd

    from calray.sweep.runner import main
    from calray.sweep.outputs import Manifest

    run = tiny_run_dict(tmp_path, optim={"name": "sgd", "lr": 0.05, "epochs": 3})
    run["data"]["params"]["n_train"] = 6000  # trials of a few seconds: the interrupt lands mid-sweep
    path = write_sweep(tmp_path, "resumable", run=run, max_concurrent_trials=1,
                       search={"num_samples": 4, "seed": 1, "space": SPACE})
    sdir = tmp_path / "sweeps" / "resumable"
    manifest = Manifest(sdir / "manifest" / "synthetic__none.jsonl")
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"),
           "PYTHONPATH": os.environ["PYTHONPATH"]}
    proc = subprocess.Popen([sys.executable, "-m", "calray.sweep", str(path), "--address", ray_tune_local],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # interrupt while the second trial runs: one trial finished, one unfinished
        _wait_for(lambda: len(manifest.finished()) >= 1 and len(manifest.trials()) >= 2, 300,
                  "a finished and a running trial", proc, poll=0.1)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    before = manifest.finished()
    assert 1 <= len(before) < 4
    assert json.loads((sdir / "cells.json").read_text())[0]["status"] == "partial"

    capfd.readouterr()
    assert main([str(path), "--resume", "--quiet"]) == 0
    out = capfd.readouterr().out
    # the restored Tuner's callback prints with this run's display: --quiet, no per-trial lines
    assert "resuming Ray experiment" in out and "] trials " not in out, out[-3000:]
    df = pd.read_parquet(sdir / "trials.parquet")
    assert df.trial_id.nunique() == 4
    assert set(before) <= set(df.trial_id)
    assert not df.duplicated(["trial_id", "epoch"]).any()
    assert all(list(g) == [0, 1, 2] for _, g in df.groupby("trial_id").epoch)
    assert set(df.status) == {"TERMINATED"}
    study = _journal_trials(sdir)["synthetic__none"]
    assert len(study) == 4 and all(t.state.name == "COMPLETE" for t in study)
    rec = json.loads((sdir / "cells.json").read_text())[0]
    assert rec["status"] == "done" and rec["n_trials"] == 4
    assert all(math.isfinite(v) for v in df.test_acc)
