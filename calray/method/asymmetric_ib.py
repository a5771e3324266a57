"""The contribution-aware asymmetric information bottleneck (paper section III-C) as a plug-in.

At each refresh: a_β = softmax(beta_T·W) (beta_T defaults to the modulation's T) and β = 1 − a_β
(eq 17, `compression_factors`). Per step, when the model has AIB heads (`method.aib` not off):
λ·L_AIB with the Table IV weights (`aib_weights`) and the eq 19 / eq 20 placement (`aib_loss`),
where I(Z_m;X_m) ≤ KL(q(z_m|x_m) ‖ N(0, I)) and I(Z_m;Y) ≥ H(Y) − CE(p^m, y) with H(Y) from the
training labels. The plug-in is part of every run that tracks contributions, so β is logged also
with the AIB off (and whatever the gradient strategy: Table IV's ablation is `none` + an AIB mode).
"""

from __future__ import annotations

from calray.method.aib import aib_loss, aib_weights, compression_factors, kl_to_standard_normal, label_entropy
from calray.method.base import Method, Step
from calray.method.modulation import contribution_softmax


class AsymmetricIB(Method):
    name = "aib"

    def __init__(self, cfg, modalities, context):
        super().__init__(cfg, modalities, context)
        self.h_y = label_entropy(context.train_class_counts)
        self.a = {m: 1.0 / len(self.modalities) for m in self.modalities}  # uniform until the first refresh

    @property
    def a(self) -> dict[str, float]:
        return self._a

    @a.setter
    def a(self, a: dict[str, float]) -> None:  # β and Table IV's weights follow a (fixed until the next refresh)
        self._a = a
        self.beta = compression_factors(a)
        self.weights = aib_weights(a, self.cfg.method.aib)

    def on_contributions(self, W):
        m = self.cfg.method
        self.a = contribution_softmax(W, m.T if m.beta_T is None else m.beta_T)
        return {"beta": dict(self.beta)}

    def loss_terms(self, step: Step, terms):
        out = step.out
        if not out.mu:
            return terms
        m = self.cfg.method
        kl = {k: kl_to_standard_normal(out.mu[k].float(), out.logvar[k].float()) for k in out.mu}
        l_aib = aib_loss(kl, step.ce, self.h_y, self.weights, m.aib_placement)
        step.log["loss_aib"] = l_aib.detach()
        step.log.update({f"aib_kl_{k}": v.detach() for k, v in kl.items()})  # who is compressed
        return {**terms, "aib": m.lambda_ * l_aib}

    def state_dict(self) -> dict:
        return {"a": dict(self.a)}

    def load_state_dict(self, state: dict) -> None:
        self.a = dict(state["a"])
