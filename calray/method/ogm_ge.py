"""OGM-GE (Peng et al., CVPR 2022; reference GeWu-Lab/OGM-GE_CVPR2022 main.py) as plug-ins.

After backward, inside the epoch window `method.ogm_epochs` (inclusive), the dominant modality's
weight-matrix gradients are scaled by k = 1 − tanh(α·ρ) (`ogm_coefficients`, from the batch's
confidence scores all-reduced over ranks) and, with GE, N(0, std(g)²) noise is added to every
modality's (`apply_ogm_ge`). `ogm_ge` is the published method, whose loss is the fused CE only (the
config requires `aib: off`, `unimodal_weight: 0`); `ogm_ge_mix` is the same rule inside whatever loss
is configured. docs/METHOD.md lists the deviations from the reference.
"""

from __future__ import annotations

import torch

from calray.dist import all_reduce_sum
from calray.method.base import Method, Step
from calray.method.modulation import apply_ogm_ge, ogm_coefficients, ogm_scores
from calray.registry import STRATEGIES

GENERATOR_OFFSET = 7919  # the GE noise generator is seeded from runtime.seed + this, on every rank


class OnTheFlyModulation(Method):
    modulates = True
    unimodal_gradients = False  # the scores read the unimodal logits' values only

    def __init__(self, cfg, modalities, context):
        super().__init__(cfg, modalities, context)
        self.a = {m: 0.0 for m in self.modalities}  # no contribution-softmax a: logged as 0
        self.generator = torch.Generator().manual_seed(context.seed + GENERATOR_OFFSET)
        self.last_applied: dict[str, float] = {}  # k per modality of the last update ({} outside the window)

    def on_contributions(self, W):
        return {"a": dict(self.a)}

    def after_backward(self, model, step: Step) -> None:
        m = self.cfg.method
        start, end = m.ogm_epochs
        self.last_applied = {}
        if step.epoch < m.warmup_epochs or not (start <= step.epoch <= end):
            return
        unimodal = step.out.unimodal_logits
        scores = all_reduce_sum(ogm_scores(unimodal, step.labels).to(step.labels.device))  # same k on every rank
        k = ogm_coefficients({mod: float(s) for mod, s in zip(unimodal, scores)}, m.ogm_alpha, m.ogm_continuous)
        apply_ogm_ge(model, k, m.ogm_ge_noise, self.generator)
        self.last_applied = {f"k_{mod}": v for mod, v in k.items()}

    def state_dict(self) -> dict:
        return {"a": dict(self.a), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.a = dict(state["a"])
        self.generator.set_state(state["generator"])


@STRATEGIES.register("ogm_ge")
class OgmGe(OnTheFlyModulation):
    """OGM-GE as published: fused cross-entropy only."""


@STRATEGIES.register("ogm_ge_mix")
class OgmGeMix(OnTheFlyModulation):
    """OGM-GE's modulation inside the configured loss (a mixture, not the baseline)."""
