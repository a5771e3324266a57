"""Benchmark: a CAL training step vs a plain joint-training step, same model and batch (issue 8, target 1).

Both variants run the trainer's own `Trainer.train_step` on one device-resident batch; rounds
of the two are interleaved so drift (thermal, other load) hits both alike, and the script
prints the ratio of medians. Variants:
  plain    strategy none, AIB off, no contribution tracking (plain joint training + unimodal CE)
  cal      strategy cal (ablated fusion passes, moment accumulation, gradient scaling), AIB off
  cal_aib  strategy cal with the AIB heads and loss (adds parameters, so not the same model)
  pytorch  the peer a user would write by hand: the same model (MLP encoders, concat head), fused
           CE + each modality's sliced-head CE, torch.optim.SGD with calray's default settings and
           torch's default (per-tensor) kernels — no bookkeeping (MLP presets / run configs only)
  pytorch_fused  the same peer with SGD(fused=True), the kernels calray's loop uses: `plain` /
           `pytorch_fused` is calray's bookkeeping alone, `plain` / `pytorch` what a user gains or pays
  pytorch_aib  pytorch_fused plus the AIB as a user would write it: the same variational heads
           (z = μ + σ·ε), λ·Σ_m softplus(β_m·KL_m − (H(Y) − CE_m)) with β = ½ (eq 19 placement, no
           contribution tracking or modulation): `cal_aib` / `pytorch_aib` is CAL and calray's
           bookkeeping on an AIB model, the arithmetic and the eager kernels of the AIB paid by both

  python scripts/bench_step.py --preset mlp                  # CPU, small model
  python scripts/bench_step.py --preset cremad --device cuda # CREMA-D shapes, ResNet18 pair
  python scripts/bench_step.py --run-config configs/quickstart.yaml --variants plain
                                                             # a run config's model, data and batch

`--barrier DIR --barrier-n K` makes K copies started together time their rounds together
(scripts/bench_sweep.py uses it to measure the throughput ceiling of K concurrent processes).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calray.io import write_json  # noqa: E402
from calray.config import apply_overrides, config_from_dict, read_yaml  # noqa: E402
from calray.data.base import DatasetSplits  # noqa: E402
from calray.engine.runinfo import environment  # noqa: E402
from calray.engine.evaluate import to_device  # noqa: E402
from calray.engine.trainer import Trainer  # noqa: E402
from calray.models.encoders import MLPEncoder  # noqa: E402

PRESETS = {
    # name: (per-modality input shapes, encoders, classes, batch)
    "mlp": ({"audio": (64,), "visual": (64,)},
            {"audio": {"name": "mlp", "hidden": [256, 256]}, "visual": {"name": "mlp", "hidden": [256, 256]}}, 6, 64),
    "cremad-small": ({"audio": (1, 64, 48), "visual": (2, 3, 64, 64)},
                     {"audio": {"name": "resnet18", "in_channels": 1},
                      "visual": {"name": "resnet18", "in_channels": 3, "frames": True}}, 6, 16),
    "cremad": ({"audio": (1, 257, 188), "visual": (3, 3, 224, 224)},
               {"audio": {"name": "resnet18", "in_channels": 1},
                "visual": {"name": "resnet18", "in_channels": 3, "frames": True}}, 6, 64),
}
VARIANTS = {
    "pytorch": {"strategy": "none", "aib": "off", "track_contributions": False},  # model source for the peers
    "pytorch_fused": {"strategy": "none", "aib": "off", "track_contributions": False},
    "plain": {"strategy": "none", "aib": "off", "track_contributions": False},
    "cal": {"strategy": "cal", "aib": "off"},
    "cal_aib": {"strategy": "cal", "aib": "beta", "lambda": 0.1},
    "pytorch_aib": {"strategy": "cal", "aib": "beta", "lambda": 0.1},  # model source for the AIB peer
}
PEERS = ("pytorch", "pytorch_fused", "pytorch_aib")


class RandomInputs(Dataset):
    """Random inputs of fixed shapes: only used to size the model and the batch."""

    def __init__(self, shapes: dict, num_classes: int, n: int):
        g = torch.Generator().manual_seed(0)
        self.x = {m: torch.randn(n, *s, generator=g) for m, s in shapes.items()}
        self.labels = torch.randint(0, num_classes, (n,), generator=g).tolist()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {m: x[i] for m, x in self.x.items()}, self.labels[i]


class HandWrittenStep:
    """The plain PyTorch step of the same model: encoders → concat → Linear head; the loss is the fused
    CE plus, per modality, the CE of the head's slice for it (W[:, slice_m]·h_m + b, the values of
    calray's shared unimodal head); SGD(lr, momentum 0.9, weight decay 1e-4), calray's defaults."""

    def __init__(self, trainer: Trainer, fused: bool = False):
        src = trainer.raw_model
        self.device = trainer.device
        self.modalities = list(src.modalities)
        self.encoders = torch.nn.ModuleList(
            [torch.nn.Sequential(*[copy.deepcopy(layer) for layer in src.encoders[m].net]) for m in self.modalities])
        self.head = copy.deepcopy(src.fusion.head)
        self.dims = [src.fusion.dims[m] for m in self.modalities]
        # the AIB peer: the trainer's variational heads (Linear h → [μ, log σ²]) and H(Y) of its labels
        self.aib = torch.nn.ModuleList([copy.deepcopy(src.aib_heads[m].params) for m in self.modalities]
                                       if len(src.aib_heads) else [])
        self.h_y, self.lam = trainer.aib.h_y, trainer.cfg.method.lambda_
        params = [*self.encoders.parameters(), *self.head.parameters(), *self.aib.parameters()]
        o = trainer.cfg.optim
        self.opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, fused=fused)

    def train_step(self, inputs, labels, epoch: int, step: int) -> torch.Tensor:
        h = [enc(inputs[m].flatten(1)) for m, enc in zip(self.modalities, self.encoders)]
        kls = []
        for i, params in enumerate(self.aib):
            mu, logvar = params(h[i]).chunk(2, dim=1)
            logvar = logvar.clamp(-20.0, 20.0)
            h[i] = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            kls.append(0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).sum(dim=1).mean())
        loss = F.cross_entropy(self.head(torch.cat(h, dim=1)), labels)
        w, offset = self.head.weight, 0
        for i, (hm, d) in enumerate(zip(h, self.dims)):
            ce = F.cross_entropy(F.linear(hm, w[:, offset:offset + d], self.head.bias), labels)
            loss = loss + ce
            if self.aib:
                loss = loss + self.lam * F.softplus(0.5 * kls[i] - (self.h_y - ce))
            offset += d
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def variant_method(variant: str, latent_dim: int | None) -> dict:
    method = dict(VARIANTS[variant])
    if latent_dim and method.get("aib", "off") != "off":
        method["latent_dim"] = latent_dim
    return method


def make_trainer(preset: str, variant: str, device: str, amp: bool, tmp: Path,
                 latent_dim: int | None = None) -> Trainer:
    shapes, encoders, k, batch = PRESETS[preset]
    ds = RandomInputs(shapes, k, batch)
    splits = DatasetSplits(ds, ds, ds, list(shapes), k)
    cfg = config_from_dict({
        "name": f"bench_{variant}",
        "data": {"batch_size": batch},
        "model": {"encoders": encoders, "fusion": "concat"},
        "method": variant_method(variant, latent_dim),
        "optim": {"name": "sgd", "lr": 1e-3},
        "runtime": {"device": device, "amp": amp, "output_dir": str(tmp), "progress": False},
    }, "bench")
    return Trainer(cfg, splits=splits)


def make_trainer_from_config(path: Path, variant: str, device: str, amp: bool, tmp: Path,
                             latent_dim: int | None = None) -> Trainer:
    """The run config's own dataset, model and batch size; the variant sets the method."""
    tree = read_yaml(path)
    overrides = {f"method.{k}": v for k, v in variant_method(variant, latent_dim).items()}
    overrides.update({"runtime.device": device, "runtime.amp": amp, "runtime.output_dir": str(tmp),
                      "runtime.progress": False, "name": f"bench_{variant}"})
    return Trainer(config_from_dict(apply_overrides(tree, overrides), str(path)))


def wait_for_peers(barrier: Path, n: int, timeout: float = 600.0) -> None:
    """File barrier: every copy announces itself, then waits until n copies have."""
    barrier.mkdir(parents=True, exist_ok=True)
    (barrier / f"ready_{os.getpid()}").touch()
    t0 = time.time()
    while len(list(barrier.glob("ready_*"))) < n:
        if time.time() - t0 > timeout:
            raise SystemExit(f"barrier {barrier}: only {len(list(barrier.glob('ready_*')))} of {n} copies arrived")
        time.sleep(0.05)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(trainer: Trainer, batch, steps: int) -> float:
    inputs, labels = batch
    sync(trainer.device)
    t0 = time.perf_counter()
    for i in range(steps):
        trainer.train_step(inputs, labels, epoch=1, step=i)
    sync(trainer.device)
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="mlp")
    p.add_argument("--run-config", type=Path, help="time this run config's model and batch instead of a preset")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--barrier", type=Path, help="directory for a start barrier shared by concurrent copies")
    p.add_argument("--barrier-n", type=int, default=1, help="copies that meet at --barrier")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-amp", action="store_true", help="fp32 on CUDA (default: bf16 autocast)")
    p.add_argument("--steps", type=int, default=20, help="steps per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--latent-dim", type=int,
                   help="the AIB latent size of cal_aib and pytorch_aib (default: each embedding's own width)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", type=Path, default=Path("runs/bench_step.json"))
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tmp = args.out.parent / f"bench_step_runs_{os.getpid()}"
    if args.run_config:
        trainers = {v: make_trainer_from_config(args.run_config, v, args.device, not args.no_amp, tmp,
                                                args.latent_dim)
                    for v in args.variants}
    else:
        trainers = {v: make_trainer(args.preset, v, args.device, not args.no_amp, tmp, args.latent_dim)
                    for v in args.variants}
    for peer in PEERS:  # the peers: the same layers, run without calray's loop
        if peer not in trainers:
            continue
        src = trainers[peer].raw_model
        if all(isinstance(src.encoders[m], MLPEncoder) for m in src.modalities) and hasattr(src.fusion, "head"):
            trainers[peer] = HandWrittenStep(trainers[peer], fused=peer != "pytorch")
        else:
            print(f"{peer} peer: written for MLP encoders with a concat head; skipped for this model")
            del trainers[peer]
    first = next(t for t in trainers.values() if isinstance(t, Trainer))
    inputs, labels = next(iter(first.train_loader))
    batch = (to_device(inputs, first.device, first.channels_last), labels.to(first.device))
    for t in trainers.values():
        if isinstance(t, Trainer):
            t.model.train()
        time_steps(t, batch, args.warmup)
    if args.barrier:
        wait_for_peers(args.barrier, args.barrier_n)
    times = {v: [] for v in trainers}
    for _ in range(args.rounds):
        for v, t in trainers.items():
            times[v].append(time_steps(t, batch, args.steps))
    med = {v: statistics.median(ts) for v, ts in times.items()}
    base = med.get("plain")
    bs = len(labels)
    source = f"run config {args.run_config}" if args.run_config else f"preset {args.preset}"
    print(f"{source}, device {first.device}, batch {bs}, amp {first.amp}, threads {torch.get_num_threads()}, "
          f"{args.rounds} rounds × {args.steps} steps (median per step)"
          + (f", AIB latent {args.latent_dim}" if args.latent_dim else ""))
    peer = med.get("pytorch")
    print(f"{'variant':<14}{'ms/step':>10}{'samples/s':>12}{'× plain':>10}{'× pytorch':>11}")
    for v, m in med.items():
        ratio = f"{m / base:.3f}" if base else "-"
        vs_peer = f"{m / peer:.3f}" if peer else "-"
        print(f"{v:<14}{m * 1e3:>10.2f}{bs / m:>12.0f}{ratio:>10}{vs_peer:>11}")
    aib_peer = med.get("pytorch_aib")
    if aib_peer and "cal_aib" in med:
        print(f"cal_aib / pytorch_aib: {med['cal_aib'] / aib_peer:.3f} (CAL and calray's bookkeeping on the AIB model)")
    result = {
        "preset": None if args.run_config else args.preset, "run_config": str(args.run_config or ""),
        "device": str(first.device), "batch": bs, "amp": first.amp, "latent_dim": args.latent_dim,
        "samples_per_s": {v: bs / m for v, m in med.items()},
        "ms_per_step": {v: m * 1e3 for v, m in med.items()},
        "ratio_to_plain": {v: m / base for v, m in med.items()} if base else None,
        "ratio_to_pytorch": {v: m / peer for v, m in med.items()} if peer else None,
        "cal_aib_to_pytorch_aib": med["cal_aib"] / aib_peer if aib_peer and "cal_aib" in med else None,
        "rounds": {v: [x * 1e3 for x in ts] for v, ts in times.items()},
        "env": environment(first.device),
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
