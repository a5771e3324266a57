"""Wall time of the robustness grid's test mode: serial (in this process) vs Ray tasks (one per
target × kind), on tiny synthetic runs with a larger test split, as the final seeds of one cell of a
fabricated sweep dir (final.csv), on a local Ray instance started first (its start-up is not
counted: a sweep's grid runs on the sweep's Ray instance).

    python scripts/bench_robustness_tasks.py [--targets 2] [--n-test 20000] [--num-cpus 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from calray.config import config_from_dict  # noqa: E402
from calray.engine.trainer import train  # noqa: E402
from calray.robustness.grid import run_grid  # noqa: E402


def tiny_run(out: Path, i: int, n_test: int) -> Path:
    tree = {"name": f"seed{i}",
            "data": {"dataset": "synthetic", "batch_size": 64, "seed": i,
                     "params": {"modalities": ["audio", "visual"], "num_classes": 4, "dim": 64,
                                "strengths": [1.0, 0.4], "n_train": 512, "n_val": 128, "n_test": n_test}},
            "model": {"encoders": {m: {"name": "mlp", "hidden": [256, 256]} for m in ("audio", "visual")}},
            "method": {"strategy": "cal"}, "optim": {"name": "sgd", "lr": 0.05, "epochs": 1},
            "runtime": {"output_dir": str(out), "progress": False, "seed": i, "tensorboard": False}}
    cfg = config_from_dict(tree, f"seed{i}")
    train(cfg)
    return cfg.run_dir()


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--targets", type=int, default=2)
    p.add_argument("--n-test", type=int, default=20000)
    p.add_argument("--num-cpus", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    grid = {"kinds": ["gaussian", "salt_pepper", "missing"], "eps": [0, 5, 10], "attacked": ["all", "visual"],
            "noise_seeds": 3}
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        sdir = Path(tmp)
        runs = [tiny_run(sdir / "final" / "runs" / "c1", i, a.n_test) for i in range(a.targets)]
        pd.DataFrame({"cell": "c1", "dataset": "synthetic", "noise": "none", "variant": "default",
                      "seed": range(a.targets), "status": "ok", "run_dir": [str(r) for r in runs]}
                     ).to_csv(sdir / "final.csv", index=False)
        ray.init(address="local", num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=False)
        try:
            for rep in range(a.repeats):
                for tasks in (False, True):
                    t0 = time.time()
                    n = len(run_grid(sdir, {**grid, "test_tasks": tasks}, quiet=True))
                    dt = time.time() - t0
                    print(f"BENCH run {rep + 1} {'tasks ' if tasks else 'serial'}: {a.targets} targets, {n} rows, "
                          f"{dt:.1f}s", flush=True)
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
