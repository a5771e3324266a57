"""The formulas of gradient modulation (paper section III-B, eq 12–14) and of OGM-GE (Peng et al.,
CVPR 2022); the strategies that use them are plug-ins (calray.method.strategies, calray.method.ogm_ge).

Eq 12 writes a = softmax(T·W): T *multiplies* W, so it acts as an inverse temperature
(larger T → sharper a). The prose beside eq 12 describes T as a divisor (T → 0 one-hot); that
T is the reciprocal of this one. calray follows the equation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def contribution_softmax(W: dict[str, float], T: float) -> dict[str, float]:
    """Eq 12: a = softmax(T·W), computed in float64."""
    names = list(W)
    a = torch.softmax(T * torch.tensor([W[m] for m in names], dtype=torch.float64), dim=0)
    return {m: float(v) for m, v in zip(names, a)}


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
