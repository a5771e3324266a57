"""The robustness grid's test mode as Ray tasks (the same rows as the serial path, a failed task is its
rows' failed status), the `attacked` axis, the `missing` kind (zero / training-mean input, checked
against a hand-made forward pass) and the final-seed targets of a sweep with final.csv (a fabricated
final stage of tiny runs). One Ray instance for the module."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from calray.config import config_from_dict, load_config
from calray.data.base import build_datasets
from calray.engine.trainer import train
from calray.errors import ConfigError
from calray.models import build_model
from calray.robustness import tasks
from calray.robustness.grid import main, parse_grid, plan_retrains, resolve_targets, run_grid
from calray.robustness.tables import summarize
from tests.conftest import tiny_run_dict

FINAL_COLUMNS = ["cell", "dataset", "noise", "variant", "seed", "status", "val_acc", "test_acc", "test_macro_f1",
                 "run_dir", "error"]


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _train(out_dir, run_name: str, seed: int):
    cfg = config_from_dict(tiny_run_dict(out_dir, data={"seed": seed}, runtime={
        "output_dir": str(out_dir), "run_name": run_name, "progress": False, "seed": seed}), "tiny")
    train(cfg)
    return cfg.run_dir()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("axes") / "runs", "tiny", 0)


@pytest.fixture(scope="module")
def final_sweep(tmp_path_factory):
    """A sweep dir with a final stage as the contract has it: final.csv (+ cells.json), final/runs/<cell>/seed<s>/."""
    sdir = tmp_path_factory.mktemp("final_sweep")
    rows = []
    for s in (0, 1):
        rd = _train(sdir / "final" / "runs" / "c1", f"seed{s}", s)
        summ = json.loads((rd / "summary.json").read_text())
        rows.append(["c1", "synthetic", "none", "default", s, "ok", summ["best_val_acc"], summ["test"]["acc"],
                     summ["test"]["macro_f1"], str(rd.resolve()), None])
    failed = sdir / "final" / "runs" / "c1" / "seed2"  # a failed final trial: a run dir without a checkpoint
    failed.mkdir()
    (failed / "config.yaml").write_text((rd / "config.yaml").read_text())
    rows.append(["c1", "synthetic", "none", "default", 2, "failed", None, None, None, str(failed), "boom"])
    pd.DataFrame(rows, columns=FINAL_COLUMNS).to_csv(sdir / "final.csv", index=False)
    (sdir / "cells.json").write_text(json.dumps([{"cell": "c1", "status": "ok",
                                                  "best_run_dir": str(sdir / "final" / "runs" / "c1" / "seed0")}]))
    return sdir


def test_tasks_give_the_serial_rows_and_a_progress_line_each(run_dir, ray_session, capsys):
    grid = {"kinds": ["gaussian", "missing"], "eps": [0, 5], "attacked": ["all", "visual"], "noise_seeds": 2}
    serial = run_grid(run_dir, {**grid, "test_tasks": False})
    capsys.readouterr()
    par = run_grid(run_dir, grid)
    out = capsys.readouterr().out
    pd.testing.assert_frame_equal(serial, par)
    lines = [ln for ln in out.splitlines() if ln.startswith("[robustness test] tasks ")]
    assert len(lines) == 2 and lines[-1].startswith("[robustness test] tasks 2/2 finished, 0 running, 0 failed | ")
    assert "Ray tasks" in out
    # attacked: a row per choice; 'all' of missing = each modality in turn
    g = par[par["kind"] == "gaussian"]
    assert sorted(g["attacked"].unique()) == ["all", "visual"] and len(g) == 2 * 2 * 2
    m = par[par["kind"] == "missing"]
    assert sorted(m["attacked"].unique()) == ["audio", "visual"] and sorted(m["eps"].unique()) == [0.0, 1.0]
    assert m["noise_seed"].isna().all() and (m["status"] == "ok").all()
    # attacking visual only leaves audio untouched: on the synthetic data its noise differs from 'all'
    noisy = g[g["eps"] == 5].set_index(["attacked", "seed"])["acc"]
    assert not np.allclose(noisy.loc["all"].to_numpy(), noisy.loc["visual"].to_numpy())
    summary = pd.read_csv(run_dir / "robustness_summary.csv")
    assert "attacked" in summary.columns and len(summary) == 2 * 2 + 2 * 2 and (summary["n"] == 2).all()


def test_a_failing_task_is_its_rows_failed_status(run_dir, ray_session, monkeypatch, tmp_path):
    real = tasks.kind_task

    def dies_on_salt_pepper(target, kind, spec):  # pickled by value into the task
        if kind == "salt_pepper":
            os._exit(3)  # the worker dies: ray.get raises
        return real(target, kind, spec)

    monkeypatch.setattr(tasks, "kind_task", dies_on_salt_pepper)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("config.yaml", "summary.json"):
        (bad / f).write_text((run_dir / f).read_text())
    (bad / "checkpoints").mkdir()
    (bad / "checkpoints" / "best.pt").write_bytes(b"not a checkpoint")
    spec = parse_grid({"kinds": ["gaussian", "salt_pepper"], "eps": [0, 5], "noise_seeds": 1, "max_concurrent_trials": 1})
    good_t = resolve_targets(run_dir)[2][0]
    bad_t = resolve_targets(bad)[2][0]
    rows = pd.DataFrame(tasks.run_tasks([good_t, bad_t], spec, quiet=True))
    assert len(rows) == 2 * 2 * 2
    ok = rows[(rows["source"] == str(good_t.checkpoint)) & (rows["kind"] == "gaussian")]
    assert (ok["status"] == "ok").all()
    died = rows[rows["kind"] == "salt_pepper"]
    assert (died["status"] == "failed").all() and died["error"].notna().all()
    broken = rows[(rows["source"] == str(bad_t.checkpoint)) & (rows["kind"] == "gaussian")]
    assert (broken["status"] == "failed").all() and broken["error"].str.contains("best.pt").all()


def test_attacked_names_and_missing_are_checked(run_dir):
    with pytest.raises(ConfigError, match=r"attacked: \['depth'\] is not a modality of tiny .*\['audio', 'visual'\]"):
        run_grid(run_dir, {"kinds": ["gaussian"], "attacked": ["depth"], "test_tasks": False})
    with pytest.raises(ConfigError, match=r"'missing'.*mode 'test' only"):
        parse_grid({"kinds": ["missing"], "modes": ["train+test"]})
    with pytest.raises(ConfigError, match=r"missing_fill"):
        parse_grid({"missing_fill": "median"})
    with pytest.raises(ConfigError, match=r"noise\.kind"):  # not a run-config noise kind
        config_from_dict(tiny_run_dict(run_dir.parent, noise={"kind": "missing"}), "tiny")
    # a mixed grid: `missing` gets no retrain
    plans = plan_retrains(resolve_targets(run_dir)[2][0], parse_grid(
        {"kinds": ["missing", "gaussian"], "modes": ["test", "train+test"], "eps": [0, 5], "attacked": ["all", "audio"]}),
        run_dir)
    assert sorted(p.config["runtime"]["run_name"] for p in plans) == [
        "gaussian_eps5_audio_seed0", "gaussian_eps5_seed0", "none_eps0_seed0"]
    assert next(p for p in plans if p.attacked == "audio").config["noise"]["modalities"] == ["audio"]


def _hand_accuracy(run_dir, fill_audio) -> float:
    """Test accuracy with the audio input replaced, by a forward pass written out here."""
    cfg = load_config(run_dir / "config.yaml")
    splits = build_datasets(cfg)
    torch.manual_seed(cfg.runtime.seed)
    model = build_model(cfg, splits)
    model.load_state_dict(torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["model"])
    model.eval()
    test = splits.test
    x = {m: t.clone() for m, t in test.features.items()}
    x["audio"] = fill_audio(splits).expand_as(x["audio"]).clone()
    with torch.no_grad():
        pred = model(x).fused_logits.argmax(1)
    return float((pred == torch.as_tensor(test.labels)).float().mean())


def test_missing_fills_against_a_hand_forward_pass(run_dir):
    grid = {"kinds": ["missing"], "eps": [0], "attacked": ["audio"], "noise_seeds": 1, "test_tasks": False}
    zero = run_grid(run_dir, grid)
    assert zero["eps"].tolist() == [0.0, 1.0]
    plain = json.loads((run_dir / "summary.json").read_text())["test_acc"]
    assert zero.iloc[0]["acc"] == plain
    want_zero = _hand_accuracy(run_dir, lambda s: torch.zeros(s.test.features["audio"].shape[1]))
    assert zero.iloc[1]["acc"] == pytest.approx(want_zero)
    mean = run_grid(run_dir, {**grid, "missing_fill": "mean"})
    want_mean = _hand_accuracy(run_dir, lambda s: torch.as_tensor(
        np.asarray(s.train.features["audio"], dtype=np.float64).mean(0), dtype=torch.float32))
    assert mean.iloc[1]["acc"] == pytest.approx(want_mean)
    assert want_zero != want_mean  # the two rules differ here, so each check can fail


def test_final_seed_targets(final_sweep, ray_session, capsys):
    out_dir, kind, targets = resolve_targets(final_sweep)
    assert kind == "final" and [(t.cell, t.final_seed) for t in targets] == [("c1", 0), ("c1", 1)]
    assert all(t.checkpoint == t.run_dir / "checkpoints" / "best.pt" for t in targets)
    df = run_grid(final_sweep, {"kinds": ["gaussian"], "eps": [0, 5], "noise_seeds": 2})
    assert sorted(df["final_seed"].unique()) == [0, 1] and len(df) == 2 * 2 * 2
    assert (df["train_seed"] == df["final_seed"]).all()
    final = pd.read_csv(final_sweep / "final.csv")
    for s in (0, 1):
        clean = df[(df["final_seed"] == s) & (df["eps"] == 0)]["acc"]
        assert (clean == final.loc[final["seed"] == s, "test_acc"].iloc[0]).all()
    summary = summarize(df)
    assert (summary["n"] == 2 * 2).all() and set(summary["cell"]) == {"c1"}  # n = final seeds × noise seeds
    # train+test: one retrain per final seed and setting, its own seed, noise seeds cycling over the seeds
    spec = parse_grid({"kinds": ["gaussian"], "eps": [0, 5], "modes": ["train+test"], "noise_seeds": [7, 8],
                       "train_seeds": 3})
    plans = [p for t in targets for p in plan_retrains(t, spec, out_dir)]
    got = sorted((p.config["runtime"]["run_name"], p.train_seed, p.noise_seed, p.config["data"]["seed"]) for p in plans)
    assert got == [("final_gaussian_eps5_seed0", 0, 7, 0), ("final_gaussian_eps5_seed1", 1, 8, 1),
                   ("final_none_eps0_seed0", 0, 7, 0), ("final_none_eps0_seed1", 1, 8, 1)]
    tt = run_grid(final_sweep, {"kinds": ["gaussian"], "eps": [5], "modes": ["train+test"], "noise_seeds": 1,
                                "epochs": 1, "max_concurrent_trials": 2})
    tt = tt[tt["mode"] == "train+test"]
    assert sorted(zip(tt["final_seed"], tt["seed"], tt["status"])) == [(0, 0, "ok"), (1, 1, "ok")]
    # without final.csv: each cell's best run, as before
    (final_sweep / "final.csv").rename(final_sweep / "final.csv.off")
    try:
        _, kind, targets = resolve_targets(final_sweep)
        assert kind == "sweep" and [(t.cell, t.final_seed) for t in targets] == [("c1", None)]
    finally:
        (final_sweep / "final.csv.off").rename(final_sweep / "final.csv")


def test_old_tables_read_as_attacked_all():
    old = pd.DataFrame({"dataset": ["d"] * 2, "strategy": ["cal"] * 2, "cell": ["c"] * 2, "kind": ["gaussian"] * 2,
                        "eps": [5.0, 5.0], "mode": ["test"] * 2, "seed": [0, 1], "acc": [0.5, 0.7],
                        "macro_f1": [0.4, 0.6], "status": ["ok", "ok"]})
    s = summarize(old)
    assert s["attacked"].tolist() == ["all"] and s["acc_mean"].iloc[0] == pytest.approx(0.6)


def test_cli_flags(run_dir, capsys):
    assert main([str(run_dir), "--kinds", "missing", "--attacked", "visual", "--eps", "0", "--noise-seeds", "1",
                 "--missing-fill", "mean", "--serial"]) == 0
    df = pd.read_csv(run_dir / "robustness.csv")
    assert df["attacked"].tolist() == ["visual", "visual"] and df["kind"].tolist() == ["missing", "missing"]
    grid = json.loads((run_dir / "robustness_grid.json").read_text())["grid"]
    assert grid["missing_fill"] == "mean" and grid["test_tasks"] is False
