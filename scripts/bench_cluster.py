"""Benchmark: how well a multi-cell sweep fills a multi-node Ray cluster (issue 17, item 5).

Starts a local cluster on this machine with plain `ray start` nodes (calray.ray.local_cluster:
`--nodes` nodes × `--cpus-per-node` logical CPUs, own temp dir and ports, stopped at the end by
pid), runs a real `python -m calray.sweep SWEEP --address HEAD` of `--cells` cells × `--trials`
one-CPU trials of a tiny synthetic model, and prints, from each trial's summary.json
(`started_at`, `finished_at`: the training loop's own span):

  slot utilisation   Σ trial busy time / (slots × sweep wall); slots = Σ logical CPUs / CPUs per
                     trial, sweep wall = last trial's end − first trial's start (and, for the
                     record, the same over the whole command's wall time)
  peak concurrency   the most trials training at one moment
  marginal per-trial overhead
                     with `--marginal` a second sweep with twice the trials per cell; overhead =
                     slots × sweep wall − Σ busy (slot-seconds not spent training), and the
                     difference of the two runs per added trial is what one more trial costs
                     (trial start, Tune scheduling, model build, outputs) beyond its training

It measures whatever calray.sweep.runner does (cells one after another, or together).

  python scripts/bench_cluster.py                    # 2 nodes × 4 CPUs, 4 cells × 6 trials
  python scripts/bench_cluster.py --marginal         # plus 4 cells × 12 trials
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from calray.engine.runinfo import environment  # noqa: E402
from calray.io import write_json  # noqa: E402
from calray.ray.local_cluster import LocalCluster  # noqa: E402

NOISE_CELLS = [{"kind": "none"}, {"kind": "gaussian", "eps": 5, "mode": "test"},
               {"kind": "gaussian", "eps": 10, "mode": "test"}, {"kind": "gaussian", "eps": 20, "mode": "test"},
               {"kind": "gaussian", "eps": 40, "mode": "test"}, {"kind": "gaussian", "eps": 80, "mode": "test"}]


def sweep_file(tmp: Path, name: str, args, trials: int) -> Path:
    base = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    base["data"]["params"]["n_train"] = args.n_train
    base["optim"]["epochs"] = args.epochs
    base["runtime"]["device"] = "cpu"
    if args.cells > len(NOISE_CELLS):
        raise SystemExit(f"--cells: at most {len(NOISE_CELLS)}")
    tree = {
        "name": name,
        "run": base,
        "cells": {"noise": NOISE_CELLS[:args.cells]},
        "search": {"algorithm": "random", "num_samples": trials, "seed": 0,
                   "space": {"method.T": {"loguniform": [0.5, 5]}, "method.eta": {"uniform": [0.5, 2]}}},
        "scheduler": None,
        "resources": {"workers": 1, "cpus_per_worker": args.cpus_per_trial},
        "max_concurrent_trials": args.max_concurrent_trials,
        "ray": {"storage_path": str(tmp / "sweeps")},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


# ---------------------------------------------------------------- the figures


def peak_concurrency(spans: list[tuple[float, float]]) -> int:
    """The most intervals open at one moment (an end at t closes before a start at t opens)."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    peak = cur = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


def figures(spans: list[tuple[float, float]], slots: float, command_wall_s: float) -> dict:
    """Utilisation, peak concurrency and slot-seconds not spent training, for one sweep's trials."""
    busy = sum(e - s for s, e in spans)
    wall = max(e for _, e in spans) - min(s for s, _ in spans)
    return {"trials": len(spans), "slots": slots, "busy_s": busy, "sweep_wall_s": wall,
            "command_wall_s": command_wall_s, "utilisation": busy / (slots * wall),
            "utilisation_of_command_wall": busy / (slots * command_wall_s),
            "peak_concurrency": peak_concurrency(spans), "idle_slot_s": slots * wall - busy}


def marginal_overhead(small: dict, large: dict) -> float:
    """Slot-seconds one more trial costs beyond its training: Δ idle slot time / Δ trials."""
    return (large["idle_slot_s"] - small["idle_slot_s"]) / (large["trials"] - small["trials"])


def overhead_breakdown(sdir: Path) -> dict:
    """Where a trial's slot time goes besides training, from the manifest's event times (`t`: the
    driver saw Tune start / end the trial) and summary.json's training span: start-up = start event →
    training starts (actor, run config, datasets, model); teardown = training ends → end event (test
    evaluation, checkpoint, the final report reaching the driver). Means and maxima in seconds."""
    events: dict[str, dict] = {}
    for path in sorted(sdir.glob("manifest/*.jsonl")):
        for line in path.read_text().splitlines():
            ev = json.loads(line)
            if ev.get("ev") in ("start", "end"):
                events.setdefault(ev["trial_id"], {}).setdefault(ev["ev"], ev["t"])
    startup, teardown = [], []
    for p in sorted(sdir.glob("runs/*/*/summary.json")):
        s, ev = json.loads(p.read_text()), events.get(p.parent.name, {})
        if "start" in ev and "end" in ev:
            startup.append(float(s["started_at"]) - ev["start"])
            teardown.append(ev["end"] - float(s["finished_at"]))
    if not startup:
        return {}
    return {"trials_matched": len(startup), "startup_mean_s": sum(startup) / len(startup), "startup_max_s": max(startup),
            "teardown_mean_s": sum(teardown) / len(teardown), "teardown_max_s": max(teardown)}


def trial_spans(sdir: Path) -> list[tuple[float, float]]:
    spans = []
    for p in sorted(sdir.glob("runs/*/*/summary.json")):
        s = json.loads(p.read_text())
        spans.append((float(s["started_at"]), float(s["finished_at"])))
    return spans


# ---------------------------------------------------------------- running


def run_sweep(cluster: LocalCluster, tmp: Path, name: str, args, trials: int) -> dict:
    path = sweep_file(tmp, name, args, trials)
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "calray.sweep", str(path), "--address", cluster.address, "--quiet"],
                         cwd=REPO, env=cluster.env(), capture_output=True, text=True)
    wall = time.time() - t0
    if res.returncode != 0:
        raise SystemExit(f"sweep {name} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    spans = trial_spans(tmp / "sweeps" / name)
    expected = args.cells * trials
    if len(spans) != expected:
        raise SystemExit(f"sweep {name}: expected {expected} finished trials, found {len(spans)}")
    slots = args.nodes * args.cpus_per_node / args.cpus_per_trial
    return {**figures(spans, slots, wall), **overhead_breakdown(tmp / "sweeps" / name)}


def print_run(label: str, f: dict) -> None:
    print(f"{label}: {f['trials']} trials on {f['slots']:g} slots: utilisation {f['utilisation']:.3f} "
          f"(of the command's wall {f['utilisation_of_command_wall']:.3f}), peak concurrency "
          f"{f['peak_concurrency']}, Σ busy {f['busy_s']:.1f}s, sweep wall {f['sweep_wall_s']:.1f}s, "
          f"command wall {f['command_wall_s']:.1f}s", flush=True)
    if "startup_mean_s" in f:
        print(f"  per trial besides training: start-up {f['startup_mean_s']:.1f}s (max {f['startup_max_s']:.1f}), "
              f"teardown {f['teardown_mean_s']:.1f}s (max {f['teardown_max_s']:.1f}); mean training "
              f"{f['busy_s'] / f['trials']:.1f}s", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--cpus-per-node", type=int, default=4, help="logical CPUs of each node (may overcommit)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--cells", type=int, default=4)
    p.add_argument("--trials", type=int, default=6, help="trials per cell")
    p.add_argument("--max-concurrent-trials", type=int, default=None,
                   help="the sweep's max_concurrent_trials (default: the slot count; 0: null, which in Ray 2.60 "
                        "with a searcher lets Tune start one pending trial at a time)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--marginal", action="store_true", help="a second sweep with 2× trials: marginal overhead")
    p.add_argument("--out", type=Path, default=Path("runs/bench_cluster.json"))
    p.add_argument("--keep", type=Path, help="copy the sweeps' directories (manifests, runs) here for inspection")
    args = p.parse_args(argv)
    if args.max_concurrent_trials is None:
        args.max_concurrent_trials = int(args.nodes * args.cpus_per_node // args.cpus_per_trial)
    args.max_concurrent_trials = args.max_concurrent_trials or None

    root = Path(f"/tmp/crb_{uuid.uuid4().hex[:8]}")  # short: Ray's socket paths live under it
    runs = {}
    with tempfile.TemporaryDirectory(prefix="calray_bench_cluster_") as tmp, LocalCluster(root) as cluster:
        tmp = Path(tmp)
        t0 = time.time()
        cluster.start([args.cpus_per_node] * args.nodes)
        print(f"cluster {cluster.address}: {args.nodes} nodes × {args.cpus_per_node} CPUs up in "
              f"{time.time() - t0:.1f}s", flush=True)
        runs["base"] = run_sweep(cluster, tmp, "bench_cluster", args, args.trials)
        print_run(f"{args.cells} cells × {args.trials} trials", runs["base"])
        if args.marginal:
            runs["double"] = run_sweep(cluster, tmp, "bench_cluster_2x", args, 2 * args.trials)
            print_run(f"{args.cells} cells × {2 * args.trials} trials", runs["double"])
        if args.keep:
            shutil.copytree(tmp / "sweeps", args.keep, dirs_exist_ok=True)
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "runs": runs,
              "env": environment()}
    if args.marginal:
        m = marginal_overhead(runs["base"], runs["double"])
        result["marginal_overhead_slot_s_per_trial"] = m
        print(f"marginal per-trial overhead: {m:.2f} slot-seconds (idle slot time one more trial adds)")
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
