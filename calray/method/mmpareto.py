"""MMPareto (Wei & Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance", ICML 2024)
as a strategy plug-in.

Reference code (read, not copied): GeWu-Lab/MMPareto_ICML2024, code/MMPareto.py (`train_epoch`) and
code/min_norm_solvers.py (`MinNormSolver._min_norm_element_from2` / `find_min_norm_element`, 2 tasks).

Per encoder m (its parameters θ_m = `model.modality_parameters(m)`), with g_mm = ∇θ_m L_fused and
g_u = ∇θ_m L_unimodal (the loop's "unimodal" term; only modality m's CE reaches θ_m):
  - cos(g_mm, g_u) > 0: weights k = (½, ½); otherwise the 2-task min-norm (Pareto/MGDA) weights
    k = (c, 1 − c), c = argmin_c ‖c·g_mm + (1 − c)·g_u‖ = (g_u·g_u − g_mm·g_u) / ‖g_mm − g_u‖²
    (clamped to 0.999 / 0.001 as the solver does);
  - per parameter tensor p of θ_m: new = 2·(k₀·g_mm[p] + k₁·g_u[p]), and the magnitude is restored
    to at least that of the plain sum: grad[p] = γ·new·max(1, ‖g_mm[p] + g_u[p]‖ / ‖new‖), γ = 1.5.
Shared parameters (fusion, heads) get the plain sum of every term's gradient, as in the reference.

The loop's hooks: `backward` takes the gradient of the fused term and of the other terms separately
(torch.autograd.grad) and accumulates them (also over `optim.grad_accum` micro-batches); `after_backward`,
on the optimiser update, all-reduces both (means over DDP ranks: `own_backward`, the trainer ran the
step under `no_sync`), so the cosines and Pareto weights come from the global gradients and 2 workers × b
equal 1 process × 2b; then it writes the combined gradients into `.grad`.
docs/baselines/mmpareto.md lists the deviations.
"""

from __future__ import annotations

import torch
from pydantic import Field

from calray.config import Strict
from calray.dist import average_over_ranks
from calray.method.base import Method, Step, require_base_loss
from calray.registry import STRATEGIES


def min_norm_weight(g1g1: float, g1g2: float, g2g2: float) -> float:
    """c minimising ‖c·g1 + (1 − c)·g2‖² over [0, 1] (MinNormSolver's 2-vector closed form, with its
    0.999 / 0.001 ends)."""
    if g1g2 >= g1g1:
        return 0.999
    if g1g2 >= g2g2:
        return 0.001
    return (g2g2 - g1g2) / (g1g1 + g2g2 - 2.0 * g1g2)


def pareto_weights(g_mm: torch.Tensor, g_u: torch.Tensor) -> tuple[float, float, float]:
    """(k_mm, k_u, cos) for one encoder's flattened gradients: ½/½ without conflict, min-norm with."""
    dots = torch.stack([g_mm @ g_mm, g_mm @ g_u, g_u @ g_u]).double().tolist()
    cos = dots[1] / max((dots[0] * dots[2]) ** 0.5, 1e-30)
    if cos > 0:
        return 0.5, 0.5, cos
    c = min_norm_weight(*dots)
    return c, 1.0 - c, cos


def combine(g_mm: torch.Tensor, g_u: torch.Tensor, k: tuple[float, float], gamma: float) -> torch.Tensor:
    """One parameter tensor's gradient: γ·new·max(1, ‖g_mm + g_u‖/‖new‖), new = 2(k₀g_mm + k₁g_u)."""
    new = 2.0 * (k[0] * g_mm + k[1] * g_u)
    new_norm = new.norm()
    if new_norm > 0:  # the reference divides by ‖new‖ unguarded (0/0 there leaves new·γ = 0)
        new = new * torch.clamp((g_mm + g_u).norm() / new_norm, min=1.0)
    return gamma * new


@STRATEGIES.register("mmpareto")
class MMPareto(Method):
    own_backward = True  # the trainer runs forward/backward under DDP's no_sync; after_backward all-reduces

    class Params(Strict):
        gamma: float = Field(1.5, gt=0.0)  # the reference's hard-coded magnitude factor

    def __init__(self, cfg, modalities, context):
        super().__init__(cfg, modalities, context)
        require_base_loss(cfg, "mmpareto", None, "CE_fused + Σ_m CE_m (weight 1 in the reference), which it balances")
        self._grads: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # (fused, rest) per parameter
        self._params: list[torch.nn.Parameter] = []
        self.epoch_stats: dict[str, list[float]] = {}

    def on_contributions(self, W):
        return {"a": {m: 0.0 for m in self.modalities}}  # no contribution-softmax a: logged as 0

    def backward(self, terms: dict[str, torch.Tensor], model) -> bool:
        raw = getattr(model, "module", model)  # DDP's wrapped model
        if not self._params:
            self._params = [p for p in raw.parameters() if p.requires_grad]
        rest = [v for k, v in terms.items() if k != "fused"]
        parts = [terms["fused"], torch.stack(rest).sum()]
        grads = []
        for i, loss in enumerate(parts):
            g = torch.autograd.grad(loss, self._params, retain_graph=i == 0, allow_unused=True)
            grads.append([torch.zeros_like(p) if gi is None else gi for p, gi in zip(self._params, g)])
        if self._grads is None:
            self._grads = (grads[0], grads[1])
        else:  # gradient accumulation: sum the micro-batches' (already 1/accum-scaled) gradients
            for acc, new in zip(self._grads, grads):
                for a, n in zip(acc, new):
                    a.add_(n)
        return True

    def _global(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Both gradient lists averaged over DDP ranks, in one all-reduce."""
        fused, rest = self._grads
        both = average_over_ranks(fused + rest)
        return both[:len(fused)], both[len(fused):]

    def after_backward(self, model, step: Step) -> None:
        if self._grads is None:
            return
        fused, rest = self._global()
        index = {id(p): i for i, p in enumerate(self._params)}
        own = set()
        for m in self.modalities:
            ids = [index[id(p)] for p in model.modality_parameters(m) if id(p) in index]
            own.update(ids)
            g_mm = torch.cat([fused[i].reshape(-1) for i in ids])
            g_u = torch.cat([rest[i].reshape(-1) for i in ids])
            k_mm, k_u, cos = pareto_weights(g_mm, g_u)
            for i in ids:
                self._params[i].grad = combine(fused[i], rest[i], (k_mm, k_u), self.params.gamma)
            for key, v in ((f"mmpareto_cos_{m}", cos), (f"mmpareto_k_fused_{m}", k_mm),
                           (f"mmpareto_conflict_{m}", float(cos <= 0))):
                self.epoch_stats.setdefault(key, []).append(v)
        for i, p in enumerate(self._params):
            if i not in own:  # shared parameters: the plain sum of every term's gradient
                p.grad = fused[i] + rest[i]
        self._grads = None

    def on_epoch_end(self, model, epoch, evaluate) -> dict[str, float]:
        """Epoch means over the updates: cosine, the fused loss's weight, the share of conflicting updates."""
        out = {k: sum(v) / len(v) for k, v in self.epoch_stats.items() if v}
        self.epoch_stats = {}
        return out
