"""The robustness grid's ``test`` mode (paper Table II, generalisation): a checkpoint evaluated on
the test split rebuilt under each noise setting (``noise.mode: test``), once per noise seed. The
model is loaded once per target; ε = 0 is the clean test set, so those rows equal the
checkpoint's plain test accuracy. No Trainer: the model, its checkpoint and
`calray.engine.evaluate.evaluate`."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from calray.config import RunConfig
from calray.data.base import build_datasets
from calray.engine.checkpoint import load_checkpoint
from calray.engine.evaluate import evaluate
from calray.engine.loaders import make_loader
from calray.engine.runinfo import seed_everything
from calray.engine.trainer import resolve_device
from calray.errors import CalrayError
from calray.io import BEST_CHECKPOINT, CHECKPOINTS_DIR
from calray.models import build_model
from calray.robustness.spec import GridSpec
from calray.robustness.tables import make_row
from calray.robustness.targets import Target, say, with_noise


class CheckpointEvaluator:
    """A checkpoint's model, loaded once, evaluated on test sets as the trainer's test pass does
    (`calray.engine.evaluate.evaluate` over an evaluation loader: every sample once, in order).

    `cfg` is the config the checkpoint was trained with; its splits give the model's shape. The
    seeds are set as the trainer sets them before building the datasets and the model.
    """

    def __init__(self, cfg: RunConfig, checkpoint: Path):
        self.cfg = cfg
        self.device = resolve_device(cfg.runtime.device)
        self.cuda = self.device.type == "cuda"
        self.amp = self.cuda and cfg.runtime.amp
        self.channels_last = self.cuda and cfg.runtime.channels_last
        seed_everything(cfg.runtime.seed)
        self.splits = build_datasets(cfg)
        torch.manual_seed(cfg.runtime.seed)
        model = build_model(cfg, self.splits).to(self.device)
        self.model = model.to(memory_format=torch.channels_last) if self.channels_last else model
        self.state = load_checkpoint(checkpoint, map_location=self.device)
        self.model.load_state_dict(self.state["model"])

    def evaluate(self, dataset) -> dict:
        """acc, macro_f1, loss, n and acc_<modality> over `dataset`."""
        loader = make_loader(dataset, self.cfg.data, train=False, seed=self.cfg.runtime.seed, pin_memory=self.cuda)
        return evaluate(self.model, loader, self.splits.modalities, self.splits.num_classes, self.device,
                        self.amp, self.channels_last)


def evaluate_test_grid(target: Target, spec: GridSpec) -> list[dict]:
    """Load the checkpoint once; evaluate it on the test split under every (kind, ε, noise seed)."""
    if target.checkpoint is None:
        raise CalrayError(f"{target.run_dir}: no checkpoint to evaluate "
                          f"(expected {CHECKPOINTS_DIR}/{BEST_CHECKPOINT})")
    base = target.config.model_copy(deep=True)
    base.runtime.progress = False
    evaluator = CheckpointEvaluator(with_noise(base, "none", 0.0, "test", base.noise.seed), target.checkpoint)
    t0 = time.time()
    clean = evaluator.evaluate(evaluator.splits.test)
    say(f"{target.cell}: test clean acc {clean['acc']:.4f} macro-F1 {clean['macro_f1']:.4f} "
         f"(checkpoint {target.checkpoint}, epoch {evaluator.state.get('epoch')})")
    rows = []
    settings = [(k, e, s) for k in spec.kinds for e in spec.eps for s in spec.noise_seed_list]
    for done, (kind, eps, seed) in enumerate(settings, 1):
        if eps == 0:
            metrics = clean
        else:
            metrics = evaluator.evaluate(build_datasets(with_noise(base, kind, eps, "test", seed)).test)
            say(f"{target.cell}: test {kind} eps={eps:g} noise seed {seed}: acc {metrics['acc']:.4f} "
                 f"macro-F1 {metrics['macro_f1']:.4f} [{done}/{len(settings)}]")
        rows.append(make_row(target, kind, eps, "test", seed, metrics, train_seed=target.config.runtime.seed,
                         noise_seed=None if eps == 0 else seed, source=str(target.checkpoint)))
    del evaluator
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    say(f"{target.cell}: test grid done in {time.time() - t0:.1f}s")
    return rows
