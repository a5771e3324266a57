"""Gradient-Blending (Wang, Tran, Feiszli, "What Makes Training Multi-modal Classification Networks
Hard?", CVPR 2020), online variant; reference GeWu-Lab/BalanceBenchmark balancemm/trainer/
GBlending_trainer.py (`super_epoch_origin`, `training_step`) and configs/trainer_config.yaml.

Loss Σ_h w_h·CE(p^h, y) over the heads h ∈ {fused, each modality's unimodal head}; the weights start
uniform (1/(M+1)). Every `super_epoch` epochs (at the end of epochs 0, k, 2k, …) the loop's evaluation
gives each head's loss on the training split (L^T) and on the validation split (L^V); between two
such checkpoints, G_h = L^V_prev − L^V_now (generalisation gain), O = L^V − L^T (overfitting),
ΔO_h = O_now − O_prev, and w_h ∝ max(G_h, 0) / max(ΔO_h², eps), normalised to sum 1 (`blend_weights`;
all zero: the weights are kept). The evaluation is all-reduced, so every rank gets the same w.
The plug-in sets both base terms itself: it requires method.aib: off and method.unimodal_weight 1.
"""

from __future__ import annotations

from pydantic import Field

from calray.config import Strict
from calray.method.base import Method, Step, require_base_loss
from calray.registry import STRATEGIES

FUSED = "fused"


def blend_weights(prev: dict[str, tuple[float, float]], now: dict[str, tuple[float, float]],
                  eps: float) -> dict[str, float] | None:
    """w_h ∝ max(G_h, 0)/max(ΔO_h², eps) from (train loss, val loss) per head at two checkpoints."""
    raw = {}
    for h, (train_now, val_now) in now.items():
        train_prev, val_prev = prev[h]
        gain = val_prev - val_now
        d_over = (val_now - train_now) - (val_prev - train_prev)
        raw[h] = max(gain, 0.0) / max(d_over * d_over, eps)
    total = sum(raw.values())
    return None if total <= 0.0 else {h: v / total for h, v in raw.items()}


@STRATEGIES.register("gblending")
class GBlending(Method):
    """Online Gradient-Blending: per-head loss weights from held-out loss deltas (module docstring)."""

    class Params(Strict):
        super_epoch: int = Field(10, ge=1)  # BalanceBenchmark GBlending.super_epoch: epochs between estimates
        eps: float = Field(1e-8, gt=0.0)  # floor of ΔO² (a head that does not start to overfit)

    def __init__(self, cfg, modalities, context):
        super().__init__(cfg, modalities, context)
        require_base_loss(cfg, "gblending", 1, "the fused and unimodal losses, which it weights itself")
        heads = [FUSED, *self.modalities]
        self.weights = {h: 1.0 / len(heads) for h in heads}
        self.anchor: dict[str, tuple[float, float]] | None = None  # (L^T, L^V) per head at the last estimate

    def loss_terms(self, step: Step, terms):
        w = self.weights
        unimodal = sum(w[m] * step.ce[m] for m in self.modalities)
        return {**terms, "fused": w[FUSED] * terms["fused"], "unimodal": unimodal}

    def on_epoch_end(self, model, epoch, evaluate):
        if epoch % self.params.super_epoch == 0:
            train, val = evaluate("train"), evaluate("val")
            keys = {FUSED: "loss", **{m: f"loss_{m}" for m in self.modalities}}
            now = {h: (float(train[k]), float(val[k])) for h, k in keys.items()}
            if self.anchor is not None:
                self.weights = blend_weights(self.anchor, now, self.params.eps) or self.weights
            self.anchor = now
        return {f"gblending_w_{h}": w for h, w in self.weights.items()}

    def on_contributions(self, W):
        return {"a": {m: 0.0 for m in self.modalities}}  # no contribution softmax: logged as 0

    def state_dict(self) -> dict:
        return {"weights": dict(self.weights), "anchor": self.anchor}

    def load_state_dict(self, state: dict) -> None:
        self.weights = dict(state["weights"])
        self.anchor = None if state["anchor"] is None else {h: tuple(v) for h, v in state["anchor"].items()}
