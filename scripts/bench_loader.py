"""Benchmark: whole-batch vs per-sample loading of an in-memory dataset (issue 8, data path).

Iterates a run config's training split through the trainer's loader (whole batches from
`get_batch`, calray/data/batched.py) and through a plain per-sample DataLoader with the same
sampler, interleaved, and prints the median ms per batch of each and their ratio.

  python scripts/bench_loader.py --run-config configs/quickstart.yaml
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calray.io import write_json  # noqa: E402
from calray.config import load_config  # noqa: E402
from calray.engine.runinfo import environment  # noqa: E402
from calray.engine.trainer import Trainer  # noqa: E402


def ms_per_batch(loader) -> float:
    t0 = time.perf_counter()
    n = sum(1 for _ in loader)
    return (time.perf_counter() - t0) / n * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-config", type=Path, default=Path("configs/quickstart.yaml"))
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/bench_loader.json"))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    trainer = Trainer(load_config(args.run_config, [f"runtime.output_dir={args.out.parent / 'bench_loader_runs'}"]))
    whole = trainer.train_loader
    if whole.batch_size is not None:
        raise SystemExit(f"{args.run_config}: its dataset has no get_batch; nothing to compare")
    per_sample = DataLoader(trainer.splits.train, batch_size=whole.sampler.batch_size, sampler=whole.sampler.sampler)
    times = {"per_sample": [], "whole_batch": []}
    for _ in range(args.rounds):
        times["per_sample"].append(ms_per_batch(per_sample))
        times["whole_batch"].append(ms_per_batch(whole))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.run_config}: batch {whole.sampler.batch_size}, {len(whole)} batches, {args.rounds} rounds (median)")
    print(f"per-sample DataLoader  {med['per_sample']:.3f} ms/batch")
    print(f"whole-batch loader     {med['whole_batch']:.3f} ms/batch  ({med['whole_batch'] / med['per_sample']:.3f}×)")
    write_json(args.out, {"run_config": str(args.run_config), "ms_per_batch": med, "rounds": times,
                          "ratio": med["whole_batch"] / med["per_sample"], "env": environment()})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
