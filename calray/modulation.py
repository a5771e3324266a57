"""Contribution-guided gradient modulation (paper section III-B, eq 12–14) and its Fig. 2 ablations.

Eq 12 writes a = softmax(T·W): T *multiplies* W, so it acts as an inverse temperature
(larger T → sharper a). The prose beside eq 12 describes T as a divisor (T → 0 one-hot); that
T is the reciprocal of this one. calray follows the equation.

Strategies:
- `cal`    (Strong): a = softmax(T·W); each encoder's gradient ← (1 + η·a_m)·gradient (eq 14)
- `weak`:          a = softmax(−T·W)  (reverses cal's ranking)
- `null`:          a_m = 1/M          (uniform additive modulation)
- `ogm_ge`: OGM-GE (Peng et al., CVPR 2022): the dominant modality's weight gradients are
  scaled by 1 − tanh(α·ρ) (reference code; `ogm_continuous`: 1 − tanh(α·relu(ρ − 1))) inside an epoch window, plus optional Gaussian noise with
  the gradient's std (GE) on every modality's weight gradients. As published, it trains on the
  fused cross-entropy only: the config requires `aib: off` and `unimodal_weight: 0`
- `ogm_ge_mix`: the same modulation inside whatever loss is configured (CAL's eq 21 with its
  unimodal CE terms and the AIB) — a mixture, not the published baseline
- `none`: plain joint training
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

STRATEGIES = ("cal", "null", "weak", "ogm_ge", "ogm_ge_mix", "none")
OGM_STRATEGIES = ("ogm_ge", "ogm_ge_mix")  # OGM-GE's modulation; they differ only in the loss


def contribution_softmax(W: dict[str, float], T: float) -> dict[str, float]:
    """Eq 12: a = softmax(T·W), computed in float64."""
    names = list(W)
    a = torch.softmax(T * torch.tensor([W[m] for m in names], dtype=torch.float64), dim=0)
    return {m: float(v) for m, v in zip(names, a)}


def modulation_coefficients(strategy: str, W: dict[str, float], T: float) -> dict[str, float]:
    """The vector a of eq 13–14 for the additive strategies; zeros for `none` and the OGM-GE ones."""
    if strategy == "cal":
        return contribution_softmax(W, T)
    if strategy == "weak":
        return contribution_softmax(W, -T)
    if strategy == "null":
        return {m: 1.0 / len(W) for m in W}
    if strategy == "none" or strategy in OGM_STRATEGIES:
        return {m: 0.0 for m in W}
    raise ValueError(f"unknown strategy {strategy!r}; known: {STRATEGIES}")


@torch.no_grad()
def scale_gradients(model, a: dict[str, float], eta: float) -> dict[str, float]:
    """Eq 14: g̃_m = (1 + η·a_m)·g_m for every parameter of modality m's branch.

    Shared (fusion/head) parameters are untouched. Returns the scale applied per modality.
    Under DDP call it after backward (gradients already synchronised).
    """
    scales, grads, factors = {}, [], []
    for m, am in a.items():
        s = 1.0 + eta * am
        scales[m] = s
        if s == 1.0:
            continue
        for p in model.modality_parameters(m):
            if p.grad is not None:
                grads.append(p.grad)
                factors.append(s)
    if grads:
        torch._foreach_mul_(grads, factors)  # one call for all modalities
    return scales


def ogm_scores(unimodal_logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Σ over the batch of softmax(p^m)[y]: OGM-GE's per-modality confidence score."""
    return torch.stack([
        F.softmax(unimodal_logits[m].detach().float(), dim=1).gather(1, labels[:, None]).sum()
        for m in unimodal_logits
    ])


def ogm_coefficients(scores: dict[str, float], alpha: float, continuous: bool = False) -> dict[str, float]:
    """OGM-GE's coefficient per modality, ρ_m = s_m / mean_{j≠m} s_j (for M = 2 exactly OGM-GE's ratio).

    Default (the reference code, GeWu-Lab/OGM-GE_CVPR2022): k_m = 1 − tanh(α·ρ_m) when ρ_m > 1, else 1
    — so k jumps to 1 − tanh(α) as soon as a modality dominates. `continuous=True`:
    k_m = 1 − tanh(α·relu(ρ_m − 1)), which is 1 at ρ = 1 and has no jump.
    """
    names = list(scores)
    out = {}
    for m in names:
        others = [scores[j] for j in names if j != m]
        rho = scores[m] / max(sum(others) / len(others), 1e-12)
        if continuous:
            out[m] = 1.0 - math.tanh(alpha * max(rho - 1.0, 0.0))
        else:
            out[m] = 1.0 - math.tanh(alpha * rho) if rho > 1.0 else 1.0
    return out


@torch.no_grad()
def apply_ogm_ge(model, k: dict[str, float], ge_noise: bool, generator: torch.Generator | None = None) -> None:
    """Scale the weight-matrix/conv gradients (dim ≥ 2, OGM-GE's conv weights) of modality m by k_m,
    and, when `ge_noise`, add N(0, std(grad)²) noise (std of the unscaled gradient) to those
    gradients of *every* modality — as the reference OGM-GE code does (GE applies to both
    streams, also the one with k = 1). `generator` must be seeded identically on every rank so
    the noise (and the update) stays identical under DDP."""
    for m, km in k.items():
        if km >= 1.0 and not ge_noise:
            continue
        for p in model.modality_parameters(m):
            if p.grad is None or p.grad.dim() < 2:
                continue
            g = p.grad
            std = float(g.float().std()) + 1e-8
            if km < 1.0:
                g.mul_(km)
            if ge_noise:
                noise = torch.randn(g.shape, generator=generator, dtype=torch.float32,
                                    device=generator.device if generator is not None else g.device)
                g.add_(noise.to(g.device, g.dtype) * std)


class GradientModulator:
    """Applies a strategy after backward. `a` is refreshed from contributions by the trainer."""

    def __init__(self, method, modalities: list[str], seed: int = 0):
        if method.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {method.strategy!r}; known: {STRATEGIES}")
        self.method = method
        self.modalities = list(modalities)
        self.a = modulation_coefficients(method.strategy, {m: 0.0 for m in modalities}, method.T)
        self.generator = torch.Generator().manual_seed(seed + 7919)

    def refresh(self, W: dict[str, float]) -> dict[str, float]:
        self.a = modulation_coefficients(self.method.strategy, W, self.method.T)
        return self.a

    def active(self, epoch: int) -> bool:
        return epoch >= self.method.warmup_epochs and self.method.strategy != "none"

    def apply(self, model, epoch: int, unimodal_logits: dict[str, torch.Tensor], labels: torch.Tensor) -> dict:
        """Modulate the gradients now in `model` (unwrapped). Returns what was applied, for logging."""
        if not self.active(epoch):
            return {}
        if self.method.strategy in OGM_STRATEGIES:
            start, end = self.method.ogm_epochs
            if not (start <= epoch <= end):
                return {}
            scores = ogm_scores(unimodal_logits, labels)
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                scores = scores.to(labels.device)
                dist.all_reduce(scores)  # every rank must scale identically
            k = ogm_coefficients({m: float(s) for m, s in zip(unimodal_logits, scores)}, self.method.ogm_alpha,
                                 self.method.ogm_continuous)
            apply_ogm_ge(model, k, self.method.ogm_ge_noise, self.generator)
            return {f"k_{m}": v for m, v in k.items()}
        return scale_gradients(model, self.a, self.method.eta)

    def state_dict(self) -> dict:
        return {"a": dict(self.a), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.a = dict(state["a"])
        self.generator.set_state(state["generator"])
