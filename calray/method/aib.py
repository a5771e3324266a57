"""The contribution-aware Asymmetric Information Bottleneck (paper section III-C, eq 17–20).

Per modality a variational head maps the embedding h_m to q(z_m | x_m) = N(μ, diag σ²)
(eq 18); z_m = μ + σ·ε in training and μ in evaluation, and z_m replaces h_m downstream.

Bounds used for the two mutual informations of eq 19–20:
- I(Z_m; X_m) ≤ E_x KL(q(z_m|x_m) ‖ N(0, I))       (variational upper bound, nats)
- I(Z_m; Y)   ≥ H(Y) − CE(head(z_m), y)              (Barber–Agakov lower bound, nats)
where the head is modality m's unimodal classifier, whose CE is already a term of eq 21.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from calray.registry import AIB_MODES

AIB_PLACEMENTS = ("eq19", "eq20")  # where β_m multiplies: I(Z;X) (eq 19) or I(Z;Y) (eq 20)
MIN_BETA = 0.01  # floor for β before 1/β (inv_beta): caps that weight at 100


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Batch mean of KL(N(μ, diag e^{logvar}) ‖ N(0, I)) = ½ Σ_d (μ² + σ² − log σ² − 1), in nats.

    Written as ½·d·mean_{b,d}(μ² + σ² − log σ²) − ½·d: four kernels and their backward instead of
    eight, a measurable part of a small model's step (docs/BENCHMARKS.md §5)."""
    d = mu.shape[1]
    return torch.addcmul(logvar.exp() - logvar, mu, mu).mean() * (0.5 * d) - 0.5 * d


def label_entropy(class_counts) -> float:
    """H(Y) in nats of the empirical training label distribution."""
    p = torch.as_tensor(class_counts, dtype=torch.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def compression_factors(a: dict[str, float]) -> dict[str, float]:
    """Eq 17 on the normalised contributions a (Σ a = 1): β_m = Σ_{i≠m} a_i / Σ_j a_j = 1 − a_m.

    Using a rather than raw W keeps β in [0, 1] even when some W are negative.
    """
    total = sum(a.values())
    return {m: (total - v) / total for m, v in a.items()}


def aib_weights(a: dict[str, float], mode: str) -> dict[str, float]:
    """The weight w_m of each *included* modality in L_AIB (Table IV modes, the AIB_MODES registry);
    `aib_loss` places it on I(Z_m;X_m) (eq 19) or I(Z_m;Y) (eq 20).

    beta: β_m (eq 17); inv_beta: 1/β_m (β floored at MIN_BETA); mi: only the lowest-contribution
    modality, unweighted (1.0); mx: only the highest, unweighted; mx_mi: both, unweighted; off: none.
    Ties in mi/mx go to the first modality in order.
    """
    if mode not in AIB_MODES:
        raise ValueError(f"unknown AIB mode {mode!r}; known: {AIB_MODES.names()}")
    return AIB_MODES.get(mode)(a)


# registered in Table IV's row order (the report orders its AIB rows by the registry)
def _lowest(a):
    return min(a, key=lambda m: a[m])


def _highest(a):
    return max(a, key=lambda m: a[m])


@AIB_MODES.register("mi")
def _mi(a):
    return {_lowest(a): 1.0}


@AIB_MODES.register("mx")
def _mx(a):
    return {_highest(a): 1.0}


@AIB_MODES.register("mx_mi")
def _mx_mi(a):
    chosen = {_highest(a), _lowest(a)}
    return {m: 1.0 for m in a if m in chosen}


@AIB_MODES.register("inv_beta")
def _inv_beta(a):
    return {m: 1.0 / max(b, MIN_BETA) for m, b in compression_factors(a).items()}


@AIB_MODES.register("beta")
def _beta(a):
    return compression_factors(a)


@AIB_MODES.register("off")
def _off(a):
    return {}


def aib_loss(kl: dict[str, torch.Tensor], ce: dict[str, torch.Tensor], h_y: float,
             weights: dict[str, float], placement: str = "eq19") -> torch.Tensor:
    """L_AIB = Σ_m −log σ(·) over the modalities in `weights` (see `aib_weights`); 0 when it is empty.

    kl[m]: the I(Z_m;X_m) bound; ce[m]: CE of modality m's head on z_m, giving I(Z_m;Y) ≥ H(Y) − ce[m].
    The paper places the weight w_m (β_m in mode `beta`) in two different spots:
    - `eq19` (default): on the compression term, as eq 19 writes the objective
      (β_m·I(Z_m;X_m) − I(Z_m;Y)) in eq 20's log-sigmoid form:
      Σ_m −log σ(I(Z_m;Y) − w_m·I(Z_m;X_m)) = Σ_m softplus(w_m·KL_m − (H(Y) − CE_m)).
      A less contributing modality (larger β) is pushed harder toward a small KL — what the prose says
      ("modalities with lower contribution undergo stronger compression").
    - `eq20`: on the relevance term, as eq 20 is printed:
      Σ_m −log σ(w_m·I(Z_m;Y) − I(Z_m;X_m)) = Σ_m softplus(KL_m − w_m·(H(Y) − CE_m)). With a near one-hot
      a, the dominant modality (β ≈ 0) gets pure softplus(KL): it is compressed hardest.
    """
    if placement not in AIB_PLACEMENTS:
        raise ValueError(f"unknown AIB placement {placement!r}; known: {AIB_PLACEMENTS}")
    if not weights:
        return next(iter(kl.values())).new_zeros(())
    # one softplus over the stacked modalities; w stays a Python number (no host-to-device copy a step)
    if placement == "eq19":  # softplus(w·KL − (H − CE)) = softplus(w·KL + CE − H)
        weighted = torch.stack([w * kl[m] for m, w in weights.items()])
        return F.softplus(weighted + torch.stack([ce[m] for m in weights]) - h_y).sum()
    relevance = torch.stack([w * (h_y - ce[m]) for m, w in weights.items()])
    return F.softplus(torch.stack([kl[m] for m in weights]) - relevance).sum()
