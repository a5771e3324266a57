"""Benchmark: trainer throughput through the real data path vs the same step on resident tensors
(issue 8, target 2: the data path must not be the bottleneck).

Writes a CREMA-D fixture in the OGM-GE layout (JPEG frames at the release's 1 fps and size,
3 s 22,050 Hz wavs), then measures in one run:
  resident   plain steps on one device-resident batch of the dataset's exact shapes
  data path  whole training epochs through calray's loader (decode cache warmed by one epoch,
             so later epochs and later trials read memory-mapped spectrograms/frames)
and prints data-path samples/s ÷ resident samples/s.

  python scripts/bench_data.py                                   # CPU-sized defaults
  python scripts/bench_data.py --device cuda --image-size 224 --frames 3 --batch 64 --clips 1024 --workers 8
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calray.io import write_json  # noqa: E402
from calray.config import config_from_dict  # noqa: E402
from calray.data import build_datasets  # noqa: E402
from calray.engine.runinfo import environment  # noqa: E402
from calray.engine.evaluate import to_device  # noqa: E402
from calray.engine.trainer import Trainer  # noqa: E402

EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")


def write_cremad(root: Path, clips: int, frames_per_clip: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = {"train": [], "test": []}
    for i in range(clips):
        split = "test" if i % 10 == 0 else "train"
        clip = f"{1001 + i}_DFA_{EMOTIONS[i % 6]}_XX"
        rows[split].append(f"{clip},{EMOTIONS[i % 6]}")
        fdir = root / "Image-01-FPS" / clip
        fdir.mkdir(parents=True, exist_ok=True)
        for k in range(frames_per_clip):
            img = rng.integers(0, 255, size=(240, 320, 3), dtype=np.uint8)
            Image.fromarray(img).save(fdir / f"{k + 1:05d}.jpg", quality=90)
        (root / "AudioWAV").mkdir(parents=True, exist_ok=True)
        pcm = (rng.normal(0, 0.1, size=22050 * 3).clip(-1, 1) * 32767).astype("<i2")
        with wave.open(str(root / "AudioWAV" / f"{clip}.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(22050)
            w.writeframes(pcm.tobytes())
    for split, r in rows.items():
        (root / f"{split}.csv").write_text("\n".join(r) + "\n")


def run_config(args, root: Path, cache: Path, out: Path) -> dict:
    return {
        "name": "bench_data",
        "data": {"dataset": "cremad", "root": str(root), "batch_size": args.batch, "num_workers": args.workers,
                 "cache_dir": str(cache), "params": {"frames": args.frames, "image_size": args.image_size,
                                                     "audio": "wav", "cache_frames": True}},
        "model": {"encoders": {"audio": {"name": "resnet18", "in_channels": 1},
                               "visual": {"name": "resnet18", "in_channels": 3, "frames": True}}},
        "method": {"strategy": "none", "aib": "off", "track_contributions": False},
        "optim": {"name": "sgd", "lr": 1e-3, "epochs": 1},
        "runtime": {"device": args.device, "output_dir": str(out), "progress": False, "resume": False},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--clips", type=int, default=120)
    p.add_argument("--frames", type=int, default=2)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2, help="measured epochs after the cache-warming one")
    p.add_argument("--out", type=Path, default=Path("runs/bench_data.json"))
    p.add_argument("--keep", type=Path, help="write the fixture, cache and a run.yaml here and keep them")
    args = p.parse_args(argv)

    with contextlib.nullcontext(str(args.keep)) if args.keep else \
            tempfile.TemporaryDirectory(prefix="calray_bench_data_") as tmp:
        tmp = Path(tmp).resolve()
        t0 = time.perf_counter()
        write_cremad(tmp / "cremad", args.clips, max(args.frames, 3))
        print(f"fixture: {args.clips} clips written in {time.perf_counter() - t0:.1f}s")
        tree = run_config(args, tmp / "cremad", tmp / "cache", tmp / "runs")
        if args.keep:  # for `bench_sweep.py --packing --run-config <keep>/run.yaml`
            (tmp / "run.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
            print(f"kept the fixture, its decode cache and {tmp / 'run.yaml'}")
        cfg = config_from_dict(tree, "bench_data")
        splits = build_datasets(cfg)
        trainer = Trainer(cfg, splits=splits)
        n_train = len(splits.train)

        t0 = time.perf_counter()
        trainer.train_epoch(0)  # decodes every clip once and fills the cache
        first = time.perf_counter() - t0
        times = []
        for e in range(1, args.epochs + 1):
            t0 = time.perf_counter()
            trainer.train_epoch(e)
            times.append(time.perf_counter() - t0)
        data_sps = n_train / min(times)

        # the same model and step on one resident batch of the dataset's shapes
        inputs, labels = next(iter(trainer.train_loader))
        batch = (to_device(inputs, trainer.device, trainer.channels_last), labels.to(trainer.device))
        steps = len(trainer.train_loader)
        resident = []
        for _ in range(args.epochs):
            if trainer.cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for s in range(steps):
                trainer.train_step(*batch, epoch=1, step=s)
            if trainer.cuda:
                torch.cuda.synchronize()
            resident.append(time.perf_counter() - t0)
        resident_sps = steps * len(labels) / min(resident)

    ratio = data_sps / resident_sps
    shapes = {m: tuple(v.shape[1:]) for m, v in inputs.items()}
    print(f"device {trainer.device}, batch {args.batch}, workers {args.workers}, shapes {shapes}")
    print(f"first epoch (decode + cache fill): {n_train / first:.1f} samples/s")
    print(f"data path (cached):                {data_sps:.1f} samples/s")
    print(f"resident batch:                    {resident_sps:.1f} samples/s")
    print(f"data path / resident:              {ratio:.3f}  (target ≥ 0.95)")
    result = {"device": str(trainer.device), "batch": args.batch, "workers": args.workers, "shapes": shapes,
              "n_train": n_train, "first_epoch_sps": n_train / first, "data_path_sps": data_sps,
              "resident_sps": resident_sps, "ratio": ratio, "env": environment(trainer.device)}
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
