"""Benchmark: sweep overhead (issue 8, target 3) and trial packing (target 4).

Target 3 — what Ray Tune, trial start-up and outputs add to the training itself (≤ 5% of a
60-second trial for in-process one-worker trials).

Runs a real `python -m calray.sweep` on synthetic data, one trial at a time (so wall time is
the sum of trials plus overhead), twice: with N and with 2N trials. For each run
  overhead = wall (the whole command) − Σ training-loop time (summary.json `duration_s`)
and the difference of the two runs separates the marginal overhead of one trial (Tune
scheduling, trial start, model build, outputs) from the fixed cost of a sweep (interpreter and
Ray start, report). Prints the marginal per-trial overhead as a fraction of a `--reference-s`
trial — the target — and the fixed cost.

  python scripts/bench_sweep.py                      # 4 then 8 trials of ~8 s, CPU
  python scripts/bench_sweep.py --trials 8 --epochs 40

Target 4 (`--packing K [K ...]`) — how much of the device's throughput a whole sweep gets when K
trials share it. For each K:
  ceiling_K  K concurrent copies of `bench_step.py --run-config` (the plain resident step of the
             trial's model and batch, started together by a barrier): Σ samples/s
  sweep_K    a real sweep of 2K trials, K at a time, each with 1/K of the device (cpus_per_worker
             = cpus/K, or gpus_per_worker = 1/K on CUDA): Σ training samples / (last trial's end −
             first trial's start), from each trial's metrics.jsonl and summary.json
and prints sweep_K / max_K ceiling_K — the target is ≥ 0.93 — and the best K.
Both run the same method variant (`--variant`, default plain; target 1 prices CAL itself).

  python scripts/bench_sweep.py --packing 1 2                                   # CPU, quickstart
  python scripts/bench_sweep.py --packing 1 2 4 --device cuda --run-config R.yaml  # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from calray.io import write_json  # noqa: E402
from calray.engine.runinfo import environment  # noqa: E402


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


VARIANT_METHODS = {  # as scripts/bench_step.py VARIANTS
    "plain": {"strategy": "none", "aib": "off", "track_contributions": False},
    "cal": {"strategy": "cal", "aib": "off"},
}


def step_ceiling(k: int, args, tmp: Path) -> float:
    """Σ samples/s of k concurrent plain-step processes on resident batches."""
    threads = max(1, args.cpus // k)
    barrier = tmp / f"barrier_{k}"
    procs = []
    for i in range(k):
        cmd = [sys.executable, str(REPO / "scripts" / "bench_step.py"), "--run-config", str(args.run_config),
               "--variants", args.variant, "--device", args.device, "--threads", str(threads),
               "--rounds", str(args.rounds), "--steps", str(args.steps), "--barrier", str(barrier),
               "--barrier-n", str(k), "--out", str(tmp / f"ceiling_{k}_{i}.json")]
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    total = 0.0
    for i, proc in enumerate(procs):
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"bench_step.py copy {i} of {k} failed:\n{out[-3000:]}")
        total += json.loads((tmp / f"ceiling_{k}_{i}.json").read_text())["samples_per_s"][args.variant]
    return total


def packing_sweep_file(tmp: Path, k: int, args) -> Path:
    run = yaml.safe_load(args.run_config.read_text())
    run.setdefault("optim", {})["epochs"] = args.epochs
    run.setdefault("method", {}).update(VARIANT_METHODS[args.variant])
    run.setdefault("runtime", {})["device"] = "auto" if args.device == "cuda" else args.device
    if args.n_train and run.get("data", {}).get("dataset") == "synthetic":
        run["data"].setdefault("params", {})["n_train"] = args.n_train
    cuda = args.device.startswith("cuda")
    tree = {
        "name": f"bench_packing_{k}",
        "run": run,
        "search": {"algorithm": "random", "num_samples": args.waves * k, "seed": 0,
                   "space": {"method.T": {"loguniform": [0.5, 5]}}},
        "scheduler": None,
        "resources": {"workers": 1, "cpus_per_worker": max(args.cpus / k, 0.25) if not cuda else max(1, args.cpus // k),
                      "gpus_per_worker": 1.0 / k if cuda else 0.0},
        "max_concurrent_trials": k,
        "ray": {"storage_path": str(tmp / "sweeps"), "num_cpus": args.cpus, "num_gpus": 1 if cuda else 0},
    }
    path = tmp / f"packing_{k}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def sweep_throughput(k: int, args, tmp: Path) -> dict:
    path = packing_sweep_file(tmp, k, args)
    res = subprocess.run([sys.executable, "-m", "calray.sweep", str(path), "--quiet"], cwd=REPO,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"sweep with {k} concurrent trials failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    run_dirs = sorted(p.parent for p in tmp.glob(f"sweeps/bench_packing_{k}/runs/*/*/summary.json"))
    if len(run_dirs) != args.waves * k:
        raise SystemExit(f"expected {args.waves * k} finished trials, found {len(run_dirs)} under {tmp}")
    samples, train_s, starts, ends, threads, epoch_rates = 0, 0.0, [], [], set(), []
    for d in run_dirs:
        summary = json.loads((d / "summary.json").read_text())
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
        epoch_rates.append([round(r["train_samples"] / r["train_time_s"]) for r in rows])
        samples += sum(r["train_samples"] for r in rows)
        train_s += sum(r["train_time_s"] for r in rows)
        starts.append(summary["started_at"])
        ends.append(summary["finished_at"])
        threads.add(json.loads((d / "env.json").read_text()).get("torch_threads"))
    span = max(ends) - min(starts)
    return {"trials": len(run_dirs), "samples": samples, "span_s": span, "samples_per_s": samples / span,
            "training_only_samples_per_s": samples / train_s * k, "torch_threads": sorted(threads), "epoch_samples_per_s": epoch_rates}


def packing(args) -> int:
    ks = sorted(set(args.packing))
    results = {}
    with tempfile.TemporaryDirectory(prefix="calray_bench_packing_") as tmp:
        tmp = Path(tmp)
        for k in ks:  # the ceiling before and after each sweep: a drifting machine shows as a spread
            print(f"K={k}: ceiling ({k} concurrent bench_step.py) ...", flush=True)
            before = step_ceiling(k, args, tmp)
            print(f"K={k}: sweep of {args.waves * k} trials, {k} at a time ...", flush=True)
            sweep = sweep_throughput(k, args, tmp)
            print(f"K={k}: ceiling again ...", flush=True)
            after = step_ceiling(k, args, tmp)
            results[k] = {"ceiling_samples_per_s": (before + after) / 2, "ceiling_before_after": [before, after],
                          "sweep": sweep}
    best_ceiling = max(r["ceiling_samples_per_s"] for r in results.values())
    print(f"\n{'K':>3}{'ceiling samples/s (before/after)':>34}{'sweep samples/s':>18}{'sweep / max ceiling':>22}"
          f"{'threads':>9}")
    for k, r in results.items():
        r["ratio_to_max_ceiling"] = r["sweep"]["samples_per_s"] / best_ceiling
        ceiling = f"{r['ceiling_samples_per_s']:.0f} (" + "/".join(f"{c:.0f}" for c in r["ceiling_before_after"]) + ")"
        print(f"{k:>3}{ceiling:>34}{r['sweep']['samples_per_s']:>18.0f}"
              f"{r['ratio_to_max_ceiling']:>22.3f}{str(r['sweep']['torch_threads']):>9}")
    best_k = max(results, key=lambda k: results[k]["sweep"]["samples_per_s"])
    print(f"best trials per device: {best_k} (sweep / max ceiling {results[best_k]['ratio_to_max_ceiling']:.3f}, "
          f"target ≥ 0.93)")
    out = {"mode": "packing", "run_config": str(args.run_config), "device": args.device, "variant": args.variant,
           "cpus": args.cpus, "epochs": args.epochs, "results": results, "best_k": best_k, "env": environment()}
    write_json(args.out, out)
    print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--reference-s", type=float, default=60.0, help="trial length the target refers to")
    p.add_argument("--out", type=Path, default=Path("runs/bench_sweep.json"))
    packing_args = p.add_argument_group("packing (target 4)")
    packing_args.add_argument("--packing", type=int, nargs="+", metavar="K", help="trials sharing the device")
    packing_args.add_argument("--run-config", type=Path, default=REPO / "configs" / "quickstart.yaml")
    packing_args.add_argument("--device", default="cpu", help="cpu or cuda")
    packing_args.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs given to Ray and the ceiling")
    packing_args.add_argument("--variant", choices=sorted(VARIANT_METHODS), default="plain")
    packing_args.add_argument("--waves", type=int, default=2, help="trials per sweep = waves × K")
    packing_args.add_argument("--rounds", type=int, default=7, help="bench_step.py rounds for the ceiling")
    packing_args.add_argument("--steps", type=int, default=100, help="bench_step.py steps per round")
    args = p.parse_args(argv)
    if args.packing:
        args.run_config = args.run_config.resolve()
        return packing(args)

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
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
