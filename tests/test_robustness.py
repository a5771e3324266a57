"""The robustness grid on a tiny checkpoint: one row per (kind, ε, mode, seed), clean rows equal the
checkpoint's plain test accuracy, clear errors; one small train+test run through Ray Tune."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from calray.config import config_from_dict
from calray.errors import CalrayError, ConfigError
from calray.robustness.grid import main, parse_grid, plan_retrains, run_grid
from calray.engine.trainer import train
from tests.conftest import tiny_run_dict


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rob")
    cfg = config_from_dict(tiny_run_dict(tmp), "tiny")
    train(cfg)
    return cfg.run_dir()


def _plain_test_acc(run_dir) -> float:
    return json.loads((run_dir / "summary.json").read_text())["test_acc"]


def test_test_grid_one_row_per_setting_and_clean_equals_plain_accuracy(run_dir):
    grid = {"kinds": ["gaussian", "salt_pepper"], "eps": [0, 2.5, 10], "modes": ["test"], "noise_seeds": 2,
            "test_tasks": False}  # the serial path (the Ray tasks: tests/test_robustness_axes.py)
    df = run_grid(run_dir, grid)
    assert len(df) == 2 * 3 * 2
    assert not df.duplicated(subset=["kind", "eps", "mode", "seed"]).any()
    assert set(df["seed"]) == {0, 1} and set(df["mode"]) == {"test"} and (df["status"] == "ok").all()
    assert {"dataset", "strategy", "cell", "kind", "attacked", "eps", "mode", "seed", "final_seed", "acc",
            "macro_f1"} <= set(df.columns)
    assert (df["attacked"] == "all").all() and df["final_seed"].isna().all()
    assert (df["dataset"] == "synthetic").all() and (df["strategy"] == "cal").all()
    clean = df[df["eps"] == 0]
    assert len(clean) == 4 and (clean["acc"] == _plain_test_acc(run_dir)).all()
    noisy = df[(df["eps"] == 10) & (df["kind"] == "salt_pepper")]
    assert noisy["noise_seed"].tolist() == [0, 1]
    # files: raw rows (CSV + parquet) and the aggregate
    assert pd.read_parquet(run_dir / "robustness.parquet").shape[0] == len(df)
    assert pd.read_csv(run_dir / "robustness.csv").shape[0] == len(df)
    summary = pd.read_csv(run_dir / "robustness_summary.csv")
    assert len(summary) == 2 * 3 and (summary["n"] == 2).all()
    g = summary[(summary["kind"] == "gaussian") & (summary["eps"] == 2.5)].iloc[0]
    vals = df[(df["kind"] == "gaussian") & (df["eps"] == 2.5)]["acc"]
    assert g["acc_mean"] == pytest.approx(vals.mean()) and g["acc_std"] == pytest.approx(vals.std(ddof=1))


def test_checkpoint_path_and_cli(run_dir, capsys):
    rc = main([str(run_dir / "checkpoints" / "best.pt"), "--kinds", "gaussian", "--eps", "0", "5",
               "--noise-seeds", "4", "7", "--serial"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "[robustness]" in out and "gaussian" in out
    df = pd.read_parquet(run_dir / "robustness.parquet")
    assert sorted(df["seed"].unique()) == [4, 7] and len(df) == 4
    assert (df[df["eps"] == 0]["acc"] == _plain_test_acc(run_dir)).all()


def test_grid_errors_name_the_key(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"eps\.1"):
        parse_grid({"eps": [0, -1]})
    with pytest.raises(ConfigError, match=r"kind: unknown key"):
        parse_grid({"kind": ["gaussian"]})
    with pytest.raises(ConfigError, match=r"modes\.0"):
        parse_grid({"modes": ["train"]})
    with pytest.raises(ConfigError, match=r"noise_seeds"):
        parse_grid({"noise_seeds": 0})
    with pytest.raises(ConfigError, match=r"robustness\.eps"):
        parse_grid({"eps": []}, source="sweeps/x.yaml", prefix="robustness")
    missing = tmp_path / "nope"
    with pytest.raises(CalrayError, match=re.escape(str(missing))):
        run_grid(missing, {})
    assert main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err
    (tmp_path / "cells.json").write_text("{not json")
    with pytest.raises(CalrayError, match=re.escape(str(tmp_path / "cells.json"))):
        run_grid(tmp_path, {})


def test_retrain_dir_left_by_a_different_config_is_refused_before_ray(run_dir, monkeypatch):
    """A retrain dir whose config.yaml differs (here: the lr) is not resumed: one error naming it."""
    from calray.engine.resume import RunMismatchError
    from calray.robustness import retrain
    from calray.robustness.targets import run_target

    grid = {"kinds": ["gaussian"], "eps": [5], "modes": ["train+test"], "train_seeds": [9], "noise_seeds": 1,
            "epochs": 1}
    (plan,) = plan_retrains(run_target(run_dir), parse_grid(grid), run_dir)
    stale = yaml.safe_load(yaml.safe_dump(plan.config))
    stale["optim"]["lr"] = 0.5
    plan.run_dir.mkdir(parents=True)
    (plan.run_dir / "config.yaml").write_text(yaml.safe_dump(stale))
    monkeypatch.setattr(retrain, "_run_tune", lambda *a, **k: pytest.fail("Ray must not start"))
    with pytest.raises(RunMismatchError, match=r"optim\.lr"):
        run_grid(run_dir, grid)
    assert yaml.safe_load((plan.run_dir / "config.yaml").read_text())["optim"]["lr"] == 0.5


def test_retrain_config_has_absolute_paths_incl_the_datasets_path_params(tmp_path, monkeypatch):
    """A train+test retrain runs as a Ray trial: mvsa_single's relative data.params.tokenizer reaches
    its config absolute, like data.root and the encoders' weights (no Ray needed)."""
    from calray.config import load_config
    from calray.robustness.targets import Target

    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "mvsa.yaml")
    target = Target(cell="mvsa", config=cfg, retrain_config=cfg, checkpoint=None, run_dir=None)
    grid = parse_grid({"kinds": ["gaussian"], "eps": [5], "modes": ["train+test"], "noise_seeds": 1})
    (plan,) = plan_retrains(target, grid, Path("out"))
    data = plan.config["data"]
    assert data["params"]["tokenizer"] == str(tmp_path / "weights" / "bert-base-uncased")
    assert data["params"]["val_file"] == "dev.jsonl" and data["root"] == str(tmp_path / "data" / "MVSA_Single")
    assert plan.config["model"]["encoders"]["image"]["weights"] == str(tmp_path / "weights" / "resnet152-394f9c45.pth")
    assert plan.run_dir == tmp_path / "out" / "robustness" / "runs" / "mvsa" / "gaussian_eps5_seed0"
    assert (plan.config["noise"]["kind"], plan.config["noise"]["mode"]) == ("gaussian", "train+test")


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # another module's session: use it
        yield ray
        return
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_train_test_retrains_as_ray_tune_trials(run_dir, ray_session):
    grid = {"kinds": ["gaussian"], "eps": [5], "modes": ["train+test"], "train_seeds": [3], "noise_seeds": 1,
            "epochs": 1}
    run_grid(run_dir, {"kinds": ["gaussian"], "eps": [0], "modes": ["test"], "noise_seeds": 1})
    df = run_grid(run_dir, grid)
    assert len(df) == 2 and set(df["mode"]) == {"test", "train+test"}  # the test-mode rows are kept
    row = df[df["mode"] == "train+test"].iloc[0]
    assert (row["mode"], row["kind"], row["eps"], row["seed"]) == ("train+test", "gaussian", 5.0, 3)
    assert row["status"] == "ok"
    retrain = run_dir / "robustness" / "runs" / "tiny" / "gaussian_eps5_seed3"
    cfg = yaml.safe_load((retrain / "config.yaml").read_text())
    assert cfg["noise"]["kind"] == "gaussian" and cfg["noise"]["eps"] == 5.0 and cfg["noise"]["mode"] == "train+test"
    assert cfg["runtime"]["seed"] == 3 and cfg["optim"]["epochs"] == 1
    assert row["acc"] == json.loads((retrain / "summary.json").read_text())["test_acc"]
    assert (retrain / "trial.json").is_file()  # it ran through calray.ray.trial.run_trial
    saved = pd.read_parquet(run_dir / "robustness.parquet")
    assert len(saved) == 2
    # a second call reuses the finished retrain instead of training again
    again = run_grid(run_dir, grid)
    assert again.loc[again["mode"] == "train+test", "acc"].tolist() == [row["acc"]]


def test_train_test_retrains_print_one_line_each_and_no_tune_tables(tmp_path, ray_session, capfd, monkeypatch):
    """Tune's "== Status ==" tables are off; one progress line per retrain as it ends; --quiet: none."""
    cfg = config_from_dict(tiny_run_dict(tmp_path, optim={"epochs": 1}), "tiny")
    train(cfg)
    target = cfg.run_dir()
    capfd.readouterr()
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "0")  # Tune's classic reporter, as calray.sweep.runner's driver sets it
    run_grid(target, {"kinds": ["gaussian"], "eps": [0, 5], "modes": ["train+test"], "train_seeds": [7],
                      "noise_seeds": 1, "epochs": 1})
    out = capfd.readouterr()
    text = out.out + out.err
    assert "== Status ==" not in text and "Trial status" not in text
    progress = [ln for ln in out.out.splitlines() if ln.startswith("[robustness train+test] retrains ")]
    assert len(progress) == 2, progress
    for label in ("tiny none eps=0 train seed 7", "tiny gaussian eps=5 train seed 7"):
        assert sum(re.search(rf"\| trial \S+ \({re.escape(label)}\) TERMINATED test_acc=0\.\d{{4}} "
                             rf"test_macro_f1=\d\.\d{{4}}$", ln) is not None for ln in progress) == 1, progress
    assert progress[-1].startswith("[robustness train+test] retrains 2/2 finished, 0 running, 0 failed | ")

    # --quiet through the CLI, with Tune's default (new) output engine: no line per retrain either
    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT")
    assert main([str(target), "--modes", "train+test", "--kinds", "gaussian", "--eps", "5", "--train-seeds", "1",
                 "--noise-seeds", "1", "--epochs", "1", "--quiet"]) == 0
    out = capfd.readouterr()
    text = out.out + out.err
    assert "== Status ==" not in text and "Trial status" not in text
    assert "[robustness train+test]" not in text and "train seed 0: acc" not in text
    assert "1 to run as Ray Tune trials" in out.out and "robustness.csv" in out.out
    rows = pd.read_csv(target / "robustness.csv")
    assert rows["seed"].tolist() == [0]  # one retrain (--train-seeds 1: seed 0), rows of (tiny, train+test) redone
