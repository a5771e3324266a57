"""Benchmark: a training step with and without autograd on the unimodal logits, when nothing in the loss
uses them (`method.unimodal_weight: 0`, `method.aib: off`, a strategy that only reads their values; see
calray.method.base). MMBT is where it matters: its unimodal logits are two more passes of one BERT.

Builds the MVSA test fixture (tests/fixtures_data.py) in a temporary directory, then the
configs/mvsa_mmbt.yaml model with a randomly initialised BERT of the given size, no freeze schedule;
rounds of the two settings are interleaved on the same trainer and batch, and the script prints the ratio
of the medians.

  python scripts/bench_unimodal_grad.py                         # BERT-base size, 128 tokens, batch 2
  python scripts/bench_unimodal_grad.py --layers 2 --rounds 10  # quicker
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calray.config import load_config  # noqa: E402
from calray.engine.trainer import Trainer  # noqa: E402
from tests.test_data_e2e import CONFIGS, fixture_overrides  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=12, help="BERT layers (hidden 768, 12 heads, FFN 3072)")
    ap.add_argument("--tokens", type=int, default=128, help="data.params.max_length")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=2, help="steps per round")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ov = fixture_overrides("mvsa", Path(tmp))
        bert = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": args.layers, "num_attention_heads": 12,
                "intermediate_size": 3072, "max_position_embeddings": 512}
        ov.update({"model.encoders.text": {"name": "bert", "bert_config": bert}, "data.params.max_length": args.tokens,
                   "data.params.image_size": 64, "data.params.resize_size": 72, "data.batch_size": args.batch,
                   "model.encoders.image": {"name": "resnet18", "in_channels": 3}, "optim.grad_accum": 1,
                   "model.fusion_params.freeze_image_epochs": 0, "model.fusion_params.freeze_text_epochs": 0})
        trainer = Trainer(load_config(CONFIGS / "mvsa_mmbt.yaml", ov))
        if trainer.raw_model.unimodal_grad:
            raise SystemExit("the preset's loss should not need the unimodal gradients")
        inputs, labels = next(iter(trainer.train_loader))
        times = {True: [], False: []}
        trainer.train_step(inputs, labels, epoch=0, step=0)  # warm-up
        for _ in range(args.rounds):
            for flag in (True, False):
                trainer.raw_model.unimodal_grad = flag
                t0 = time.perf_counter()
                for step in range(args.steps):
                    trainer.train_step(inputs, labels, epoch=0, step=step)
                times[flag].append((time.perf_counter() - t0) / args.steps)
    with_grad, without = statistics.median(times[True]), statistics.median(times[False])
    print(f"BERT {args.layers} layers × 768, {args.tokens} tokens, batch {args.batch}, ResNet18 64 px, "
          f"{args.threads} thread(s), {args.rounds} rounds × {args.steps} steps (median per step)")
    print(f"unimodal logits with autograd    {with_grad * 1e3:9.1f} ms/step")
    print(f"unimodal logits without autograd {without * 1e3:9.1f} ms/step")
    print(f"ratio with / without: {with_grad / without:.2f}")


if __name__ == "__main__":
    main()
