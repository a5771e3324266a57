"""MLA (Zhang, Latham, Yao: "Multimodal Representation Learning by Alternating Unimodal Adaptation",
CVPR 2024) as a strategy plug-in; its shared head and test-time fusion are the `mla` fusion
(calray/models/mla.py).

Reference code (read, not copied): Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation —
main.py (`train_epoch`, the `gs_flag` branch: per batch, for each modality in turn, CE(head(h_m)) →
backward → `GSPlugin.before_update` → optimizer.step()), utils/utils.py (`GSPlugin`).

The gradient modification (GSPlugin.before_update), per modality step, except the very first of the run:
  r = batch mean of h_m (1×d), k = P·rᵀ, P ← P − k·kᵀ/(α + r·k), P ← P/‖P‖_F, ∇W ← ∇W·Pᵀ
for the shared head's weight W (K×d; the bias is not projected), P a d×d projector (identity at the
start) carried across modalities and steps, α = 0.1^(1 + step/steps_per_epoch).

In the one loop, one optimiser update per batch: the plug-in's `backward` takes each modality's
gradient (torch.autograd.grad of CE(head(h_m))) in modality order, updates P with that modality's
(global) batch mean and projects that modality's head gradient, and sums the modalities' gradients;
`after_backward` averages them over DDP ranks (`own_backward`) and writes `.grad`. The loss is the
modalities' unimodal CEs only (`loss_terms` replaces the loop's base terms).

Deviations (docs/baselines/mla.md): one optimiser step per batch with the sum of the modalities'
gradients, all taken at the same parameters, instead of M sequential steps per batch (each encoder's
gradient is exactly the reference's — only the shared head's differs, by the one-step lag); the
projection is applied although, as released, the reference's GSPlugin looks for a parameter named
"module.weight" on the bare head Linear (whose weight is named "weight"), so it never projects —
we implement the method the paper and GSPlugin describe.
"""

from __future__ import annotations

import torch

from calray.dist import all_reduce_sum, average_over_ranks
from calray.errors import ConfigError
from calray.method.base import Method, Step
from calray.registry import STRATEGIES

ALPHA_BASE = 0.1  # α = ALPHA_BASE^(1 + step/steps_per_epoch), the reference's `1.0 * 0.1 ** lamda`


def project(P: torch.Tensor, r: torch.Tensor, grad: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One GSPlugin step: the projector updated with the row r (1×d), normalised, and grad·Pᵀ."""
    k = P @ r.T
    P = P - (k @ k.T) / (alpha + r @ k)
    P = P / torch.linalg.matrix_norm(P)
    return P, grad @ P.T


@STRATEGIES.register("mla")
class MLA(Method):
    own_backward = True  # per-modality autograd.grad; the plug-in averages over DDP ranks itself

    def __init__(self, cfg, modalities, context):
        super().__init__(cfg, modalities, context)
        if cfg.model.fusion != "mla" or cfg.model.unimodal_head != "shared" or cfg.method.aib != "off":
            raise ConfigError("strategy 'mla' trains one head shared by the modalities: set model.fusion: mla, "
                              f"model.unimodal_head: shared and method.aib: off (got {cfg.model.fusion!r}, "
                              f"{cfg.model.unimodal_head!r}, {cfg.method.aib!r})")
        self.P: torch.Tensor | None = None  # the projector, d×d
        self.count = 0  # modality steps so far (GSPlugin.exp_count): the first one is not projected
        self._step: Step | None = None
        self._grads: list[torch.Tensor] | None = None
        self._params: list[torch.nn.Parameter] = []

    def on_contributions(self, W):
        return {"a": {m: 0.0 for m in self.modalities}}  # no contribution-softmax a: logged as 0

    def loss_terms(self, step: Step, terms):
        self._step = step
        return {f"unimodal_{m}": step.ce[m] for m in self.modalities}

    def _alpha(self, step: Step) -> float:
        per_epoch = self.context.steps_per_epoch or 1
        return ALPHA_BASE ** (step.step / per_epoch + 1.0)

    def backward(self, terms, model) -> bool:
        raw = getattr(model, "module", model)
        weight = raw.fusion.head.weight
        if not self._params:
            self._params = [p for p in raw.parameters() if p.requires_grad]
        w_index = next(i for i, p in enumerate(self._params) if p is weight)
        if self.P is None:
            self.P = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
        self.P = self.P.to(weight)  # after a resume: the checkpoint holds it on the CPU
        s, total = self._step, None
        for j, m in enumerate(self.modalities):
            g = torch.autograd.grad(terms[f"unimodal_{m}"], self._params, retain_graph=j + 1 < len(self.modalities),
                                    allow_unused=True)
            g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(self._params, g)]
            if self.count > 0:
                h = s.out.embeddings[m].detach()
                stats = all_reduce_sum(torch.cat([h.sum(0), h.new_tensor([len(h)])]))  # the global batch mean
                r = (stats[:-1] / stats[-1])[None, :].to(weight.dtype)
                self.P, g[w_index] = project(self.P, r, g[w_index], self._alpha(s))
            self.count += 1
            total = g if total is None else [a + b for a, b in zip(total, g)]
        if self._grads is None:
            self._grads = total
        else:  # gradient accumulation
            self._grads = [a + b for a, b in zip(self._grads, total)]
        return True

    def after_backward(self, model, step: Step) -> None:
        if self._grads is None:
            return
        for p, g in zip(self._params, average_over_ranks(self._grads)):
            p.grad = g
        self._grads = None

    def state_dict(self) -> dict:
        return {"P": None if self.P is None else self.P.detach().cpu(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.P = state["P"]
        self.count = state["count"]
