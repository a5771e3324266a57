"""Reports from a small synthetic sweep directory built here in the calray.sweep.runner output layout."""

from __future__ import annotations

import html
import json
import math
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from calray.config import config_from_dict, save_config
from calray.errors import CalrayError
from calray.report.ablation import paper_ablation
from calray.report.errors import ReportError
from calray.report.formatting import pct
from calray.report.paper_numbers import load_paper_numbers
from calray.report.render import main, write_report
from calray.report.sections import SECTIONS
from calray.report.studies import compute_importance
from calray.engine.trainer import train
from tests.conftest import tiny_run_dict

# (cell, dataset label, noise, trials); a trial = (trial_id, status, params, seed, epochs)
SWEEP = [
    ("cremad-clean", "cremad", {"kind": "none", "eps": 0.0, "mode": "test"}, [
        ("c0", "TERMINATED", {"method.strategy": "cal", "method.T": 1.0}, 0, 2),
        ("c1", "TERMINATED", {"method.strategy": "null", "method.T": 1.0}, 0, 2),
        ("c2", "TERMINATED", {"method.strategy": "cal", "method.T": 1.0}, 1, 2),
        ("c3", "PRUNED", {"method.strategy": "cal", "method.T": 3.0}, 0, 1),
        ("c4", "ERROR", {"method.strategy": "null", "method.T": 0.2}, 0, 0),
    ]),
    ("nyud2-gauss5", "nyud2", {"kind": "gaussian", "eps": 5.0, "mode": "test"}, [
        ("g0", "TERMINATED", {"method.strategy": "cal", "method.T": 0.5}, 0, 2),
    ]),
]
ERROR_MSG = "TrainingError: non-finite loss (nan) at epoch 0, step 3"


def _set(tree: dict, dotted: str, value) -> None:
    node = tree
    *head, last = dotted.split(".")
    for part in head:
        node = node.setdefault(part, {})
    node[last] = value


def build_sweep(root, tmp) -> None:
    """A finished sweep directory in the calray.sweep.runner contract, from real tiny training runs."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root.mkdir(parents=True)
    (root / "best").mkdir()
    storage = JournalStorage(JournalFileBackend(str(root / "optuna.journal")))
    dists = {"method.strategy": CategoricalDistribution(["cal", "null"]),
             "method.T": FloatDistribution(0.1, 10.0, log=True)}
    rows, cells = [], []
    for cell, label, noise, trials in SWEEP:
        study = optuna.create_study(storage=storage, study_name=cell, direction="maximize")
        per_trial = {}
        for tid, status, params, seed, epochs in trials:
            run_dir = root / "runs" / cell / tid
            tree = tiny_run_dict(tmp, noise=noise)
            for k, v in params.items():
                _set(tree, k, v)
            tree["runtime"]["seed"] = seed
            common = {"sweep": "mini", "cell": cell, "trial_id": tid, "status": status, "seed": seed,
                      **{f"param.{k}": v for k, v in params.items()}}
            if status == "ERROR":
                rows.append({**common, "error": ERROR_MSG, "epoch": math.nan, "run_dir": str(run_dir)})
                study.add_trial(optuna.trial.create_trial(params=params, distributions=dists,
                                                          state=optuna.trial.TrialState.FAIL))
                continue
            tree["optim"]["epochs"] = epochs
            cfg = config_from_dict(tree, tid)
            from calray.engine.trainer import RunContext

            summary = train(cfg, RunContext(run_dir=run_dir))
            per = {"test_acc": summary["test_acc"], "best_val_acc": summary["best_val_acc"],
                   "best_epoch": summary["best_epoch"], "run_dir": str(run_dir.relative_to(root))}
            per_trial[tid] = per
            for line in (run_dir / "metrics.jsonl").read_text().splitlines():
                rows.append({**common, "error": None, **json.loads(line), **per})
            state = optuna.trial.TrialState.COMPLETE if status == "TERMINATED" else optuna.trial.TrialState.PRUNED
            study.add_trial(optuna.trial.create_trial(
                params=params, distributions=dists, state=state,
                value=summary["best_val_acc"] if state == optuna.trial.TrialState.COMPLETE else None,
                intermediate_values={0: summary["best_val_acc"]}))
        done = {t: p for t, p in per_trial.items() if dict((x[0], x[1]) for x in trials)[t] == "TERMINATED"}
        best = max(done, key=lambda t: done[t]["best_val_acc"])
        best_tree = yaml.safe_load((root / "runs" / cell / best / "config.yaml").read_text())
        save_config(config_from_dict(best_tree), root / "best" / f"{cell}.yaml")
        cells.append({"cell": cell, "dataset": label, "noise": noise, "status": "done",
                      "n_trials": len(trials), "n_failed": sum(t[1] == "ERROR" for t in trials),
                      "n_pruned": sum(t[1] == "PRUNED" for t in trials), "best_trial": best,
                      "best_val_acc": done[best]["best_val_acc"], "best_test_acc": done[best]["test_acc"],
                      "best_config": f"best/{cell}.yaml", "best_run_dir": f"runs/{cell}/{best}"})
    df = pd.DataFrame(rows)
    df.to_parquet(root / "trials.parquet", index=False)
    df.to_csv(root / "trials.csv", index=False)
    (root / "cells.json").write_text(json.dumps(cells, indent=2))
    (root / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "mini", "search": {"algorithm": "optuna", "num_samples": 5, "metric": "val_acc", "mode": "max",
                                   "space": {"method.T": {"loguniform": [0.1, 10]},
                                             "method.strategy": {"choice": ["cal", "null"]}}}}))


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    root = tmp / "mini"
    build_sweep(root, tmp)
    from calray.robustness.grid import run_grid

    run_grid(root, {"kinds": ["gaussian", "salt_pepper"], "eps": [0, 5], "modes": ["test"], "noise_seeds": 2,
                    "test_tasks": False})  # in-process: no Ray needed for this fixture
    return root


def _md_row(md: str, first: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first:
            return cells
    raise AssertionError(f"no table row starting with {first!r}")


def test_report_has_every_section_and_matches_trials(sweep_dir):
    html_path, md_path = write_report(sweep_dir)
    md, page = md_path.read_text(), html_path.read_text()
    for sid, title in SECTIONS:
        assert f"## {title}" in md, title
        assert f"id='{sid}'" in page and html.escape(title) in page
    # self-contained: plots embedded, nothing fetched from the network
    assert page.count("data:image/png;base64,") >= 6
    assert not re.search(r"""(src|href)=['"]?https?:""", page) and "<script" not in page
    pngs = sorted(p.name for p in (sweep_dir / "report_files").glob("*.png"))
    assert pngs and all(f"report_files/{p}" in md for p in pngs)

    trials = pd.read_parquet(sweep_dir / "trials.parquet")
    per = trials.groupby(["cell", "trial_id"]).first().reset_index()
    cells = json.loads((sweep_dir / "cells.json").read_text())
    header = _md_row(md, "cell")
    for rec in cells:
        row = dict(zip(header, _md_row(md, rec["cell"])))
        t = per[per["cell"] == rec["cell"]]
        assert int(row["trials"]) == len(t)
        assert int(row["finished"]) == (t["status"] == "TERMINATED").sum()
        assert int(row["failed"]) == (t["status"] == "ERROR").sum()
        assert int(row["pruned"]) == (t["status"] == "PRUNED").sum()
        best = t[t["trial_id"] == rec["best_trial"]].iloc[0]
        assert best["best_val_acc"] == t[t["status"] == "TERMINATED"]["best_val_acc"].max()
        assert row["best trial"] == rec["best_trial"]
        assert row["best val acc %"] == f"{100 * best['best_val_acc']:.2f}"
        assert row["test acc % (best trial)"] == f"{100 * best['test_acc']:.2f}"
    # cremad-clean: c0 and c2 share parameters and differ in seed -> mean ± std over the two
    row = dict(zip(header, _md_row(md, "cremad-clean")))
    t = per[(per["cell"] == "cremad-clean") & per["trial_id"].isin(["c0", "c2"])]
    best_id = json.loads((sweep_dir / "cells.json").read_text())[0]["best_trial"]
    if best_id in ("c0", "c2"):
        v = t["test_acc"].to_numpy()
        assert row["test acc % over seeds"] == f"{100 * v.mean():.2f} ± {100 * v.std(ddof=1):.2f} (n=2)"
    assert ERROR_MSG in md  # the failed trial's error is listed

    # importance: 3 completed trials are too few -> a note, not a number
    assert "too few for a meaningful importance estimate" in md
    # robustness: clean rows of the grid equal each best checkpoint's test accuracy
    rob = pd.read_parquet(sweep_dir / "robustness.parquet")
    assert "ε=5" in md and "robustness_cremad-clean.png" in md
    for rec in cells:
        clean = rob[(rob["cell"] == rec["cell"]) & (rob["eps"] == 0)]["acc"]
        summary = json.loads((sweep_dir / rec["best_run_dir"] / "summary.json").read_text())
        if rec["noise"]["kind"] == "none":
            assert np.allclose(clean, summary["test_acc"], rtol=0, atol=0)
            assert np.allclose(clean, rec["best_test_acc"], rtol=0, atol=0)
    # contribution dynamics from the best run's metrics.jsonl
    assert "dynamics_cremad-clean.png" in md and "W (last epoch)" in md
    # strategies: the cremad cell searched method.strategy over cal/null
    assert "method.strategy: modulation strategy (Fig. 2)" in md
    assert "curves_method.strategy_cremad_clean.png" in md
    # paper numbers beside ours: cell labelled cremad -> Table I; clearly marked as the paper's
    assert "paper Ours (CAL) | 79.30" in md and "Table I (section IV-C)" in md
    assert "calray cremad-clean: best trial" in md
    # the cell labelled nyud2 (gaussian ε=5, test-only) sits beside Table II's NYUD2 block
    assert "paper Ours (CAL) | 70.02 | 61.10 | 48.59 | 62.99 | 58.94" in md
    nyu = next(r for r in cells if r["cell"] == "nyud2-gauss5")
    row = _md_row(md, "calray: best trial of the matching cell (nyud2-gauss5)")
    assert row[1:] == ["—", "—", "—", pct(nyu["best_test_acc"]), "—"]
    rs = pd.read_csv(sweep_dir / "robustness_summary.csv")
    g5 = rs[(rs["cell"] == "nyud2-gauss5") & (rs["kind"] == "gaussian") & (rs["eps"] == 5)].iloc[0]
    row = _md_row(md, "calray nyud2-gauss5: robustness grid (test), mean ± std")
    assert row[4] == f"{100 * g5['acc_mean']:.2f} ± {100 * g5['acc_std']:.2f} (n=2)"
    assert "Table III (section IV-D)" in md and "no train+test-noise result for NYU Depth V2" in md


def test_report_cli_on_a_single_run(sweep_dir, capsys):
    run_dir = sweep_dir / "runs" / "nyud2-gauss5" / "g0"
    assert main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    html_path, md_path = run_dir / "report.html", run_dir / "report.md"
    assert f"wrote {html_path}" in out and f"wrote {md_path}" in out
    md = md_path.read_text()
    for _, title in SECTIONS:
        assert f"## {title}" in md
    assert "A single run directory" in md
    summary = json.loads((run_dir / "summary.json").read_text())
    assert pct(summary["test_acc"]) in _md_row(md, "g0")
    assert html_path.is_file() and (run_dir / "report_files").is_dir()


def test_missing_and_corrupt_directories(tmp_path, sweep_dir, capsys):
    missing = tmp_path / "nope"
    with pytest.raises(ReportError, match=re.escape(str(missing))):
        write_report(missing)
    assert main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="not a sweep directory"):
        write_report(empty)

    bad = tmp_path / "bad"
    shutil.copytree(sweep_dir, bad, ignore=shutil.ignore_patterns("runs", "report*"))
    (bad / "cells.json").write_text('[{"cell": "x", ')
    with pytest.raises(ReportError, match=re.escape(str(bad / "cells.json"))):
        write_report(bad)
    (bad / "cells.json").write_text((sweep_dir / "cells.json").read_text())
    (bad / "trials.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(ReportError, match=re.escape(str(bad / "trials.parquet"))):
        write_report(bad)
    (bad / "trials.parquet").unlink()
    (bad / "trials.csv").unlink()
    with pytest.raises(CalrayError, match="no trials.parquet or trials.csv"):
        write_report(bad)


def test_importance_with_enough_trials():
    import optuna
    from optuna.distributions import FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    rng = np.random.default_rng(0)
    for _ in range(12):
        t, eta = float(rng.uniform(0.1, 10)), float(rng.uniform(0, 3))
        study.add_trial(optuna.trial.create_trial(
            params={"method.T": t, "method.eta": eta}, value=-abs(t - 4) + 0.01 * eta,
            distributions={"method.T": FloatDistribution(0.1, 10), "method.eta": FloatDistribution(0, 3)}))
    imp, note = compute_importance(study)
    assert imp is not None and set(imp) == {"method.T", "method.eta"}
    assert max(imp, key=imp.get) == "method.T" and "PED-ANOVA" in note


def test_paper_numbers_file_is_consistent():
    pn = load_paper_numbers()
    t = pn["tables"]
    ours = next(r for r in t["table_I"]["rows"] if r["method"] == "Ours")["values"]
    assert dict(zip(t["table_I"]["columns"], ours)) == {"cremad": 79.30, "ks": 74.82, "ave": 74.21}  # abstract
    for key in ("table_I", "table_II", "table_III", "table_IV", "table_V", "fig_2"):
        assert t[key]["ref"] and t[key]["unit"] in ("percent", "fraction")
    # Table IV beta on CREMA-D is Table I's CAL result; DxI in Table V is Table I's AVE result
    assert next(r for r in t["table_IV"]["rows"] if r["value"] == "beta")["values"][2] == 79.30
    assert next(r for r in t["table_V"]["rows"] if r["value"] == "d_x_i")["values"][0] * 100 == pytest.approx(74.21)


def test_ablation_tables_put_the_paper_columns_beside_ours():
    paper = load_paper_numbers()["tables"]
    cols, rows = paper_ablation(paper, "method.aib", "nyud2", ("nyud2", "salt_pepper", 5.0, "test"),
                                ["mi", "beta", "off"], ["rgb", "depth"])
    assert cols == ["paper Table IV NYUD2 eps=5.0 %"] and rows == [["52.54"], ["61.10"], ["—"]]
    cols, rows = paper_ablation(paper, "method.contribution", "ave", ("ave", "none", 0.0, "test"),
                                ["d_x_i", "kl"], ["audio", "visual"])
    assert cols[0] == "paper Table V FusionACC %" and rows == [["74.21", "66.10", "34.57"], ["72.40", "63.28", "24.48"]]
    assert paper_ablation(paper, "method.contribution", "ave", ("ave", "gaussian", 5.0, "test"), ["kl"], []) == ([], [])
    cols, rows = paper_ablation(paper, "method.strategy", "ave", ("ave", "none", 0.0, "test"), ["cal", "null"], [])
    assert rows == [["74.00"], ["72.20"]]
