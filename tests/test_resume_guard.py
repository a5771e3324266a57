"""A run dir is resumed only by a run of the same config (calray.engine.resume): a changed strategy, AIB mode
or learning rate is one clear error that changes nothing on disk; extending keys resume."""

from __future__ import annotations

import json

import pytest
import yaml

from calray.engine.resume import RESUME_COMPATIBLE_KEYS, RunMismatchError, config_differences
from calray.train import main as train_main
from calray.engine.trainer import Trainer, train
from calray.ray.trial import execute_trial
from tests.conftest import tiny_run_dict


def snapshot(run_dir):
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_run(tiny_cfg):
    cfg = tiny_cfg(optim={"epochs": 1})
    summary = train(cfg)
    return cfg, summary


@pytest.mark.parametrize("section,change,key", [
    ("method", {"strategy": "none"}, "method.strategy"),
    ("method", {"aib": "off"}, "method.aib"),  # was a raw load_state_dict traceback
    ("optim", {"lr": 0.01}, "optim.lr"),
])
def test_changed_config_is_refused_and_nothing_is_overwritten(tiny_cfg, finished_run, section, change, key):
    cfg, _ = finished_run
    before = snapshot(cfg.run_dir())
    changed = tiny_cfg(**{section: {**getattr(cfg, section).model_dump(by_alias=True), **change}})
    with pytest.raises(RunMismatchError) as err:
        Trainer(changed).fit()
    msg = str(err.value)
    assert str(cfg.run_dir()) in msg and key in msg and "--fresh" in msg and "name=" in msg
    assert snapshot(cfg.run_dir()) == before


def test_extending_keys_resume(tiny_cfg, finished_run):
    cfg, _ = finished_run
    more = tiny_cfg(optim={"epochs": 2}, runtime={"output_dir": cfg.runtime.output_dir, "progress": True,
                                                 "checkpoint_every": 2, "seed": 0})
    trainer = Trainer(more)
    trainer.fit()
    assert trainer.start_epoch == 1


def test_resume_false_starts_fresh_in_place(tiny_cfg, finished_run):
    cfg, _ = finished_run
    fresh = tiny_cfg(optim={"epochs": 1}, method={**cfg.method.model_dump(by_alias=True), "strategy": "none"},
                     runtime={"output_dir": cfg.runtime.output_dir, "progress": False, "resume": False})
    trainer = Trainer(fresh)
    trainer.fit()
    assert trainer.start_epoch == 0
    stored = yaml.safe_load((cfg.run_dir() / "config.yaml").read_text())
    assert stored["method"]["strategy"] == "none"


def test_cli_refuses_with_exit_2_and_fresh_replaces(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_run_dict(tmp_path)))
    assert train_main([str(path), "--set", "optim.epochs=1"]) == 0
    summary_before = (tmp_path / "runs" / "tiny" / "summary.json").read_text()
    capsys.readouterr()
    assert train_main([str(path), "--set", "optim.epochs=1", "--set", "method.strategy=none"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "method.strategy" in err[0] and "'cal' → 'none'" in err[0]
    assert (tmp_path / "runs" / "tiny" / "summary.json").read_text() == summary_before
    assert yaml.safe_load((tmp_path / "runs" / "tiny" / "config.yaml").read_text())["method"]["strategy"] == "cal"
    assert train_main([str(path), "--set", "optim.epochs=1", "--set", "method.strategy=none", "--fresh"]) == 0
    assert yaml.safe_load((tmp_path / "runs" / "tiny" / "config.yaml").read_text())["method"]["strategy"] == "none"


def test_sweep_trial_reusing_a_run_dir_is_checked(tmp_path, finished_run):
    cfg, _ = finished_run
    run = cfg.to_dict()
    with pytest.raises(RunMismatchError):
        execute_trial({"run": run, "method.T": 7.0, "run_dir": str(cfg.run_dir())}, report=lambda r: None)
    reports = []
    execute_trial({"run": run, "run_dir": str(cfg.run_dir())}, report=reports.append)  # same config: resumes
    assert reports[-1]["final"] == 1


def test_differences_ignore_compatible_keys_and_path_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    stored = {"data": {"root": str(tmp_path / "data"), "num_workers": 0}, "optim": {"epochs": 3, "lr": 0.1},
              "runtime": {"progress": True, "output_dir": "/abs/runs"}}
    current = {"data": {"root": "data", "num_workers": 4}, "optim": {"epochs": 9, "lr": 0.1},
               "runtime": {"progress": False, "output_dir": "runs"}}
    assert config_differences(stored, current) == []
    current["optim"]["lr"] = 0.2
    current["method"] = {"aib_new_key": 1}
    assert config_differences(stored, current) == [("method.aib_new_key", "<absent>", 1), ("optim.lr", 0.1, 0.2)]
    assert "optim.epochs" in RESUME_COMPATIBLE_KEYS and "method.strategy" not in RESUME_COMPATIBLE_KEYS


def test_summary_of_refused_run_is_untouched(tiny_cfg, finished_run):
    cfg, summary = finished_run
    changed = tiny_cfg(optim={"epochs": 1, "name": "adam"})
    with pytest.raises(RunMismatchError):
        train(changed)
    assert json.loads((cfg.run_dir() / "summary.json").read_text())["test_acc"] == summary["test_acc"]
