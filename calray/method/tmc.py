"""TMC (Trusted Multi-View Classification, Han et al., ICLR 2021) as a plug-in: the evidential loss.

Reference: hanmenghan/TMC (`TMC ICLR/model.py`: ce_loss, KL) and the NYUD2 / MVSA-Single TMC baselines of
QingyangZhang/QMF (`RGBD-scene-recognition/train_TMC_nyud2.py`, `text-image-classification/train_tmc.py`).
With the `tmc` fusion (calray.models.tmc), per modality m and for the Dempster–Shafer combination a:

    L(α) = Σ_k y_k (ψ(S) − ψ(α_k)) + min(1, t / annealing_epochs) · KL(Dir(α̃) ‖ Dir(1)),
    α̃ = y + (1 − y) ⊙ α,   L_TMC = mean_batch [Σ_m L(α_m) + L(α_a)],

t the 0-based epoch (the reference's i_epoch). These terms replace eq 21's cross-entropies (TMC trains
on nothing else), so the run must use `model.fusion: tmc`, shared unimodal heads and `method.aib: off`.
docs/baselines/tmc.md lists the deviations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from calray.config import Strict
from calray.errors import ConfigError
from calray.method.base import Method, Step
from calray.models.tmc import dirichlet_alpha
from calray.registry import STRATEGIES


def kl_to_uniform_dirichlet(alpha: torch.Tensor) -> torch.Tensor:
    """KL(Dir(α) ‖ Dir(1, …, 1)) per row."""
    k = alpha.shape[1]
    s = alpha.sum(1)
    log_norm = torch.lgamma(s) - torch.lgamma(alpha).sum(1) - torch.lgamma(alpha.new_tensor(float(k)))
    return log_norm + ((alpha - 1) * (torch.digamma(alpha) - torch.digamma(s)[:, None])).sum(1)


def evidential_loss(alpha: torch.Tensor, labels: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """TMC's per-opinion loss (expected CE under Dir(α) + annealed KL of the misleading evidence), batch mean."""
    y = F.one_hot(labels, alpha.shape[1]).to(alpha.dtype)
    expected_ce = (y * (torch.digamma(alpha.sum(1, keepdim=True)) - torch.digamma(alpha))).sum(1)
    alpha_tilde = y + (1 - y) * alpha
    return (expected_ce + kl_coef * kl_to_uniform_dirichlet(alpha_tilde)).mean()


@STRATEGIES.register("tmc")
class TMC(Method):
    class Params(Strict):
        annealing_epochs: int = Field(10, ge=1)  # QMF's TMC baselines: args.annealing_epoch = 10 (TMC ICLR: lambda_epochs)

    def __init__(self, cfg, modalities, context):
        super().__init__(cfg, modalities, context)
        if cfg.model.fusion != "tmc" or cfg.model.unimodal_head != "shared" or cfg.method.aib != "off":
            raise ConfigError(f"method.strategy: tmc needs model.fusion: tmc (got {cfg.model.fusion!r}), "
                              f"model.unimodal_head: shared (got {cfg.model.unimodal_head!r}) and method.aib: off "
                              f"(got {cfg.method.aib!r}): its evidential loss is on the tmc fusion's Dirichlet opinions")
        self.evidence = cfg.model.fusion_params.get("evidence", "softplus")

    def on_contributions(self, W):
        return {"a": {m: 0.0 for m in self.modalities}}  # no contribution-softmax a: logged as 0

    def loss_terms(self, step: Step, terms):
        coef = min(1.0, step.epoch / self.params.annealing_epochs)
        out = {f"tmc_{m}": evidential_loss(dirichlet_alpha(step.out.unimodal_logits[m].float(), self.evidence),
                                           step.labels, coef) for m in self.modalities}
        out["tmc_fused"] = evidential_loss(step.out.fused_repr.float(), step.labels, coef)  # the combined α
        step.log.update({f"loss_{k}": v.detach() for k, v in out.items()})
        return out
