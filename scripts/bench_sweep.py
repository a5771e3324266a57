"""Benchmark: sweep overhead — what Ray Tune, trial start-up and outputs add to the training itself
(issue 8, target 3: ≤ 5% of a 60-second trial for in-process one-worker trials).

Runs a real `python -m calray.sweep` on synthetic data, one trial at a time (so wall time is
the sum of trials plus overhead), twice: with N and with 2N trials. For each run
  overhead = wall (the whole command) − Σ training-loop time (summary.json `duration_s`)
and the difference of the two runs separates the marginal overhead of one trial (Tune
scheduling, trial start, model build, outputs) from the fixed cost of a sweep (interpreter and
Ray start, report). Prints the marginal per-trial overhead as a fraction of a `--reference-s`
trial — the target — and the fixed cost.

  python scripts/bench_sweep.py                      # 4 then 8 trials of ~8 s, CPU
  python scripts/bench_sweep.py --trials 8 --epochs 40
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from calray.runinfo import environment  # noqa: E402


def sweep_file(tmp: Path, trials: int, epochs: int, n_train: int) -> Path:
    base = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    base["data"]["params"]["n_train"] = n_train
    base["optim"]["epochs"] = epochs
    base["runtime"]["device"] = "cpu"
    tree = {
        "name": "bench_sweep",
        "run": base,
        "search": {"algorithm": "random", "num_samples": trials, "seed": 0,
                   "space": {"method.T": {"loguniform": [0.5, 5]}, "method.eta": {"uniform": [0.5, 2]}}},
        "scheduler": None,
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "max_concurrent_trials": 1,
        "ray": {"storage_path": str(tmp / "sweeps")},
    }
    path = tmp / "bench_sweep.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def run_once(trials: int, args) -> tuple[int, float, float] | None:
    """(finished trials, wall seconds, Σ training-loop seconds) of one sweep command."""
    with tempfile.TemporaryDirectory(prefix="calray_bench_sweep_") as tmp:
        tmp = Path(tmp)
        path = sweep_file(tmp, trials, args.epochs, args.n_train)
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "calray.sweep", str(path), "--quiet"], cwd=REPO,
                             capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            print(res.stdout[-3000:], res.stderr[-3000:], sep="\n")
            return None
        summaries = [json.loads(s.read_text()) for s in sorted(tmp.glob("sweeps/bench_sweep/runs/*/*/summary.json"))]
    if len(summaries) != trials:
        print(f"expected {trials} finished trials, found {len(summaries)}")
        return None
    return trials, wall, sum(s["duration_s"] for s in summaries)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--reference-s", type=float, default=60.0, help="trial length the target refers to")
    p.add_argument("--out", type=Path, default=Path("runs/bench_sweep.json"))
    args = p.parse_args(argv)

    runs = [run_once(args.trials, args), run_once(2 * args.trials, args)]
    if any(r is None for r in runs):
        return 1
    (n1, wall1, train1), (n2, wall2, train2) = runs
    over1, over2 = wall1 - train1, wall2 - train2
    marginal = (over2 - over1) / (n2 - n1)
    fixed = over1 - n1 * marginal
    for n, wall, train in runs:
        print(f"{n} trials: wall {wall:.1f}s, Σ training {train:.1f}s ({train / n:.1f}s per trial), "
              f"overhead {wall - train:.1f}s")
    print(f"marginal overhead per trial: {marginal:.2f}s; fixed cost per sweep: {fixed:.1f}s")
    print(f"marginal overhead / {args.reference_s:.0f}s trial: {marginal / args.reference_s:.3f} (target ≤ 0.05)")
    result = {"runs": [{"trials": n, "wall_s": w, "training_s": t} for n, w, t in runs],
              "marginal_overhead_per_trial_s": marginal, "fixed_overhead_s": fixed,
              "overhead_fraction_of_reference_trial": marginal / args.reference_s,
              "reference_trial_s": args.reference_s, "env": environment()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
