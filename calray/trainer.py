"""The one training loop. Single process by default; the Ray Train layer (calray.distributed) and
the sweep layer (calray.sweep) wrap it through `RunContext` instead of copying it.

Per step (eq 21): L = CE(p^f, y) + w_u·Σ_m CE(p^m, y) + λ·L_AIB; after backward the modulation
strategy rescales each modality's gradients (eq 14). Contribution statistics accumulate during
the epoch and are turned into W, a and β at each refresh (epoch end by default).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from calray.aib import aib_loss, aib_weights, compression_factors, kl_to_standard_normal, label_entropy
from calray.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint, write_json
from calray.config import RunConfig, save_config
from calray.contribution import ContributionStats, ContributionTracker
from calray.data.base import DatasetSplits, build_datasets, dataset_labels
from calray.data.batched import batched_loader
from calray.errors import TrainingError
from calray.metrics import EvalStats
from calray.models import MultimodalModel, build_model
from calray.optim import adaptive_modulation_warnings, build_optimizer, build_scheduler
from calray.modulation import GradientModulator, contribution_softmax
from calray.resume import check_resumable
from calray.runinfo import environment, rng_state, seed_everything, set_rng_state
from calray.sampling import ShardedSampler

Reporter = Callable[[dict, "Path | None"], None]
STATS_FLUSH_EVERY = 16  # contribution statistics are accumulated in batches of this many steps
AIB_KL_EXPLODED = 1e6  # nats: an AIB KL above this at a non-finite loss is named in the error


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


def to_device(x, device: torch.device, channels_last: bool = False):
    if isinstance(x, dict):
        return {k: to_device(v, device, channels_last) for k, v in x.items()}
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4 and x.is_floating_point():
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def unwrap(model: nn.Module) -> MultimodalModel:
    return model.module if hasattr(model, "module") else model


class Trainer:
    def __init__(self, cfg: RunConfig, ctx: RunContext | None = None, splits: DatasetSplits | None = None):
        self.cfg = cfg
        self.ctx = ctx or RunContext()
        self.device = self.ctx.device or resolve_device(cfg.runtime.device)
        self.run_dir = Path(self.ctx.run_dir or cfg.run_dir())
        self.ckpt_dir = self.run_dir / "checkpoints"
        seed_everything(cfg.runtime.seed)
        self.splits = splits or build_datasets(cfg)
        self.modalities = self.splits.modalities
        self.cuda = self.device.type == "cuda"
        self.amp = self.cuda and cfg.runtime.amp
        self.channels_last = self.cuda and cfg.runtime.channels_last

        torch.manual_seed(cfg.runtime.seed)  # model init independent of dataset construction
        model = build_model(cfg, self.splits).to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.raw_model = model
        self.model = self.ctx.wrap_model(model) if self.ctx.wrap_model else model
        self.optimizer = build_optimizer(cfg.optim, self.raw_model, self.modalities)
        self.warnings = adaptive_modulation_warnings(cfg, self.modalities)  # env.json and the log, once

        m = cfg.method
        self.tracker = ContributionTracker(self.modalities, m.contribution, m.n, m.mi_shrinkage)
        self.modulator = GradientModulator(m, self.modalities, seed=cfg.runtime.seed)
        self.a_aib = {k: 1.0 / len(self.modalities) for k in self.modalities}  # uniform until the first refresh
        self.beta = compression_factors(self.a_aib)
        self.last_contrib: dict = {}
        counts = torch.bincount(torch.as_tensor(dataset_labels(self.splits.train)), minlength=self.splits.num_classes)
        self.h_y = label_entropy(counts)
        self.track = m.track_contributions
        self.window, self.epoch_stats = self._new_stats(), self._new_stats()

        self.train_loader = self._loader(self.splits.train, train=True)
        self.val_loader = self._loader(self.splits.val, train=False)
        self.test_loader = self._loader(self.splits.test, train=False)
        # after the loaders: a per-update schedule needs the number of updates
        self.per_update_scheduler = cfg.optim.scheduler == "linear_warmup"
        self.scheduler = build_scheduler(cfg.optim, self.optimizer, self.total_updates())

        self.part_sums: torch.Tensor | None = None  # per-epoch sums of the loss terms (train_epoch)
        self.part_names: list[str] = []
        self.start_epoch = 0
        self.started_at: float | None = None  # unix time fit() began (summary.json)
        self.best_val = -math.inf
        self.best_epoch = -1
        self.epochs_since_best = 0

    # ------------------------------------------------------------------ construction

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

    def _new_stats(self) -> ContributionStats:
        fusion = self.raw_model.fusion
        if self.cfg.method.contribution_space == "logits":
            k = self.splits.num_classes
            dims, fused = {m: k for m in self.modalities}, k
        else:
            dims = dict(fusion.dims)
            with torch.no_grad():
                zeros = {m: torch.zeros(1, d, device=self.device) for m, d in fusion.dims.items()}
                fused = int(fusion(zeros)[0].shape[1])
        return ContributionStats(self.modalities, dims, fused, device=self.device, flush_every=STATS_FLUSH_EVERY)

    def _loader(self, dataset, train: bool) -> DataLoader:
        d = self.cfg.data
        sampler = ShardedSampler(len(dataset), shuffle=train, seed=self.cfg.runtime.seed,
                                 rank=self.ctx.rank, world_size=self.ctx.world_size, pad=train)
        workers = d.num_workers
        batch_size = d.batch_size if train else (d.eval_batch_size or d.batch_size)
        options = {"num_workers": workers, "pin_memory": self.cuda, "persistent_workers": workers > 0}
        whole = batched_loader(dataset, sampler, batch_size, **options)  # in-memory datasets
        if whole is not None:
            return whole
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False, **options)

    # ------------------------------------------------------------------ one step

    def _forward_loss(self, inputs, labels):
        m = self.cfg.method
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(inputs, ablation=m.phi_ablation if self.track else None)
        ce = {k: F.cross_entropy(v.float(), labels) for k, v in out.unimodal_logits.items()}
        loss_fused = F.cross_entropy(out.fused_logits.float(), labels)
        loss = loss_fused + m.unimodal_weight * sum(ce.values())
        parts = {"loss_fused": loss_fused.detach(), "loss_unimodal": sum(ce.values()).detach()}
        if out.mu:
            kl = {k: kl_to_standard_normal(out.mu[k].float(), out.logvar[k].float()) for k in out.mu}
            l_aib = aib_loss(kl, ce, self.h_y, aib_weights(self.a_aib, m.aib), m.aib_placement)
            loss = loss + m.lambda_ * l_aib
            parts["loss_aib"] = l_aib.detach()
            parts.update({f"aib_kl_{k}": v.detach() for k, v in kl.items()})  # who is compressed
        return out, loss, parts

    def _reps(self, out):
        if self.cfg.method.contribution_space == "logits":
            return out.unimodal_logits, out.fused_logits
        return out.embeddings, out.fused_repr

    def refresh_contributions(self, end_of_epoch: bool) -> dict:
        """All-reduce the window's sums, then compute W, a and β from the global sums."""
        if not self.track:
            return {}
        self.window.all_reduce()
        self.epoch_stats.merge(self.window)
        stats = self.epoch_stats if end_of_epoch else self.window
        c = self.tracker.compute(stats, end_of_epoch)
        a = self.modulator.refresh(c.W)
        m = self.cfg.method
        self.a_aib = contribution_softmax(c.W, m.T if m.beta_T is None else m.beta_T)
        self.beta = compression_factors(self.a_aib)
        if self.cfg.distributed.check_consistency:
            from calray.distributed import assert_ranks_agree

            assert_ranks_agree({"W": c.W, "a": a, "beta": self.beta}, self.device)
        self.window.reset()
        flat = {}
        for key, per_mod in (("W", c.W), ("D", c.D), ("I", c.I), ("phi", c.phi), ("R", c.R), ("P", c.P),
                             ("kl", c.kl), ("a", a), ("beta", self.beta)):
            for mod, v in per_mod.items():
                flat[f"{key}_{mod}"] = v
        self.last_contrib = flat
        return flat

    def train_step(self, inputs, labels, epoch: int, step: int, update: bool = True) -> torch.Tensor:
        """Forward and backward on a device-resident batch; with `update`, also modulate, clip and
        step (otherwise the gradient accumulates: `optim.grad_accum`). Returns the detached loss."""
        accumulating = not update and hasattr(self.model, "no_sync")  # DDP: sync only on the update
        with self.model.no_sync() if accumulating else contextlib.nullcontext():
            out, loss, parts = self._forward_loss(inputs, labels)
            self._check_finite((torch.isfinite(loss.detach()), loss.detach(), parts, epoch, step))
            (loss / self.cfg.optim.grad_accum).backward()
        part_values = torch.stack(list(parts.values())) * len(labels)
        self.part_sums = part_values if self.part_sums is None else self.part_sums + part_values
        self.part_names = list(parts)
        if update:
            # eq 14 is linear in the gradient, so scaling the accumulated sum = scaling each part
            self.modulator.apply(self.raw_model, epoch, out.unimodal_logits, labels)
            if self.cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.optim.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.per_update_scheduler:
                self.scheduler.step()
        if self.track:
            reps, fused_rep = self._reps(out)
            self.window.update(labels, out.fused_logits, out.unimodal_logits, out.ablated_logits, reps, fused_rep)
        return loss.detach()

    def _check_finite(self, pending) -> None:
        """Stop on a non-finite loss, naming epoch and step. On CUDA the check of step t runs at
        step t+1 (or at the epoch's end), so the host never waits for the device mid-epoch."""
        if self.cuda:
            pending, self._unchecked = getattr(self, "_unchecked", None), pending
        if pending is None:
            return
        finite, loss, parts, epoch, step = pending
        if not bool(finite):
            exploded = [k[len("aib_kl_"):] for k, v in parts.items()
                        if k.startswith("aib_kl_") and not float(v) < AIB_KL_EXPLODED]
            hint = "lower optim.lr or enable optim.grad_clip"
            if exploded:  # β_m ≈ 0 leaves modality m's latent uncompressed (eq 19 placement)
                hint = (f"the AIB latent of {', '.join(exploded)} diverged (KL unbounded): {hint}, or soften β "
                        f"with a smaller method.beta_T (β_m ≈ 0 removes eq 19's compression of m)")
            raise TrainingError(
                f"non-finite loss ({float(loss)}) at epoch {epoch}, step {step} "
                f"({', '.join(f'{k}={float(v):.4g}' for k, v in parts.items())}); {hint}")

    def train_epoch(self, epoch: int) -> dict:
        cfg = self.cfg
        self.model.train()
        self.train_loader.sampler.set_epoch(epoch)
        self.window.reset()
        self.epoch_stats.reset()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.part_sums, self.part_names = None, []
        seen = 0
        limit = cfg.runtime.max_steps_per_epoch
        total = self.batches_per_epoch()
        bar = self._progress(self.train_loader, total, f"epoch {epoch + 1}/{cfg.optim.epochs}")
        accum = cfg.optim.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        for step, (inputs, labels) in enumerate(bar):
            if limit is not None and step >= limit:
                break
            inputs = to_device(inputs, self.device, self.channels_last)
            labels = labels.to(self.device, non_blocking=True)
            update = (step + 1) % accum == 0 or step + 1 == total  # an epoch's tail updates too
            loss = self.train_step(inputs, labels, epoch, step, update=update)
            loss_sum += loss * len(labels)
            seen += len(labels)
            if cfg.method.update_every and (step + 1) % cfg.method.update_every == 0:
                self.refresh_contributions(end_of_epoch=False)
            if hasattr(bar, "set_postfix") and step % 10 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}")
        if self.cuda:
            self._check_finite(None)  # the last step's deferred check
        contrib = self.refresh_contributions(end_of_epoch=True)
        stats = self.epoch_stats
        n_seen = self._all_reduce_scalar(torch.tensor(float(seen), dtype=torch.float64, device=self.device))
        row = {"train_loss": self._all_reduce_scalar(loss_sum) / max(n_seen, 1.0), "train_samples": int(n_seen)}
        if self.part_sums is not None:  # epoch means of the loss terms: train_loss_fused, train_aib_kl_<m>, ...
            sums = self._all_reduce_tensor(self.part_sums.double())
            row.update({f"train_{k}": float(v) / max(n_seen, 1.0) for k, v in zip(self.part_names, sums)})
        if self.track:
            row["train_acc"] = stats.fused_accuracy()
            row.update({f"train_acc_{m}": v for m, v in stats.unimodal_accuracy().items()})
        row.update(contrib)
        return row

    def _all_reduce_tensor(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def _all_reduce_scalar(self, t: torch.Tensor) -> float:
        return float(self._all_reduce_tensor(t))

    @torch.no_grad()
    def evaluate(self, loader: DataLoader) -> dict:
        self.model.eval()
        stats = EvalStats(self.modalities, self.splits.num_classes, self.device)
        for inputs, labels in loader:
            inputs = to_device(inputs, self.device, self.channels_last)
            labels = labels.to(self.device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                out = self.model(inputs)
            loss = F.cross_entropy(out.fused_logits.float(), labels, reduction="sum")
            stats.update(labels, out.fused_logits, out.unimodal_logits, float(loss))
        return stats.all_reduce().metrics()

    def _progress(self, loader, total: int, desc: str):
        if not (self.cfg.runtime.progress and self.ctx.is_main):
            return loader
        try:
            from tqdm import tqdm
        except ImportError:
            return loader
        return tqdm(loader, total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)

    # ------------------------------------------------------------------ checkpoints

    def _state(self, epoch: int) -> dict:
        return {
            "epoch": epoch,
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "tracker": self.tracker.state_dict(),
            "modulator": self.modulator.state_dict(),
            "a_aib": dict(self.a_aib),
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "epochs_since_best": self.epochs_since_best,
            "last_contrib": dict(self.last_contrib),
            "rng": rng_state(),
        }

    def save_checkpoint(self, epoch: int) -> Path:
        path = self.ckpt_dir / "last.pt"
        save_checkpoint(self._state(epoch), path)
        return path

    def load_checkpoint(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        self.tracker.load_state_dict(state["tracker"])
        self.modulator.load_state_dict(state["modulator"])
        self.a_aib = dict(state["a_aib"])
        self.beta = compression_factors(self.a_aib)
        self.best_val, self.best_epoch = state["best_val"], state["best_epoch"]
        self.epochs_since_best = state["epochs_since_best"]
        self.last_contrib = dict(state["last_contrib"])
        set_rng_state(state["rng"])
        self.start_epoch = state["epoch"] + 1

    def _truncate_metrics(self, keep_before: int) -> None:
        """Drop metric rows from epochs that will be re-run, so a resumed history has no repeats."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if r.get("epoch", -1) < keep_before]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    # ------------------------------------------------------------------ the run

    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        write_json(self.run_dir / "env.json", {**environment(self.device), "seeds": {
            "runtime": self.cfg.runtime.seed, "data": self.cfg.data.seed, "noise": self.cfg.noise.seed},
            "warnings": self.warnings})
        info = {"dataset": self.cfg.data.dataset, "modalities": self.modalities,
                "num_classes": self.splits.num_classes, "class_names": self.splits.class_names,
                "sizes": {s: len(getattr(self.splits, s)) for s in ("train", "val", "test")}, **self.splits.info}
        write_json(self.run_dir / "data_info.json", info)

    def _log(self, msg: str) -> None:
        if self.ctx.is_main:
            print(msg, flush=True)

    def fit(self) -> dict:
        cfg = self.cfg
        if cfg.runtime.resume:  # before anything is written: a different config never reuses this dir
            check_resumable(self.run_dir, cfg.to_dict())
        resume_path = self.ctx.resume_from
        if resume_path is None and cfg.runtime.resume and (self.ckpt_dir / "last.pt").is_file():
            resume_path = self.ckpt_dir / "last.pt"
        if resume_path is not None:
            self.load_checkpoint(Path(resume_path))
            self._log(f"resumed from {resume_path} at epoch {self.start_epoch}")
        if self.ctx.is_main:
            self._write_run_files()
            self._truncate_metrics(self.start_epoch)
            for w in self.warnings:
                print(f"warning: {w}", file=sys.stderr, flush=True)
        t_start = self.started_at = time.time()
        stopped_early = False
        epoch = self.start_epoch - 1
        for epoch in range(self.start_epoch, cfg.optim.epochs):
            t0 = time.time()
            row = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}
            if cfg.optim.per_modality:
                row.update({f"lr_{g}": lr for g, lr in self.optimizer.group_lrs().items()})
            row.update(self.train_epoch(epoch))
            row["train_time_s"] = time.time() - t0  # training alone: samples/s without evaluation
            val = self.evaluate(self.val_loader)
            row.update({f"val_{k}": v for k, v in val.items()})
            improved = val["acc"] > self.best_val
            if improved:
                self.best_val, self.best_epoch, self.epochs_since_best = val["acc"], epoch, 0
            else:
                self.epochs_since_best += 1
            if self.scheduler is not None and not self.per_update_scheduler:  # per update: train_step
                self.scheduler.step(val["acc"])
            row["best_val_acc"] = self.best_val
            row["time_s"] = time.time() - t0
            patience = cfg.optim.early_stop_patience
            stopped_early = patience is not None and self.epochs_since_best >= patience
            ckpt = None
            if self.ctx.is_main:
                if improved:
                    save_checkpoint({"model": self.raw_model.state_dict(), "epoch": epoch},
                                    self.ckpt_dir / "best.pt")
                last = epoch == cfg.optim.epochs - 1 or stopped_early
                if (epoch + 1) % cfg.runtime.checkpoint_every == 0 or last:
                    ckpt = self.save_checkpoint(epoch)
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
            self._log(self._epoch_line(row))
            if self.ctx.reporter is not None:
                self.ctx.reporter(row, ckpt)
            if stopped_early:
                self._log(f"early stop: no val improvement for {patience} epochs")
                break
        return self.finish(time.time() - t_start, stopped_early, epoch + 1)

    def _epoch_line(self, row: dict) -> str:
        mods = " ".join(f"{m}:{row.get(f'val_acc_{m}', 0):.3f}/a={row.get(f'a_{m}', 0):.2f}" for m in self.modalities)
        return (f"epoch {row['epoch'] + 1}/{self.cfg.optim.epochs} train_loss {row['train_loss']:.4f} "
                f"train_acc {row.get('train_acc', float('nan')):.4f} val_acc {row['val_acc']:.4f} [{mods}] {row['time_s']:.1f}s")

    def finish(self, duration: float, stopped_early: bool, epochs_run: int) -> dict:
        """Test with the best-on-validation weights (never select on test) and write summary.json."""
        best_path = self.ckpt_dir / "best.pt"
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if best_path.is_file():
            self.raw_model.load_state_dict(load_checkpoint(best_path, map_location=self.device)["model"])
        test = self.evaluate(self.test_loader)
        summary = {
            "name": self.cfg.name,
            "run_dir": str(self.run_dir),
            "best_epoch": self.best_epoch,
            "best_val_acc": self.best_val,
            "test": test,
            "test_acc": test["acc"],
            "epochs_run": epochs_run,
            "stopped_early": stopped_early,
            "duration_s": duration,
            "started_at": self.started_at,  # with finished_at: how concurrent trials packed
            "finished_at": time.time(),
            "modalities": self.modalities,
            "num_classes": self.splits.num_classes,
            "contributions": self.last_contrib,
            "seeds": {"runtime": self.cfg.runtime.seed, "data": self.cfg.data.seed, "noise": self.cfg.noise.seed},
        }
        if self.ctx.is_main:
            write_json(self.run_dir / "summary.json", summary)
            mods = " ".join(f"{m} {test[f'acc_{m}']:.4f}" for m in self.modalities)
            self._log(f"test (best val epoch {self.best_epoch + 1}): acc {test['acc']:.4f} "
                      f"macro_f1 {test['macro_f1']:.4f} | unimodal: {mods} | run dir {self.run_dir}")
        return summary


def train(cfg: RunConfig, ctx: RunContext | None = None, splits: DatasetSplits | None = None) -> dict:
    """Run one configuration to the end and return its summary (also in run_dir/summary.json)."""
    return Trainer(cfg, ctx, splits).fit()
