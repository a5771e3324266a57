"""Optimisers and learning-rate schedules of the one loop, with per-modality optimiser groups.

`optim.per_modality: {text: {name: adam, lr: 5e-5}}` gives modality m's exclusive parameters (θ_m of
eq 11: its encoder and AIB head) their own optimiser settings; every other parameter (the fusion
module and heads, θ_s, and modalities not listed) stays in the default group of `optim`. The paper
trains image modalities with SGD and text with Adam (section IV-B), and it matters for eq 14: Adam
and AdamW are invariant to a constant rescaling of a gradient, so (1 + η·a_m)·g_m moves an Adam
parameter as far as g_m does. Groups of one optimiser type share one torch optimiser (one param
group each); different types give one torch optimiser per type, stepped together (`OptimizerSet`).
"""

from __future__ import annotations

import torch

from calray.errors import ConfigError
from calray.method.plugins import modulates_gradients

ADAPTIVE = frozenset({"adam", "adamw"})  # invariant to a constant gradient scale
DEFAULT_GROUP = "default"
# CPU only: torch's CPU default is the per-tensor loop; on CUDA its default is already the multi-tensor
# (foreach) path, and fused kernels there, which refuse a gradient whose strides differ from its
# parameter's (pytorch#106951), were not measurable here (no GPU)
FUSED_DEVICES = ("cpu",)


def group_settings(o, modality: str | None = None) -> dict:
    """Resolved settings of the default group (modality None) or of modality m's group: its
    `optim.per_modality[m]` entries, the default group's values for the rest."""
    base = {"name": o.name, "lr": o.lr, "weight_decay": o.weight_decay, "momentum": o.momentum, "betas": o.betas}
    if modality is None:
        return base
    own = o.per_modality[modality].model_dump(exclude_none=True)
    return {**base, **own}


def modality_optimizers(o, modalities: list[str]) -> dict[str, str]:
    """The optimiser type each modality's parameters are trained with."""
    return {m: (group_settings(o, m) if m in o.per_modality else group_settings(o))["name"] for m in modalities}


def adaptive_modulation_warnings(cfg, modalities: list[str]) -> list[str]:
    """One message per modality whose gradient a strategy rescales under an optimiser that undoes it."""
    strategy = cfg.method.strategy
    if not modulates_gradients(strategy):
        return []
    out = []
    for m, name in modality_optimizers(cfg.optim, modalities).items():
        if name in ADAPTIVE:
            out.append(f"method.strategy {strategy!r} rescales modality {m!r}'s gradients, but {m!r} trains with "
                       f"{name}, which is invariant to a constant gradient scale: the modulation has almost no "
                       f"effect. Train {m!r} with SGD (optim.name: sgd, or optim.per_modality.{m}.name: sgd)")
    return out


def can_fuse(params) -> bool:
    """torch's fused optimiser kernels (one kernel per parameter instead of 3–4 per-tensor ops; the
    SGD step of the `mlp` bench preset takes half the time on CPU, docs/BENCHMARKS.md §5) take dense
    floating-point parameters."""
    return all(p.is_floating_point() and not p.is_sparse and p.device.type in FUSED_DEVICES for p in params)


def prime_momentum(sgd: torch.optim.SGD) -> None:
    """Zero momentum buffers from the start. torch's fused SGD creates them only on a step where no
    parameter has one, and fails on a step where some have one and others not: a parameter whose
    first gradient comes later (MMBT's freeze schedule, calray.models.mmbt). With dampening 0 the
    first step from a zero buffer, μ·0 + g, is torch's lazily created buffer g, bit for bit (tested)."""
    for group in sgd.param_groups:
        if group["momentum"] != 0 and group["dampening"] == 0:
            for p in group["params"]:
                sgd.state[p]["momentum_buffer"] = torch.zeros_like(p)


def _torch_optimizer(name: str, groups: list[dict]) -> torch.optim.Optimizer:
    fused = can_fuse(p for g in groups for p in g["params"])
    if name == "sgd":
        groups = [{k: v for k, v in g.items() if k != "betas"} for g in groups]
        sgd = torch.optim.SGD(groups, lr=groups[0]["lr"], fused=fused)
        if fused:
            prime_momentum(sgd)
        return sgd
    groups = [{k: v for k, v in g.items() if k != "momentum"} for g in groups]
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(groups, lr=groups[0]["lr"], fused=fused)


def build_optimizer(o, model, modalities: list[str]) -> "OptimizerSet":
    """The optimisers of `model` (a MultimodalModel) for the `optim` block `o`."""
    unknown = sorted(set(o.per_modality) - set(modalities))
    if unknown:
        raise ConfigError(f"optim.per_modality.{unknown[0]}: not a modality of this dataset "
                          f"(modalities: {', '.join(modalities)})")
    groups: list[tuple[str, str, list]] = []  # (group name, optimiser type, params)
    taken: set[int] = set()
    for m in modalities:
        if m in o.per_modality:
            params = [p for p in model.modality_parameters(m) if p.requires_grad]
            taken.update(id(p) for p in params)
            groups.append((m, group_settings(o, m)["name"], params))
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    groups.insert(0, (DEFAULT_GROUP, o.name, rest))
    by_type: dict[str, list[dict]] = {}
    for name, kind, params in groups:
        if not params:
            continue
        settings = group_settings(o, None if name == DEFAULT_GROUP else name)
        by_type.setdefault(kind, []).append({"params": params, "group": name, **{k: v for k, v in settings.items()
                                                                                 if k != "name"}})
    return OptimizerSet([_torch_optimizer(kind, gs) for kind, gs in by_type.items()])


class OptimizerSet:
    """Several torch optimisers stepped as one. With one optimiser (the usual case) its state_dict
    is that optimiser's, so checkpoints keep their format."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def group_lrs(self) -> dict[str, float]:
        return {g.get("group", DEFAULT_GROUP): g["lr"] for g in self.param_groups}

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none:
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=False)
            return
        # what torch's zero_grad(set_to_none=True) does, without the profiler's record_function
        # around it: ~11 µs of a CPU step on small models (docs/BENCHMARKS.md §5)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def state_dict(self) -> dict:
        if len(self.optimizers) == 1:
            return self.optimizers[0].state_dict()
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        states = state["optimizers"] if "optimizers" in state else [state]
        if len(states) != len(self.optimizers):
            raise ValueError(f"checkpoint has {len(states)} optimizer(s), this config builds {len(self.optimizers)}")
        for opt, s in zip(self.optimizers, states):
            opt.load_state_dict(s)


def linear_warmup_factor(u: int, total: int, warmup: float) -> float:
    """lr factor of optimizer update u (0-based) of `total`: u/(w·U) while u < w·U, then
    (U − u)/(U − w·U), 0 from U on — pytorch_pretrained_bert 0.6's warmup_linear (BertAdam) and
    transformers' get_linear_schedule_with_warmup with a fractional w·U."""
    progress = u / total
    if progress < warmup:
        return progress / warmup
    return max(0.0, (1.0 - progress) / (1.0 - warmup))


def _torch_scheduler(o, opt: torch.optim.Optimizer, total_updates: int):
    if o.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, o.step_size, o.gamma)
    if o.scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, o.milestones, o.gamma)
    if o.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=o.epochs)
    if o.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=o.gamma,
                                                          patience=o.plateau_patience)
    # linear_warmup: stepped after every optimizer update; a plain function, so the checkpoint
    # stores only last_epoch (= updates done) and U always comes from the config
    w = o.warmup_proportion
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda u: linear_warmup_factor(u, total_updates, w))


class SchedulerSet:
    """One lr schedule per optimiser of an OptimizerSet, stepped together."""

    def __init__(self, o, optimizer: OptimizerSet, total_updates: int):
        self.per_update = o.scheduler == "linear_warmup"
        self.plateau = o.scheduler == "plateau"
        self.schedulers = [_torch_scheduler(o, opt, total_updates) for opt in optimizer.optimizers]
        self.optimizer = optimizer

    def step(self, val_acc: float | None = None) -> None:
        for s in self.schedulers:
            if self.plateau:
                s.step(val_acc)
            else:
                s.step()

    def state_dict(self) -> dict:
        if len(self.schedulers) == 1:
            return self.schedulers[0].state_dict()
        return {"schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict) -> None:
        states = state["schedulers"] if "schedulers" in state else [state]
        for s, st in zip(self.schedulers, states):
            s.load_state_dict(st)
        if self.per_update:
            # the lr of update u from this config's U (a no-op when the config is unchanged; with a
            # changed optim.epochs the schedule continues on the new U from u)
            for s, opt in zip(self.schedulers, self.optimizer.optimizers):
                for group, base, factor in zip(opt.param_groups, s.base_lrs, s.lr_lambdas):
                    group["lr"] = base * factor(s.last_epoch)


def build_scheduler(o, optimizer: OptimizerSet, total_updates: int) -> SchedulerSet | None:
    return None if o.scheduler == "none" else SchedulerSet(o, optimizer, total_updates)
