"""ARL — asymmetric representation learning (Wei, Luo, Luo, "Improving Multimodal Learning via Imbalanced
Learning", ICCV 2025, arXiv 2507.10203; reference shicaiwei123/ICCV2025-ARL main_arl_variance.py
`train_epoch`, models/backbone.py `GradScale`).

Loss: CE(p^f) + γ·Σ_m CE(p^m), the unimodal logits from the shared head (the fusion with the other
modalities zero-filled, ARL's definition); γ = 1 during the warm-up (epochs ≤ `start`).
Modality weights per update, from the batch's unimodal predictions (all-reduced over DDP ranks):
H_m = mean entropy of softmax(p^m) and A_m = mean Σ_k |p^m_k| (logit magnitude); the prediction
variance is estimated by the normalised entropy Ĥ_m = max(H_m / Σ_j H_j, floor); the score
s_m = ũ_m·(1 − Â_m), ũ = (1/Ĥ) normalised to sum 1, Â = A normalised (for two modalities
s_audio = Â_visual·ũ_audio, the reference's expression); w = softmax(T·s) (`arl_weights`).
After the warm-up every gradient of modality m's branch is multiplied by (1 + w_m)
(scale_gradients; the reference scales the encoder output's gradient, which is the same thing).

The released code computes w but never assigns it (reference issue #3), so there every encoder is
scaled by 1 + 0.5 after the warm-up; calray applies w as the paper says (docs/baselines/arl.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from calray.config import Strict
from calray.dist import all_reduce_sum
from calray.method.base import Method, Step, require_base_loss
from calray.method.modulation import scale_gradients
from calray.registry import STRATEGIES

ENTROPY_EPS = 1e-16  # the reference's log(p + 1e-16)


def arl_statistics(unimodal_logits: dict[str, torch.Tensor]) -> torch.Tensor:
    """[Σ_i H(softmax(p^m_i)) for m] + [Σ_i Σ_k |p^m_ik| for m], float64 sums over the batch."""
    ent, mag = [], []
    for logits in unimodal_logits.values():
        z = logits.detach().double()
        p = F.softmax(z, dim=1)
        ent.append((-p * torch.log(p + ENTROPY_EPS)).sum(1).sum())
        mag.append(z.abs().sum())
    return torch.stack(ent + mag)


def arl_weights(entropy: dict[str, float], magnitude: dict[str, float], T: float, floor: float) -> dict[str, float]:
    """w = softmax(T·s), s_m = ũ_m·(1 − Â_m) (module docstring), from the batch-mean statistics."""
    mods = list(entropy)
    h_sum, a_sum = sum(entropy.values()), sum(magnitude.values())
    h_norm = {m: max(entropy[m] / h_sum, floor) for m in mods}
    inv = {m: 1.0 / h_norm[m] for m in mods}
    inv_sum = sum(inv.values())
    score = torch.tensor([inv[m] / inv_sum * (1.0 - magnitude[m] / a_sum) for m in mods], dtype=torch.float64)
    w = torch.softmax(T * score, dim=0)
    return {m: float(v) for m, v in zip(mods, w)}


@STRATEGIES.register("arl")
class Arl(Method):
    """ARL as the paper states it (weights applied)."""

    modulates = True

    class Params(Strict):
        gamma: float = Field(1.0, ge=0.0)  # weight of Σ CE(p^m) after the warm-up (shipped: 4 CREMA-D, 5 AVE, 3 KS)
        T: float = Field(8.0, ge=0.0)  # softmax temperature (multiplies the scores; shipped: 8 CREMA-D, 4 AVE/KS)
        start: int = Field(5, ge=0)  # warm-up: epochs ≤ start train CE_f + Σ CE_m unscaled
        entropy_floor: float = Field(0.3, ge=0.0, lt=1.0)  # clamp of the normalised entropies

    def __init__(self, cfg, modalities, context):
        super().__init__(cfg, modalities, context)
        require_base_loss(cfg, "arl", 1, "CE_f + γ·Σ CE_m (γ = method.params.gamma)")
        self._sums: torch.Tensor | None = None  # this update's statistics (all micro-batches)
        self.last_weights = {mod: 0.0 for mod in self.modalities}

    def active(self, epoch: int) -> bool:
        return epoch > self.params.start

    def loss_terms(self, step: Step, terms):
        stats = torch.cat([arl_statistics(step.out.unimodal_logits),
                           torch.tensor([float(len(step.labels))], dtype=torch.float64, device=step.labels.device)])
        self._sums = stats if self._sums is None else self._sums + stats
        gamma = self.params.gamma if self.active(step.epoch) else 1.0
        return {**terms, "unimodal": gamma * sum(step.ce[mod] for mod in self.modalities)}

    def after_backward(self, model, step: Step) -> None:
        sums, self._sums = all_reduce_sum(self._sums), None  # the same w on every rank
        if not self.active(step.epoch):
            self.last_weights = {mod: 0.0 for mod in self.modalities}
            return
        M, n = len(self.modalities), float(sums[-1])
        entropy = {mod: float(sums[i]) / n for i, mod in enumerate(self.modalities)}
        magnitude = {mod: float(sums[M + i]) / n for i, mod in enumerate(self.modalities)}
        self.last_weights = arl_weights(entropy, magnitude, self.params.T, self.params.entropy_floor)
        scale_gradients(model, self.last_weights, 1.0)

    def on_contributions(self, W):
        return {"a": {mod: 0.0 for mod in self.modalities}}  # no contribution softmax: logged as 0

    def on_epoch_end(self, model, epoch, evaluate):
        return {f"arl_w_{mod}": w for mod, w in self.last_weights.items()}
