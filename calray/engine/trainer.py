"""The one training loop. Single process by default; the Ray Train layer (calray.ray.distributed), the
sweep trials (calray.ray.trial) and the robustness retrains wrap it through `RunContext` instead of
copying it. What a method does to the loop lives in its plug-ins (calray.method.base lists the hooks).

Per step: forward; eq 21's base terms CE(p^f, y) and w_u·Σ_m CE(p^m, y), which each plug-in may
extend or edit (the AIB adds λ·L_AIB); backward; on an optimiser update the plug-ins edit the
accumulated gradient (eq 14, OGM-GE), then clip and step. The contribution monitor accumulates
statistics every step and turns them into W at each refresh, which the plug-ins read.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from calray.config import RunConfig
from calray.data.base import DatasetSplits, build_datasets, dataset_labels
from calray.data.indexed import WithIndex
from calray.dist import all_reduce_sum, assert_ranks_agree, barrier
from calray.engine.checkpoint import load_checkpoint, save_checkpoint
from calray.engine.contributions import ContributionMonitor
from calray.engine.evaluate import amp_autocast, embeddings_of, evaluate, to_device
from calray.engine.loaders import make_loader
from calray.engine.optim import adaptive_modulation_warnings, build_optimizer, build_scheduler
from calray.engine.resume import check_resumable
from calray.engine.runfiles import RunRecorder, seeds
from calray.engine.runinfo import rng_state, seed_everything, set_rng_state
from calray.errors import TrainingError
from calray.io import BEST_CHECKPOINT, CHECKPOINTS_DIR, LAST_CHECKPOINT
from calray.method.base import MethodContext, Step
from calray.method.plugins import create_methods, unimodal_logits_need_grad
from calray.models import build_model

Reporter = Callable[[dict, "Path | None"], None]
AIB_KL_EXPLODED = 1e6  # nats: an AIB KL above this at a non-finite loss is named in the error
CONTRIBUTION_KEYS = ("W", "D", "I", "phi", "R", "P", "kl")  # logged per modality after each refresh


@dataclass
class RunContext:
    """How a wrapper runs the loop: rank/world, device, DDP wrapping and per-epoch reporting.

    `reporter(metrics, checkpoint_path)` is called once per epoch on *every* rank (Ray's report is
    a barrier); `checkpoint_path` is the epoch's checkpoint file on rank 0 and None elsewhere.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    wrap_model: Callable[[nn.Module], nn.Module] | None = None
    reporter: Reporter | None = None
    resume_from: Path | None = None
    run_dir: Path | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"runtime.device: {spec!r} requested but CUDA is not available")
    return dev


def add_all(tensors):
    """t1 + t2 + …: builtins.sum would start with 0 + t1, one more kernel per call."""
    return functools.reduce(operator.add, tensors)


class TermSums:
    """Σ over an epoch's steps of (logged loss term × batch size), in float64; the per-step tensors
    are kept and stacked every FLUSH steps instead of adding three small kernels to every step."""

    FLUSH = 64

    def __init__(self):
        self.names: list[str] = []
        self._pending: list[tuple[list, int]] = []
        self._sums: torch.Tensor | None = None

    def add(self, log: dict, n: int) -> None:
        self.names = list(log)
        self._pending.append((list(log.values()), n))
        if len(self._pending) >= self.FLUSH:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            values = torch.stack([torch.stack(v) for v, _ in self._pending]).double()
            weights = torch.tensor([n for _, n in self._pending], dtype=torch.float64, device=values.device)
            batch = (values * weights[:, None]).sum(0)
            self._sums = batch if self._sums is None else self._sums + batch
            self._pending = []

    def total(self) -> torch.Tensor:
        self._flush()
        return self._sums


class LossGuard:
    """Stops on a non-finite loss (`check((loss, logged terms, epoch, step))`), naming epoch, step and
    the terms. On CUDA the check of step t runs at step t+1 (`check(None)` at the epoch's end), so
    the host never waits for the device mid-epoch; on CPU reading the loss costs nothing."""

    def __init__(self, deferred: bool):
        self.deferred = deferred
        self._unchecked = None  # the previous step's (finite flag, pending) on CUDA

    def check(self, pending) -> None:
        if self.deferred:
            flagged = None if pending is None else (torch.isfinite(pending[0]), pending)
            flagged, self._unchecked = self._unchecked, flagged
            if flagged is None or bool(flagged[0]):
                return
            pending = flagged[1]
        elif pending is None or math.isfinite(float(pending[0])):
            return
        loss, parts, epoch, step = pending
        raise nonfinite_loss_error(float(loss), parts, epoch, step)


def nonfinite_loss_error(loss: float, parts: dict, epoch: int, step: int) -> TrainingError:
    exploded = [k[len("aib_kl_"):] for k, v in parts.items() if k.startswith("aib_kl_") and not float(v) < AIB_KL_EXPLODED]
    hint = "lower optim.lr or enable optim.grad_clip"
    if exploded:  # β_m ≈ 0 leaves modality m's latent uncompressed (eq 19 placement)
        hint = (f"the AIB latent of {', '.join(exploded)} diverged (KL unbounded): {hint}, or soften β "
                f"with a smaller method.beta_T (β_m ≈ 0 removes eq 19's compression of m)")
    return TrainingError(f"non-finite loss ({loss}) at epoch {epoch}, step {step} "
                         f"({', '.join(f'{k}={float(v):.4g}' for k, v in parts.items())}); {hint}")


def progress_bar(loader, total: int, desc: str, enabled: bool):
    """The training loader, wrapped in a tqdm bar when `enabled` (runtime.progress, rank 0)."""
    if not enabled:
        return loader
    from tqdm import tqdm  # optional dependency, only for an interactive progress bar

    return tqdm(loader, total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


def epoch_line(row: dict, modalities: list[str], epochs: int) -> str:
    """The console line of one epoch's metrics row."""
    mods = " ".join(f"{m}:{row.get(f'val_acc_{m}', 0):.3f}/a={row.get(f'a_{m}', 0):.2f}" for m in modalities)
    return (f"epoch {row['epoch'] + 1}/{epochs} train_loss {row['train_loss']:.4f} "
            f"train_acc {row.get('train_acc', float('nan')):.4f} val_acc {row['val_acc']:.4f} [{mods}] {row['time_s']:.1f}s")


class Trainer:
    def __init__(self, cfg: RunConfig, ctx: RunContext | None = None, splits: DatasetSplits | None = None):
        self.cfg, self.ctx = cfg, ctx or RunContext()
        self.device = self.ctx.device or resolve_device(cfg.runtime.device)
        self.run_dir = Path(self.ctx.run_dir or cfg.run_dir())
        self.ckpt_dir = self.run_dir / CHECKPOINTS_DIR
        self.recorder = RunRecorder(self.run_dir, cfg, self.ctx.is_main)
        seed_everything(cfg.runtime.seed)
        self.splits = splits or build_datasets(cfg)
        self.modalities = self.splits.modalities
        self.cuda = self.device.type == "cuda"
        self.amp = self.cuda and cfg.runtime.amp
        self.channels_last = self.cuda and cfg.runtime.channels_last

        torch.manual_seed(cfg.runtime.seed)  # model init independent of dataset construction
        model = build_model(cfg, self.splits).to(self.device)
        model.unimodal_grad = unimodal_logits_need_grad(cfg)  # before DDP's probe of unused parameters
        self.raw_model = model.to(memory_format=torch.channels_last) if self.channels_last else model
        self.model = self.ctx.wrap_model(self.raw_model) if self.ctx.wrap_model else self.raw_model
        self.optimizer = build_optimizer(cfg.optim, self.raw_model, self.modalities)
        self.warnings = adaptive_modulation_warnings(cfg, self.modalities)  # env.json and the log, once

        counts = torch.bincount(torch.as_tensor(dataset_labels(self.splits.train)), minlength=self.splits.num_classes)
        context = MethodContext(seed=cfg.runtime.seed, train_class_counts=counts.tolist(),
                                num_classes=self.splits.num_classes, embeddings=self.split_embeddings)
        self.methods = create_methods(cfg, self.modalities, context)
        self.strategy, self.aib = self.methods[0], self.methods[-1]
        self.own_backward = any(getattr(method, "own_backward", False) for method in self.methods)  # base.py
        self.monitor = ContributionMonitor(cfg, self.modalities, self.raw_model.fusion, self.splits.num_classes,
                                           self.device)
        self.last_contrib: dict = {}

        needs_index = any(getattr(method, "needs_sample_index", False) for method in self.methods)
        self.train_loader = self._loader(WithIndex(self.splits.train) if needs_index else self.splits.train, train=True)
        self.val_loader = self._loader(self.splits.val, train=False)
        self.test_loader = self._loader(self.splits.test, train=False)
        self._train_eval_loader: DataLoader | None = None  # _split_loader("train"), built on first use
        context.steps_per_epoch = self.batches_per_epoch()  # MLA's per-epoch projector schedule
        # after the loaders: a per-update schedule needs the number of updates
        self.per_update_scheduler = cfg.optim.scheduler == "linear_warmup"
        self.scheduler = build_scheduler(cfg.optim, self.optimizer, self.total_updates())

        self.parts = TermSums()  # per-epoch sums of the logged loss terms (train_step)
        self.guard = LossGuard(self.cuda)
        self.start_epoch, self.started_at = 0, None  # started_at: unix time fit() began (summary.json)
        self.best_val, self.best_epoch, self.epochs_since_best = -math.inf, -1, 0

    # ------------------------------------------------------------------ data

    def batches_per_epoch(self) -> int:
        """Training batches one epoch runs: the loader's length, capped by max_steps_per_epoch."""
        limit = self.cfg.runtime.max_steps_per_epoch
        return min(len(self.train_loader), limit or len(self.train_loader))

    def updates_per_epoch(self) -> int:
        """optimizer.step() calls per epoch: every grad_accum batches, plus one for a partial
        accumulation at the epoch's end (train_epoch's `update` rule)."""
        return math.ceil(self.batches_per_epoch() / self.cfg.optim.grad_accum)

    def total_updates(self) -> int:
        """U: optimizer updates over all optim.epochs (early stopping may end a run before)."""
        return self.updates_per_epoch() * self.cfg.optim.epochs

    def _loader(self, dataset, train: bool) -> DataLoader:
        return make_loader(dataset, self.cfg.data, train=train, seed=self.cfg.runtime.seed, rank=self.ctx.rank,
                           world_size=self.ctx.world_size, pin_memory=self.cuda)

    # ------------------------------------------------------------------ one step

    def _forward_loss(self, inputs, labels, epoch: int, step: int, indices=None):
        m = self.cfg.method
        with amp_autocast(self.amp):
            out = self.model(inputs, ablation=m.phi_ablation if self.monitor.enabled else None)
        ce = {k: F.cross_entropy(v.float(), labels) for k, v in out.unimodal_logits.items()}
        loss_fused = F.cross_entropy(out.fused_logits.float(), labels)
        ce_sum = add_all(ce.values())
        s = Step(epoch, step, labels, out, ce, log={"loss_fused": loss_fused.detach(), "loss_unimodal": ce_sum.detach()},
                 indices=indices)
        w = m.unimodal_weight  # a weight of 1 adds no multiply (and its backward) to every step
        terms = {"fused": loss_fused, "unimodal": ce_sum if w == 1.0 else w * ce_sum}  # eq 21's base
        for method in self.methods:
            terms = method.loss_terms(s, terms)
        return s, terms

    def refresh_contributions(self, end_of_epoch: bool) -> dict:
        """W from the all-reduced statistics; the plug-ins react (a, β); returns the flat log row."""
        c = self.monitor.refresh(end_of_epoch)
        if c is None:
            return {}
        values = {key: getattr(c, key) for key in CONTRIBUTION_KEYS}
        for method in self.methods:
            values.update(method.on_contributions(c.W))
        if self.cfg.distributed.check_consistency:
            assert_ranks_agree({k: v for k, v in values.items() if k in ("W", "a", "beta")}, self.device)
        self.last_contrib = {f"{key}_{mod}": v for key, per_mod in values.items() for mod, v in per_mod.items()}
        return self.last_contrib

    def train_step(self, inputs, labels, epoch: int, step: int, update: bool = True, indices=None) -> torch.Tensor:
        """Forward and backward on a device-resident batch; with `update`, also let the plug-ins edit
        the gradient, clip and step (otherwise the gradient accumulates: `optim.grad_accum`)."""
        # DDP syncs only on the update, and never for a plug-in that synchronises its own gradients
        accumulating = (not update or self.own_backward) and hasattr(self.model, "no_sync")
        with self.model.no_sync() if accumulating else contextlib.nullcontext():
            s, terms = self._forward_loss(inputs, labels, epoch, step, indices)
            loss = add_all(terms.values())
            self.guard.check((loss.detach(), s.log, epoch, step))
            accum = self.cfg.optim.grad_accum
            scaled = terms if accum == 1 else {k: v / accum for k, v in terms.items()}
            if not any(method.backward(scaled, self.model) for method in self.methods):
                (loss if accum == 1 else add_all(scaled.values())).backward()
        self.parts.add(s.log, len(labels))
        if update:
            for method in self.methods:  # eq 14 is linear: scaling the accumulated sum = scaling each part
                method.after_backward(self.raw_model, s)
            self.raw_model.drop_frozen_gradients(epoch)  # the fusion's freeze schedule (MMBT), after the plug-ins
            if self.cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.optim.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.per_update_scheduler:
                self.scheduler.step()
        self.monitor.update(s.out, labels)
        return loss.detach()

    def train_epoch(self, epoch: int) -> dict:
        cfg = self.cfg
        self.model.train()
        self.train_loader.sampler.set_epoch(epoch)
        self.monitor.start_epoch()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.parts, seen = TermSums(), 0
        total, accum = self.batches_per_epoch(), cfg.optim.grad_accum
        bar = progress_bar(self.train_loader, total, f"epoch {epoch + 1}/{cfg.optim.epochs}",
                           cfg.runtime.progress and self.ctx.is_main)
        self.optimizer.zero_grad(set_to_none=True)
        for step, (inputs, labels, *index) in enumerate(bar):  # index: Method.needs_sample_index
            if step >= total:
                break
            inputs = to_device(inputs, self.device, self.channels_last)
            labels = labels.to(self.device, non_blocking=True)
            update = (step + 1) % accum == 0 or step + 1 == total  # an epoch's tail updates too
            loss = self.train_step(inputs, labels, epoch, step, update=update, indices=index[0] if index else None)
            loss_sum += loss * len(labels)
            seen += len(labels)
            if cfg.method.update_every and (step + 1) % cfg.method.update_every == 0:
                self.refresh_contributions(end_of_epoch=False)
            if hasattr(bar, "set_postfix") and step % 10 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}")
        if self.cuda:
            self.guard.check(None)  # the last step's deferred check
        contrib = self.refresh_contributions(end_of_epoch=True)
        n_seen = float(all_reduce_sum(torch.tensor(float(seen), dtype=torch.float64, device=self.device)))
        row = {"train_loss": float(all_reduce_sum(loss_sum)) / max(n_seen, 1.0), "train_samples": int(n_seen)}
        if self.parts.names:  # epoch means of the loss terms: train_loss_fused, train_aib_kl_<m>, ...
            sums = all_reduce_sum(self.parts.total())
            row.update({f"train_{k}": float(v) / max(n_seen, 1.0) for k, v in zip(self.parts.names, sums)})
        row.update(self.monitor.train_accuracy())
        row.update(contrib)
        return row

    def evaluate(self, loader: DataLoader) -> dict:
        return evaluate(self.model, loader, self.modalities, self.splits.num_classes, self.device, self.amp,
                        self.channels_last)

    def _split_loader(self, split: str) -> DataLoader:
        """The evaluation loader of a split; for "train" an unshuffled, unpadded one (built once)."""
        if split == "train":
            if self._train_eval_loader is None:
                self._train_eval_loader = self._loader(self.splits.train, train=False)
            return self._train_eval_loader
        return {"val": self.val_loader, "test": self.test_loader}[split]

    def evaluate_split(self, split: str) -> dict:
        """For plug-ins' epoch-end hooks (held-out estimates); the model is back in train mode after."""
        metrics = self.evaluate(self._split_loader(split))
        self.model.train()
        return metrics

    def split_embeddings(self, split: str):
        """MethodContext.embeddings: this rank's shard of a split through the raw model (no DDP
        collectives), in eval mode; the model is back in train mode after."""
        out = embeddings_of(self.raw_model, self._split_loader(split), self.device, self.amp, self.channels_last)
        self.raw_model.train()
        return out

    # ------------------------------------------------------------------ checkpoints

    def _state(self, epoch: int) -> dict:
        return {"epoch": epoch, "model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "tracker": self.monitor.tracker.state_dict(),
                "methods": [method.state_dict() for method in self.methods],
                "best_val": self.best_val, "best_epoch": self.best_epoch, "epochs_since_best": self.epochs_since_best,
                "last_contrib": dict(self.last_contrib), "rng": rng_state()}

    def save_checkpoint(self, epoch: int) -> Path:
        path = self.ckpt_dir / LAST_CHECKPOINT
        save_checkpoint(self._state(epoch), path)
        return path

    def load_checkpoint(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        self.monitor.tracker.load_state_dict(state["tracker"])
        for method, s in zip(self.methods, state["methods"]):
            method.load_state_dict(s)
        self.best_val, self.best_epoch = state["best_val"], state["best_epoch"]
        self.epochs_since_best = state["epochs_since_best"]
        self.last_contrib = dict(state["last_contrib"])
        set_rng_state(state["rng"])
        self.start_epoch = state["epoch"] + 1

    # ------------------------------------------------------------------ the run

    def _log(self, msg: str) -> None:
        if self.ctx.is_main:
            print(msg, flush=True)

    def _start(self) -> None:
        """Resume when allowed (calray.engine.resume: same config), write the run files."""
        cfg = self.cfg
        if cfg.runtime.resume:  # before anything is written: a different config never reuses this dir
            check_resumable(self.run_dir, cfg.to_dict())
        resume_path = self.ctx.resume_from
        if resume_path is None and cfg.runtime.resume and (self.ckpt_dir / LAST_CHECKPOINT).is_file():
            resume_path = self.ckpt_dir / LAST_CHECKPOINT
        if resume_path is not None:
            self.load_checkpoint(Path(resume_path))
            self._log(f"resumed from {resume_path} at epoch {self.start_epoch}")
        self.recorder.start(self.device, self.splits, self.warnings, self.start_epoch)
        for w in self.warnings if self.ctx.is_main else []:
            print(f"warning: {w}", file=sys.stderr, flush=True)

    def run_epoch(self, epoch: int) -> tuple[dict, bool]:
        """Train, validate, select on validation, schedule, checkpoint and report one epoch."""
        t0 = time.time()
        row = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}
        if self.cfg.optim.per_modality:
            row.update({f"lr_{g}": lr for g, lr in self.optimizer.group_lrs().items()})
        row.update(self.train_epoch(epoch))
        row["train_time_s"] = time.time() - t0  # training alone: samples/s without evaluation
        for method in self.methods:
            row.update(method.on_epoch_end(self.raw_model, epoch, self.evaluate_split))
        val = self.evaluate(self.val_loader)
        row.update({f"val_{k}": v for k, v in val.items()})
        improved = val["acc"] > self.best_val
        if improved:
            self.best_val, self.best_epoch, self.epochs_since_best = val["acc"], epoch, 0
        else:
            self.epochs_since_best += 1
        if self.scheduler is not None and not self.per_update_scheduler:  # per update: train_step
            self.scheduler.step(val["acc"])
        row["best_val_acc"], row["time_s"] = self.best_val, time.time() - t0
        patience = self.cfg.optim.early_stop_patience
        stopped_early = patience is not None and self.epochs_since_best >= patience
        ckpt = None
        if self.ctx.is_main:
            if improved:
                save_checkpoint({"model": self.raw_model.state_dict(), "epoch": epoch}, self.ckpt_dir / BEST_CHECKPOINT)
            if (epoch + 1) % self.cfg.runtime.checkpoint_every == 0 or epoch == self.cfg.optim.epochs - 1 or stopped_early:
                ckpt = self.save_checkpoint(epoch)
        self.recorder.epoch(row)
        self._log(epoch_line(row, self.modalities, self.cfg.optim.epochs))
        if self.ctx.reporter is not None:
            self.ctx.reporter(row, ckpt)
        if stopped_early:
            self._log(f"early stop: no val improvement for {patience} epochs")
        return row, stopped_early

    def fit(self) -> dict:
        self._start()
        t_start = self.started_at = time.time()
        stopped_early, epoch = False, self.start_epoch - 1
        for epoch in range(self.start_epoch, self.cfg.optim.epochs):
            _, stopped_early = self.run_epoch(epoch)
            if stopped_early:
                break
        return self.finish(time.time() - t_start, stopped_early, epoch + 1)

    def finish(self, duration: float, stopped_early: bool, epochs_run: int) -> dict:
        """Test with the best-on-validation weights (never select on test) and write summary.json."""
        best_path = self.ckpt_dir / BEST_CHECKPOINT
        barrier()
        if best_path.is_file():
            self.raw_model.load_state_dict(load_checkpoint(best_path, map_location=self.device)["model"])
        test = self.evaluate(self.test_loader)
        summary = {"name": self.cfg.name, "run_dir": str(self.run_dir), "best_epoch": self.best_epoch,
                   "best_val_acc": self.best_val, "test": test, "test_acc": test["acc"], "epochs_run": epochs_run,
                   "stopped_early": stopped_early, "duration_s": duration,
                   "started_at": self.started_at,  # with finished_at: how concurrent trials packed
                   "finished_at": time.time(), "modalities": self.modalities, "num_classes": self.splits.num_classes,
                   "contributions": self.last_contrib, "seeds": seeds(self.cfg)}
        self.recorder.finish(summary)
        mods = " ".join(f"{m} {test[f'acc_{m}']:.4f}" for m in self.modalities)
        self._log(f"test (best val epoch {self.best_epoch + 1}): acc {test['acc']:.4f} "
                  f"macro_f1 {test['macro_f1']:.4f} | unimodal: {mods} | run dir {self.run_dir}")
        return summary


def train(cfg: RunConfig, ctx: RunContext | None = None, splits: DatasetSplits | None = None) -> dict:
    """Run one configuration to the end and return its summary (also in run_dir/summary.json)."""
    return Trainer(cfg, ctx, splits).fit()
