"""PMR — prototypical modal rebalance (Fan et al., "PMR: Prototypical Modal Rebalance for Multimodal
Learning", CVPR 2023; reference fanyunfeng-bit/Modal-Imbalance-PMR main_Prototype_grad.py
`calculate_prototype` / `train_epoch`, also GeWu-Lab/BalanceBenchmark balancemm/trainer/PMR_trainer.py).

- Prototypes c^m_k: per modality, the class means of the embeddings over the training split (eval
  mode), computed for the initial model (at the first step, before its update) and after every
  epoch, with momentum μ: c ← (1 − μ)·mean + μ·c (`class_means`, sums all-reduced over DDP ranks).
- Prototype logits: −‖h^m_i − c^m_k‖₂ (`prototype_logits`); the prototype cross-entropy
  L^m_PCE = CE(−d, y); the score ŝ_m = Σ_i softmax(−d^m_i)[y_i] (all-reduced).
- Inside the epoch window: the modalities whose ŝ is below the largest (two modalities: ratio
  ŝ_a/ŝ_v < 1 → audio, > 1 → visual, = 1 → neither) get α·L_PCE added; the loss is
  CE(p^f) + α·Σ_{weak m} L^m_PCE (`"proto"` term). Fused CE only otherwise: requires method.aib: off,
  method.unimodal_weight: 0.

Deviations (docs/baselines/pmr.md): prototypes from the whole training split instead of the reference's
first tenth of a shuffled pass; no entropy regulariser (neither reference code has one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from calray.config import Strict
from calray.dist import all_reduce_sum
from calray.errors import ConfigError
from calray.method.base import Method, Step, require_base_loss
from calray.registry import STRATEGIES

DIST_EPS = 1e-12  # ‖·‖² floor under the square root: a finite gradient at zero distance


def prototype_logits(h: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """−‖h_i − c_k‖₂, B×K."""
    return -(h.float()[:, None, :] - protos[None]).pow(2).sum(-1).clamp(min=DIST_EPS).sqrt()


@torch.no_grad()
def class_means(embs: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int,
                previous: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Per-class mean embedding per modality, from sums and counts all-reduced over ranks; a class
    with no sample keeps its previous prototype (zeros at first)."""
    mods = list(embs)
    counts = torch.bincount(labels.long(), minlength=num_classes).double()
    sums = [torch.zeros(num_classes, embs[m].shape[1], dtype=torch.float64, device=labels.device)
            .index_add_(0, labels.long(), embs[m].double()) for m in mods]
    flat = all_reduce_sum(torch.cat([s.flatten() for s in sums] + [counts.to(labels.device)]))
    counts = flat[-num_classes:]
    out, offset = {}, 0
    for m, s in zip(mods, sums):
        total = flat[offset:offset + s.numel()].view_as(s)
        offset += s.numel()
        mean = (total / counts.clamp(min=1)[:, None]).float()
        fallback = previous[m] if previous is not None else torch.zeros_like(mean)
        out[m] = torch.where((counts > 0)[:, None], mean, fallback)
    return out


@STRATEGIES.register("pmr")
class Pmr(Method):
    """PMR as published: fused CE + α·prototype CE of the weak modality (module docstring)."""

    class Params(Strict):
        alpha: float = Field(1.0, ge=0.0)  # main_Prototype_grad.py --alpha (shipped scripts: 1–3)
        momentum_coef: float = Field(0.2, ge=0.0, le=1.0)  # --momentum_coef (shipped scripts: 0.0)
        modulation_starts: int = Field(0, ge=0)  # --modulation_starts (inclusive)
        modulation_ends: int = Field(100, ge=0)  # --modulation_ends (inclusive)

    def __init__(self, cfg, modalities, context):
        super().__init__(cfg, modalities, context)
        if len(self.modalities) < 2:
            raise ConfigError("strategy 'pmr' needs at least two modalities")
        require_base_loss(cfg, "pmr", 0, "the fused cross-entropy only")
        self.protos: dict[str, torch.Tensor] | None = None
        self.last_scores: dict[str, float] = {}

    def refresh_prototypes(self) -> None:
        embs, labels = self.context.embeddings("train")
        means = class_means(embs, labels, self.context.num_classes, self.protos)
        mu = self.params.momentum_coef
        if self.protos is None:
            self.protos = means
        else:
            self.protos = {m: (1.0 - mu) * means[m] + mu * self.protos[m].to(means[m].device) for m in means}

    def loss_terms(self, step: Step, terms):
        if self.protos is None:  # the initial model's prototypes (the reference: before epoch 0)
            self.refresh_prototypes()
        p = self.params
        if not (p.modulation_starts <= step.epoch <= p.modulation_ends):
            return terms
        y = step.labels
        sims = {m: prototype_logits(step.out.embeddings[m], self.protos[m].to(y.device)) for m in self.modalities}
        scores = all_reduce_sum(torch.stack([F.softmax(sims[m].detach(), 1).gather(1, y[:, None]).sum()
                                             for m in self.modalities]).double())
        self.last_scores = {m: float(s) for m, s in zip(self.modalities, scores)}
        best = max(self.last_scores.values())
        weak = [m for m in self.modalities if self.last_scores[m] < best]
        if not weak:
            return terms
        return {**terms, "proto": p.alpha * sum(F.cross_entropy(sims[m], y) for m in weak)}

    def on_contributions(self, W):
        return {"a": {m: 0.0 for m in self.modalities}}  # no contribution softmax: logged as 0

    def on_epoch_end(self, model, epoch, evaluate):
        self.refresh_prototypes()
        total = sum(self.last_scores.values()) or 1.0
        return {f"pmr_score_{m}": s / total for m, s in self.last_scores.items()}

    def state_dict(self) -> dict:
        return {"protos": None if self.protos is None else {m: t.cpu() for m, t in self.protos.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.protos = state["protos"]
