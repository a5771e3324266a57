"""Compare the gradient-modulation strategies of Fig. 2 (cal / null / weak / ogm_ge / none) and AIB
on/off on one synthetic imbalanced task over several seeds (OGM-GE both as published and inside
CAL's loss, `ogm_ge_mix`).

    python scripts/compare_strategies.py [--config configs/quickstart.yaml] [--seeds 5] [--epochs N]
                                         [--out runs/compare] [--set key=value ...]

Every run uses `calray.engine.trainer.train` in-process (progress off, no resume) with runtime.seed and
data.seed both set to the seed, so strategy s and strategy s' with the same seed see the same
data and the same initialisation (paired comparison). Test accuracy is that of the
best-on-validation epoch (the trainer never selects on test).

Writes, under --out:
  runs.csv          one row per run (variant, seed, test acc, per-modality test acc, ...)
  summary.csv       mean ± std over seeds per variant
  trajectory.csv    per-epoch mean over seeds of W, a, β, R, P, φ, I for every variant
  results.json      all of the above plus the command line and the environment
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# variant name → method overrides; AIB and the unimodal CE terms follow the config unless a
# variant says otherwise. `ogm_ge` is OGM-GE as published (fused CE only, no AIB), paired with
# `none_fused_ce` (the same loss, no modulation: the reference code's "Normal"); `ogm_ge_mix` is
# OGM-GE's modulation inside the config's CAL loss (unimodal CE terms + AIB), paired with `none`.
VARIANTS: dict[str, dict] = {
    "cal": {"strategy": "cal"},
    "cal_no_aib": {"strategy": "cal", "aib": "off"},
    "null": {"strategy": "null"},
    "weak": {"strategy": "weak"},
    "ogm_ge": {"strategy": "ogm_ge", "aib": "off", "unimodal_weight": 0},
    "ogm_ge_mix": {"strategy": "ogm_ge_mix"},
    "none": {"strategy": "none"},
    "none_no_aib": {"strategy": "none", "aib": "off"},
    "none_fused_ce": {"strategy": "none", "aib": "off", "unimodal_weight": 0},
}
TRAJ_KEYS = ("W", "a", "beta", "R", "P", "phi", "I", "D", "train_aib_kl")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (runtime.seed = data.seed = seed)")
    p.add_argument("--epochs", type=int, default=None, help="override optim.epochs")
    p.add_argument("--out", default=str(ROOT / "runs" / "compare"))
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra dotted override applied to every run")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for tiny MLPs)")
    return p.parse_args(argv)


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from calray.config import load_config
    from calray.errors import TrainingError
    from calray.engine.trainer import train

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_config(args.config, args.overrides)  # a bad config fails before any run
    modalities = None
    records, trajectories = [], {}
    t_all = time.time()
    for variant in args.variants:
        for seed in range(args.seeds):
            overrides = [f"method.{k}={v}" for k, v in VARIANTS[variant].items()]
            overrides += [f"runtime.seed={seed}", f"data.seed={seed}", "runtime.progress=false",
                          "runtime.resume=false", f"runtime.output_dir={out / 'runs'}",
                          f"runtime.run_name={variant}_s{seed}", *args.overrides]
            if args.epochs is not None:
                overrides.append(f"optim.epochs={args.epochs}")
            cfg = load_config(args.config, overrides)
            t0 = time.time()
            try:
                summary = train(cfg)
            except TrainingError as e:  # a diverged run is a result, not a crash of the comparison
                records.append({"variant": variant, "strategy": cfg.method.strategy, "aib": cfg.method.aib,
                                "seed": seed, "status": "diverged", "error": str(e), "time_s": time.time() - t0})
                print(f"{variant:12s} seed {seed}: DIVERGED ({e})", flush=True)
                continue
            modalities = summary["modalities"]
            test = summary["test"]
            rec = {"variant": variant, "strategy": cfg.method.strategy, "aib": cfg.method.aib,
                   "unimodal_weight": cfg.method.unimodal_weight, "seed": seed,
                   "test_acc": test["acc"], "test_macro_f1": test["macro_f1"],
                   **{f"test_acc_{m}": test[f"acc_{m}"] for m in modalities},
                   "best_epoch": summary["best_epoch"], "best_val_acc": summary["best_val_acc"],
                   "status": "ok", "time_s": time.time() - t0}
            rows = [json.loads(line) for line in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines() if line]
            rec.update({f"aib_kl_{m}": rows[-1].get(f"train_aib_kl_{m}", math.nan) for m in modalities})
            records.append(rec)
            trajectories.setdefault(variant, []).append(rows)
            print(f"{variant:12s} seed {seed}: test acc {rec['test_acc']:.4f} "
                  + " ".join(f"{m} {rec[f'test_acc_{m}']:.4f}" for m in modalities)
                  + f" ({rec['time_s']:.1f}s)", flush=True)

    modalities = modalities or []
    metrics = ["test_acc", "test_macro_f1", *[f"test_acc_{m}" for m in modalities]]
    summary_rows = []
    finished = [r for r in records if r["status"] == "ok"]
    none_by_seed = {r["seed"]: r for r in finished if r["variant"] == "none"}
    for variant in args.variants:
        recs = [r for r in finished if r["variant"] == variant]
        row = {"variant": variant, "n_seeds": len(recs),
               "n_diverged": sum(r["variant"] == variant and r["status"] == "diverged" for r in records)}
        for k in [f"aib_kl_{m}" for m in modalities or []]:
            row[f"{k}_mean"], _ = mean_std([r[k] for r in recs if not math.isnan(r[k])])  # NaN: AIB off
        for k in metrics:
            row[f"{k}_mean"], row[f"{k}_std"] = mean_std([r[k] for r in recs])
        if none_by_seed and variant != "none":  # paired difference against plain `none` (same seeds)
            diffs = [r["test_acc"] - none_by_seed[r["seed"]]["test_acc"] for r in recs if r["seed"] in none_by_seed]
            row["diff_vs_none_mean"], row["diff_vs_none_std"] = mean_std(diffs)
            row["wins_vs_none"] = sum(d > 0 for d in diffs)
            row["ties_vs_none"] = sum(d == 0 for d in diffs)
        summary_rows.append(row)

    traj_rows = []
    for variant, runs in trajectories.items():
        n_ep = min(len(r) for r in runs)
        for ep in range(n_ep):
            row = {"variant": variant, "epoch": ep}
            for key in TRAJ_KEYS:
                for m in modalities:
                    row[f"{key}_{m}"] = statistics.fmean(r[ep].get(f"{key}_{m}", math.nan) for r in runs)
            for m in modalities:
                row[f"train_acc_{m}"] = statistics.fmean(r[ep][f"train_acc_{m}"] for r in runs)
                row[f"val_acc_{m}"] = statistics.fmean(r[ep][f"val_acc_{m}"] for r in runs)
            row["val_acc"] = statistics.fmean(r[ep]["val_acc"] for r in runs)
            traj_rows.append(row)

    def write_csv(path: Path, rows: list[dict]) -> None:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)

    write_csv(out / "runs.csv", records)
    write_csv(out / "summary.csv", summary_rows)
    write_csv(out / "trajectory.csv", traj_rows)
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "config": str(args.config),
              "overrides": args.overrides, "epochs": args.epochs, "seeds": args.seeds,
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpu_count": __import__("os").cpu_count(), "torch": torch.__version__,
                          "threads": args.threads},
              "total_time_s": time.time() - t_all, "runs": records, "summary": summary_rows,
              "trajectory": traj_rows}
    (out / "results.json").write_text(json.dumps(result, indent=1))

    print(f"\n{'variant':12s} {'test acc':>17s} " + " ".join(f"{m:>17s}" for m in modalities)
          + f" {'Δ vs none (paired)':>22s}")
    for row in summary_rows:
        cells = [f"{row[f'{k}_mean']:.4f} ± {row[f'{k}_std']:.4f}" for k in ["test_acc", *[f"test_acc_{m}" for m in modalities]]]
        diff = (f"{row['diff_vs_none_mean']:+.4f} ± {row['diff_vs_none_std']:.4f}" if "diff_vs_none_mean" in row else "")
        diverged = f"  ({row['n_diverged']} diverged)" if row["n_diverged"] else ""
        print(f"{row['variant']:12s} " + " ".join(f"{c:>17s}" for c in cells) + f" {diff:>22s}{diverged}")
    print(f"\n{len(records)} runs in {time.time() - t_all:.0f}s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
