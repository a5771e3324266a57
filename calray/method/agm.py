"""AGM — adaptive gradient modulation (Li et al., "Boosting Multi-modal Model Performance with Adaptive
Gradient Modulation", ICCV 2023; reference lihongcs/AGM, read here through its port
GeWu-Lab/BalanceBenchmark balancemm/trainer/AGM_trainer.py — lihongcs/AGM itself was not retrievable).

Per optimiser update:
1. mono-modal responses by Shapley attribution of the fused logits (`shapley_responses`): v(S) = the
   fusion run with the modalities outside S zero-filled, v(∅) = 0 (the reference's Modality_Audio /
   Modality_Visual classes), φ_m = Σ_{S ⊆ M∖m} |S|!(M−|S|−1)!/M! · (v(S ∪ m) − v(S));
2. each modality's score s_m = batch mean of −log max(softmax(φ_m)[y], 1e-8) (`agm_scores`),
   all-reduced over DDP ranks;
3. the ratio r_m = exp(M/(M−1)·(s̄ − s_m)) (modality m's advantage over the mean) and its target
   r̄_m, the same formula on the running (cumulative) means t_m of the scores; the coefficient
   c_m = exp(α·min(r̄_m − r_m, clamp)) (`agm_coefficients`): a modality ahead of its running target
   is slowed (c < 1), one behind it sped up (c > 1);
4. inside the epoch window [modulation_starts, modulation_ends], every gradient of modality m's
   branch is multiplied by c_m (calray.method.modulation.scale_gradients); then t_m ← running mean.

The published loss is the fused cross-entropy only: the plug-in requires method.aib: off and
method.unimodal_weight: 0. Deviations (docs/baselines/agm.md): the sign of r follows the paper's rule
(BalanceBenchmark's M-modality form exp(M/(M−1)·(s_m − s̄)) inverts it); v(S) zero-fills embeddings,
not inputs; 1-D parameters are scaled too; no built-in gradient clipping (use optim.grad_clip).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from pydantic import Field

from calray.config import Strict
from calray.dist import all_reduce_sum
from calray.errors import ConfigError
from calray.method.base import Method, Step, require_base_loss
from calray.method.modulation import scale_gradients
from calray.registry import STRATEGIES

PROB_FLOOR = 1e-8  # the reference scores −log(1e-8) for a probability below 1e-8


@torch.no_grad()
def shapley_responses(fusion, embs: dict[str, torch.Tensor], fused_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """φ_m of the fused logits over coalitions of modalities, v(∅) = 0 and v(all) = `fused_logits`."""
    mods = list(embs)
    M = len(mods)
    embs = {m: h.detach() for m, h in embs.items()}
    cache: dict[frozenset, torch.Tensor] = {frozenset(): torch.zeros_like(fused_logits, dtype=torch.float32),
                                            frozenset(mods): fused_logits.detach().float()}

    def v(S: frozenset) -> torch.Tensor:
        if S not in cache:
            cache[S] = fusion(fusion.zero_filled(embs, set(S)))[1].float()
        return cache[S]

    out = {}
    for m in mods:
        others = [k for k in mods if k != m]
        phi = torch.zeros_like(cache[frozenset()])
        for size in range(M):
            weight = math.factorial(size) * math.factorial(M - size - 1) / math.factorial(M)
            for S in itertools.combinations(others, size):
                phi += weight * (v(frozenset(S) | {m}) - v(frozenset(S)))
        out[m] = phi
    return out


def agm_scores(responses: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Σ over the batch of −log max(softmax(φ_m)[y], 1e-8), one entry per modality (float64)."""
    rows = []
    for phi in responses.values():
        logp = F.log_softmax(phi.double(), dim=1).gather(1, labels[:, None]).squeeze(1)
        rows.append(-logp.clamp(min=math.log(PROB_FLOOR)).sum())
    return torch.stack(rows)


def agm_coefficients(scores: dict[str, float], targets: dict[str, float], alpha: float,
                     clamp: float) -> dict[str, float]:
    """c_m = exp(α·min(r̄_m − r_m, clamp)), r = exp(M/(M−1)·(mean − s_m)) of the scores / the targets."""
    M = len(scores)
    k = M / (M - 1)
    s_mean = sum(scores.values()) / M
    t_mean = sum(targets.values()) / M
    out = {}
    for m in scores:
        ratio = math.exp(k * (s_mean - scores[m]))
        target = math.exp(k * (t_mean - targets[m]))
        out[m] = math.exp(alpha * min(target - ratio, clamp))
    return out


@STRATEGIES.register("agm")
class Agm(Method):
    """AGM as published: fused CE, each branch's gradient × c_m (module docstring)."""

    modulates = True

    class Params(Strict):
        alpha: float = Field(0.1, ge=0.0)  # BalanceBenchmark trainer_config AGM.alpha
        modulation_starts: int = Field(0, ge=0)  # first epoch with modulation (inclusive)
        modulation_ends: int = Field(80, ge=0)  # last epoch with modulation (inclusive)
        clamp: float = Field(7.0, gt=0.0)  # upper bound of r̄ − r inside the exponential (reference: 7)

    def __init__(self, cfg, modalities, context):
        super().__init__(cfg, modalities, context)
        if len(self.modalities) < 2:
            raise ConfigError("strategy 'agm' needs at least two modalities")
        require_base_loss(cfg, "agm", 0, "the fused cross-entropy only")
        self.targets = {m: 0.0 for m in self.modalities}  # running means t_m of the scores
        self.iteration = 0
        self.last_coefficients = {m: 1.0 for m in self.modalities}
        self._pending: list[tuple[dict, torch.Tensor, torch.Tensor]] = []

    def loss_terms(self, step: Step, terms):
        out = step.out
        self._pending.append(({m: h.detach() for m, h in out.embeddings.items()}, out.fused_logits.detach(),
                              step.labels))
        return terms

    def after_backward(self, model, step: Step) -> None:
        if not self._pending:
            return
        sums = torch.zeros(len(self.modalities) + 1, dtype=torch.float64, device=step.labels.device)
        for embs, fused, labels in self._pending:  # every micro-batch of this update
            responses = shapley_responses(model.fusion, embs, fused)
            sums[:-1] += agm_scores({m: responses[m] for m in self.modalities}, labels).to(sums.device)
            sums[-1] += len(labels)
        self._pending = []
        sums = all_reduce_sum(sums)  # the same scores, and so the same c, on every rank
        scores = {m: float(s) / float(sums[-1]) for m, s in zip(self.modalities, sums[:-1])}
        coeffs = agm_coefficients(scores, self.targets, self.params.alpha, self.params.clamp)
        self.iteration += 1
        k = self.iteration
        self.targets = {m: self.targets[m] * (k - 1) / k + scores[m] / k for m in self.modalities}
        p = self.params
        if p.modulation_starts <= step.epoch <= p.modulation_ends:
            scale_gradients(model, {m: c - 1.0 for m, c in coeffs.items()}, 1.0)
            self.last_coefficients = coeffs
        else:
            self.last_coefficients = {m: 1.0 for m in self.modalities}

    def on_contributions(self, W):
        return {"a": {m: 0.0 for m in self.modalities}}  # no contribution softmax: logged as 0

    def on_epoch_end(self, model, epoch, evaluate):
        row = {f"agm_coeff_{m}": c for m, c in self.last_coefficients.items()}
        row.update({f"agm_target_{m}": t for m, t in self.targets.items()})
        return row

    def state_dict(self) -> dict:
        return {"targets": dict(self.targets), "iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.targets = dict(state["targets"])
        self.iteration = int(state["iteration"])
