"""The gradient strategies of Fig. 2 as plug-ins (paper section III-B): a from the contributions W
(eq 12), and after backward every parameter of modality m's branch scaled by (1 + η·a_m) (eq 14).

- `cal` (Strong): a = softmax(T·W); `weak`: a = softmax(−T·W) (reverses cal's ranking);
- `null`: a_m = 1/M (uniform additive boost); `none`: plain joint training (a = 0, nothing scaled).

Before the first refresh a is uniform for cal/weak (softmax of zeros). `method.warmup_epochs`: no
modulation in the first epochs (a is still refreshed and logged).
"""

from __future__ import annotations

from calray.method.base import Method, Step
from calray.method.modulation import contribution_softmax, scale_gradients
from calray.registry import STRATEGIES


class ContributionModulation(Method):
    """Eq 12–14 with a rule W → a given by `coefficients`."""

    modulates = True  # the gradient is rescaled: an adaptive optimiser undoes it (calray.engine.optim)
    unimodal_gradients = False  # the statistics read the unimodal logits' values only

    def __init__(self, cfg, modalities, context):
        super().__init__(cfg, modalities, context)
        self.a = self.coefficients({m: 0.0 for m in self.modalities})
        self.last_applied: dict[str, float] = {}  # the scale per modality of the last update ({} if none)

    def coefficients(self, W: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def on_contributions(self, W: dict[str, float]) -> dict[str, dict[str, float]]:
        self.a = self.coefficients(W)
        return {"a": dict(self.a)}

    def after_backward(self, model, step: Step) -> None:
        active = step.epoch >= self.cfg.method.warmup_epochs
        self.last_applied = scale_gradients(model, self.a, self.cfg.method.eta) if active else {}

    def state_dict(self) -> dict:
        return {"a": dict(self.a)}

    def load_state_dict(self, state: dict) -> None:
        self.a = dict(state["a"])


@STRATEGIES.register("cal")
class Cal(ContributionModulation):
    """Strong: a = softmax(T·W)."""

    def coefficients(self, W):
        return contribution_softmax(W, self.cfg.method.T)


@STRATEGIES.register("null")
class Null(ContributionModulation):
    """a_m = 1/M whatever W."""

    def coefficients(self, W):
        return {m: 1.0 / len(W) for m in W}


@STRATEGIES.register("weak")
class Weak(ContributionModulation):
    """a = softmax(−T·W): the least contributing modality gets the largest boost."""

    def coefficients(self, W):
        return contribution_softmax(W, -self.cfg.method.T)


@STRATEGIES.register("none")
class NoModulation(ContributionModulation):
    """Plain joint training: a = 0, gradients untouched."""

    modulates = False

    def coefficients(self, W):
        return {m: 0.0 for m in W}

    def after_backward(self, model, step: Step) -> None:
        self.last_applied = {}
