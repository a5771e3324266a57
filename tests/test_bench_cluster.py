"""scripts/bench_cluster.py without a cluster: its sweep file validates (cells × trials as asked)
and its figures (utilisation, peak concurrency, marginal overhead) against hand computations.
(The cluster run itself is a benchmark, not a test: docs/BENCHMARKS.md.)"""

import importlib
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from calray.sweep.spec import load_sweep

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield importlib.import_module("bench_cluster")
    finally:
        sys.path.remove(str(SCRIPTS))


def test_sweep_file_has_the_cells_and_trials(bench, tmp_path):
    args = Namespace(n_train=100, epochs=1, cells=4, cpus_per_trial=1.0, max_concurrent_trials=None)
    plan = load_sweep(bench.sweep_file(tmp_path, "b", args, trials=6))
    assert len(plan.cells) == 4 and len({c.id for c in plan.cells}) == 4 and plan.num_samples() == 6
    assert plan.spec.resources.cpus_per_worker == 1.0 and plan.spec.max_concurrent_trials is None


def test_figures_against_hand_computation(bench):
    # two slots, three trials: [0,4] and [0,2] together, then [2,4]: both slots busy the whole 4 s
    full = bench.figures([(0.0, 4.0), (0.0, 2.0), (2.0, 4.0)], slots=2, command_wall_s=8.0)
    assert full["utilisation"] == pytest.approx(1.0) and full["peak_concurrency"] == 2
    assert full["utilisation_of_command_wall"] == pytest.approx(0.5) and full["idle_slot_s"] == pytest.approx(0)
    # serial: one trial at a time on 2 slots, 1 s gaps: busy 3, wall 5
    serial = bench.figures([(0.0, 1.0), (2.0, 3.0), (4.0, 5.0)], slots=2, command_wall_s=5.0)
    assert serial["utilisation"] == pytest.approx(3 / 10) and serial["peak_concurrency"] == 1
    assert serial["idle_slot_s"] == pytest.approx(7.0)
    six = bench.figures([(2.0 * i, 2.0 * i + 1) for i in range(6)], slots=2, command_wall_s=11.0)
    assert bench.marginal_overhead(serial, six) == pytest.approx((16.0 - 7.0) / 3)


def test_overhead_breakdown_from_manifest_times_and_training_spans(bench, tmp_path):
    import json

    sdir = tmp_path / "sweep"
    (sdir / "manifest").mkdir(parents=True)
    events = [{"ev": "start", "trial_id": "t1", "t": 10.0}, {"ev": "result", "trial_id": "t1", "t": 12.0},
              {"ev": "end", "trial_id": "t1", "t": 20.5}, {"ev": "start", "trial_id": "t2", "t": 11.0},
              {"ev": "end", "trial_id": "t2", "t": 30.0}, {"ev": "start", "trial_id": "lost", "t": 1.0}]
    (sdir / "manifest" / "cell.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    for tid, started, finished in (("t1", 13.0, 20.0), ("t2", 11.5, 29.0)):
        (sdir / "runs" / "cell" / tid).mkdir(parents=True)
        (sdir / "runs" / "cell" / tid / "summary.json").write_text(
            json.dumps({"started_at": started, "finished_at": finished}))
    got = bench.overhead_breakdown(sdir)  # start-up 3 and 0.5; teardown 0.5 and 1; "lost" has no run
    assert got == pytest.approx({"trials_matched": 2, "startup_mean_s": 1.75, "startup_max_s": 3.0,
                                 "teardown_mean_s": 0.75, "teardown_max_s": 1.0})
    assert bench.overhead_breakdown(tmp_path / "empty") == {}
