"""`python -m calray.train CONFIG.yaml [--set key=value ...] [--workers N] [--gpu] [--address ADDR] [--fresh]`."""

from __future__ import annotations

import argparse
import sys

from calray.config import load_config
from calray.engine.trainer import train
from calray.errors import run_cli
from calray.ray.distributed import train_distributed


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m calray.train", description="Train one calray run from a YAML config.")
    p.add_argument("config", help="run config YAML (see configs/ and docs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set optim.lr=0.01 (repeatable)")
    p.add_argument("--workers", type=int, default=None, help="Ray Train DDP workers (default: distributed.workers)")
    p.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker (nccl)")
    p.add_argument("--address", default=None, help="Ray cluster: 'auto' or host:port (default: local)")
    p.add_argument("--fresh", action="store_true",
                   help="start over in the run dir, replacing a previous run there (= --set runtime.resume=false); "
                        "without it a run resumes only from a run of the same config")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"distributed.workers={args.workers}")
    if args.gpu:
        overrides.append("distributed.gpu=true")
    if args.address is not None:
        overrides.append(f"distributed.address={args.address}")
    if args.fresh:
        overrides.append("runtime.resume=false")

    def body() -> int:
        cfg = load_config(args.config, overrides)
        if cfg.distributed.workers > 1 or cfg.distributed.address is not None:
            train_distributed(cfg)
        else:
            train(cfg)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
