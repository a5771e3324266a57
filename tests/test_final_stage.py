"""The comparison protocol's sweep side (issue 14): the `final:` block and per-variant spaces (validation,
no Ray), the final retrains planned with paired seeds, and on one local Ray a tiny two-variant sweep
whose final stage writes final.csv rows that are each run's summary.json, reused by --final-only,
continued after an interruption without duplicates; --num-samples N --resume extends a finished
sweep (Optuna continues its study) and --retry-failed re-runs a failed trial's parameters."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from calray.errors import ConfigError
from calray.sweep.final import plan_final
from calray.sweep.spec import load_sweep

from tests.conftest import tiny_run_dict

REPO = Path(__file__).resolve().parent.parent
SPACE = {"method.T": {"loguniform": [0.5, 5.0]}, "method.eta": {"uniform": [0.0, 2.0]}}
VARIANTS = [{"name": "cal", "set": {"method.strategy": "cal"}},
            {"name": "concat", "set": {"method.strategy": "none", "method.aib": "off"}, "space": {}}]


def write_sweep(tmp_path: Path, name: str, **blocks) -> Path:
    run = tiny_run_dict(tmp_path, optim={"name": "sgd", "lr": 0.05, "epochs": 2})
    run["data"]["params"].update(n_train=128, n_val=32, n_test=48)
    tree = {"name": name, "run": run, "search": {"num_samples": 2, "seed": 0, "space": SPACE},
            "cells": {"variants": VARIANTS}, "final": {"seeds": 2, "baseline": "concat"},
            "resources": {"workers": 1, "cpus_per_worker": 1}, "max_concurrent_trials": 2,
            "ray": {"storage_path": str(tmp_path / "sweeps")}}
    tree.update(blocks)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


# ---------------------------------------------------------------- no Ray


@pytest.mark.parametrize("patch, needle", [
    ({"final": {"seeds": 2, "baseline": "concot"}}, "final.baseline: 'concot' is not a variant"),
    ({"final": {"seeds": 0}}, "final.seeds"),
    ({"final": {"seeds": [1, 1]}}, "final.seeds"),
    ({"final": {"metrics": ["test_auc"]}}, "final.metrics"),
    ({"final": {"confidence": 1.5}}, "final.confidence"),
    ({"search": {"algorithm": "grid", "space": {"method.n": {"choice": [1, 2]}}}}, "need"),
    ({"cells": {"variants": [{"name": "cal", "space": {"method.TT": {"uniform": [0, 1]}}}]}, "final": None},
     "cells.variants[cal].space.method.TT: unknown key"),
])
def test_bad_final_block_or_variant_space_names_the_key(tmp_path, patch, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_sweep(write_sweep(tmp_path, "bad", **patch))


def test_a_variant_searches_only_its_own_space_with_the_same_budget(tmp_path, capsys):
    from calray.sweep.runner import main

    plan = load_sweep(write_sweep(tmp_path, "spaces"))
    by_variant = {c.variant: c for c in plan.cells}
    assert sorted(by_variant["cal"].space) == ["method.T", "method.eta"] and by_variant["concat"].space == {}
    assert main([str(tmp_path / "spaces.yaml"), "--dry-run"]) == 0
    assert "its own space: (empty" in capsys.readouterr().out


def test_final_retrains_pair_the_same_seeds_across_cells(tmp_path):
    plan = load_sweep(write_sweep(tmp_path, "plan", final={"seeds": [3, 7], "baseline": "concat"}))
    sdir = tmp_path / "sdir"
    (sdir / "best").mkdir(parents=True)
    for cell in plan.cells:  # a best config per cell, as the search writes them
        (sdir / "best" / f"{cell.id}.yaml").write_text(yaml.safe_dump(cell.run))
    runs, skipped = plan_final(plan, plan.cells, sdir)
    assert skipped == []
    assert sorted((r.cell.id, r.seed) for r in runs) == sorted((c.id, s) for c in plan.cells for s in (3, 7))
    for r in runs:
        cfg = r.run.config
        assert cfg["runtime"]["seed"] == cfg["data"]["seed"] == r.seed  # training and data seed = s
        assert r.run.run_dir == (sdir / "final" / "runs" / r.cell.id / f"seed{r.seed}").resolve()
        assert cfg["method"]["strategy"] == r.cell.run["method"]["strategy"]
    (sdir / "best" / f"{plan.cells[0].id}.yaml").unlink()  # a cell whose search finished no trial
    runs, skipped = plan_final(plan, plan.cells, sdir)
    assert skipped == [plan.cells[0].id] and {r.cell.id for r in runs} == {plan.cells[1].id}


def test_a_finished_run_is_reused_only_for_the_identical_config(tmp_path, tiny_cfg):
    from calray.config import config_from_dict, save_config
    from calray.ray.batch import FixedRun, finished_summary

    tree = tiny_cfg(name="reuse").to_dict()
    tree["runtime"]["run_name"] = "reuse"
    cfg = config_from_dict(tree)
    run = FixedRun(cfg.to_dict(), label="reuse")
    run.run_dir.mkdir(parents=True)
    assert finished_summary(run) is None  # no summary yet
    save_config(cfg, run.run_dir / "config.yaml")
    (run.run_dir / "summary.json").write_text(json.dumps({"test": {"acc": 0.5}}))
    assert finished_summary(run) == {"test": {"acc": 0.5}}
    changed = cfg.to_dict()
    changed["optim"]["lr"] = 0.5
    assert finished_summary(FixedRun(changed, label="reuse")) is None  # same dir, another config: run it


# ---------------------------------------------------------------- on a local Ray



def test_final_stage_rows_are_the_runs_summaries_reused_and_resumed(ray_tune_local, tmp_path, capfd):
    import pandas as pd

    from calray.sweep.runner import main

    path = write_sweep(tmp_path, "fin")
    assert main([str(path), "--quiet"]) == 0
    sdir = tmp_path / "sweeps" / "fin"
    df = pd.read_csv(sdir / "final.csv")
    assert list(df.columns) == ["cell", "dataset", "noise", "variant", "seed", "status", "val_acc", "test_acc",
                                "test_macro_f1", "run_dir", "error"]
    assert len(pd.read_parquet(sdir / "final.parquet")) == len(df) == 4
    assert sorted(zip(df.variant, df.seed)) == [("cal", 0), ("cal", 1), ("concat", 0), ("concat", 1)]
    assert set(df.status) == {"ok"} and set(df.noise) == {"none"}
    for row in df.itertuples():
        summary = json.loads((Path(row.run_dir) / "summary.json").read_text())
        assert (row.val_acc, row.test_acc, row.test_macro_f1) == (
            summary["best_val_acc"], summary["test"]["acc"], summary["test"]["macro_f1"])
        cfg = yaml.safe_load((Path(row.run_dir) / "config.yaml").read_text())
        best = yaml.safe_load((sdir / "best" / f"{row.cell}.yaml").read_text())
        assert cfg["runtime"]["seed"] == cfg["data"]["seed"] == row.seed
        assert cfg["method"] == best["method"]  # the cell's best config, only the seeds differ
    comparison = pd.read_csv(sdir / "comparison.csv")  # the sweep ends with the paired comparison
    assert sorted(comparison.metric) == ["test_acc", "test_macro_f1"]
    assert set(comparison.variant) == {"cal"} and set(comparison.baseline) == {"concat"}
    assert set(comparison.n) == {2}
    cal, concat = (df[df.variant == v].sort_values("seed").test_acc.to_numpy() for v in ("cal", "concat"))
    assert comparison[comparison.metric == "test_acc"].delta.item() == pytest.approx((cal - concat).mean())
    meta = json.loads((sdir / "final.json").read_text())
    assert meta["seeds"] == [0, 1] and meta["baseline"] == "concat"
    assert meta["budget"] == {"cal": {"num_samples": 2, "space": ["method.T", "method.eta"]},
                              "concat": {"num_samples": 2, "space": []}}

    # --final-only on the finished sweep: every retrain is reused, nothing trains again
    stamps = {r: (Path(r) / "summary.json").stat().st_mtime_ns for r in df.run_dir}
    capfd.readouterr()
    assert main([str(path), "--final-only", "--quiet"]) == 0
    assert "4 already finished, reused; 0 to run" in capfd.readouterr().out
    assert {r: (Path(r) / "summary.json").stat().st_mtime_ns for r in df.run_dir} == stamps

    # an interrupted final stage (one retrain without its summary) continues: only that one runs
    lost = Path(df.run_dir[0])
    (lost / "summary.json").unlink()
    assert main([str(path), "--resume", "--quiet"]) == 0
    out = capfd.readouterr().out
    assert "3 already finished, reused; 1 to run" in out, out[-2000:]
    again = pd.read_csv(sdir / "final.csv")
    assert len(again) == 4 and not again.duplicated(["cell", "seed"]).any() and set(again.status) == {"ok"}
    assert (lost / "summary.json").is_file()


def test_a_batch_reuses_one_worker_process_and_its_datasets_without_leaking_state(ray_tune_local, tmp_path):
    """Fixed runs share a worker process (ray.reuse_actors): the third run, the first's config in another
    run dir after a run on other (noisy) data, trains exactly as the first did in a fresh process."""
    from calray.config import config_from_dict
    from calray.io import METRICS_FILE, TRAIN_LOG, read_jsonl
    from calray.ray.batch import FixedRun, reuse_actors, run_batch

    def run(name: str, **sections) -> FixedRun:
        tree = tiny_run_dict(tmp_path, optim={"name": "sgd", "lr": 0.05, "epochs": 2}, **sections)
        tree["runtime"].update(run_name=name, resume=True)
        return FixedRun(config_from_dict(tree, name).to_dict(), label=name)

    runs = [run("first"), run("noisy", noise={"kind": "gaussian", "eps": 5.0, "mode": "train+test"}), run("again")]
    assert reuse_actors(runs) and not reuse_actors([run("ddp", distributed={"workers": 2}), *runs])
    assert run_batch(runs, tmp_path / "tune", "reuse", {"cpu": 1}, max_concurrent=1, quiet=True) == {}
    logs = [re.fullmatch(r"datasets: (reused|built) .*\(worker pid (\d+)\)", (r.run_dir / TRAIN_LOG).read_text()
                         .splitlines()[0]).groups() for r in runs]
    assert [event for event, _ in logs] == ["built", "built", "reused"]
    assert len({pid for _, pid in logs}) == 1  # one worker process
    first, again = (read_jsonl(r.run_dir / METRICS_FILE) for r in (runs[0], runs[2]))
    keys = ("train_loss", "val_acc", "W_audio", "a_audio")
    assert [[row[k] for k in keys] for row in again] == [[row[k] for k in keys] for row in first]
    assert (json.loads((runs[2].run_dir / "summary.json").read_text())["test"]
            == json.loads((runs[0].run_dir / "summary.json").read_text())["test"])


def test_num_samples_extends_a_finished_sweep_and_retry_failed_reruns_a_failed_trial(ray_tune_local, tmp_path):
    import pandas as pd

    from calray.sweep.outputs import Manifest
    from calray.sweep.runner import main

    path = write_sweep(tmp_path, "ext", cells={}, final=None,
                       search={"num_samples": 2, "seed": 0, "algorithm": "random",
                               "space": {"optim.lr": {"choice": [0.05, 1.0e30]}}})
    assert main([str(path), "--quiet"]) == 0
    sdir = tmp_path / "sweeps" / "ext"
    assert main([str(path), "--num-samples", "4", "--resume", "--quiet"]) == 0
    manifest = Manifest(sdir / "manifest" / "synthetic__none.jsonl")
    trials = manifest.finished()
    assert len(trials) == 4
    df = pd.read_parquet(sdir / "trials.parquet")
    assert df.trial_id.nunique() == 4
    failed = {tid: t["params"] for tid, t in trials.items() if t["status"] == "ERROR"}
    assert failed, "lr 1e30 diverges: some trial must have failed"  # the seeded sampler draws both values

    assert main([str(path), "--resume", "--retry-failed", "--quiet"]) == 0
    after = Manifest(sdir / "manifest" / "synthetic__none.jsonl").trials()
    assert all(after[tid]["status"] == "RETRIED" for tid in failed)
    new = [t for tid, t in after.items() if tid not in trials]
    assert sorted(json.dumps(t["params"], sort_keys=True) for t in new) == sorted(
        json.dumps(p, sort_keys=True) for p in failed.values())
    assert len([t for t in after.values() if t["status"] in ("TERMINATED", "PRUNED", "ERROR")]) == 4


def test_table1_sweeps_run_every_paper_row_with_the_same_variants():
    """sweeps/table1_{cremad,ks,ave,synthetic}.yaml: one variant per Table I row (paper_numbers.yaml's
    `variant`), the same variants and settings on every dataset, each searching its own keys + the lr."""
    from calray.report.paper_numbers import load_paper_numbers

    rows = load_paper_numbers()["tables"]["table_I"]["rows"]
    plans = {d: load_sweep(REPO / "sweeps" / f"table1_{d}.yaml") for d in ("cremad", "ks", "ave", "synthetic")}
    for d, plan in plans.items():
        variants = plan.spec.cells.variants
        assert [v.name for v in variants] == [r["variant"] for r in rows], d
        assert all("optim.lr" in v.space for v in variants), d
        assert plan.spec.final.baseline == "concat" and len(plan.spec.final.seed_list) >= 5, d
        assert [v.set for v in variants] == [v.set for v in plans["cremad"].spec.cells.variants], d


def test_int_ranges_validate_and_sample_integers():
    """`{int: [lo, hi]}` (the field is named like the builtin it is typed with)."""
    import random

    from calray.sweep.space import Distribution

    d = Distribution.model_validate({"int": [1, 50]})
    assert d.grid_values() == list(range(1, 51))
    assert all(isinstance(d.sample(random.Random(s)), int) for s in range(5))
    with pytest.raises(Exception, match="lower bound"):
        Distribution.model_validate({"int": [5, 1]})

