"""The method plug-in interface: what a training method may do to the one loop.

Composer's algorithms-on-events, cut to the hook points the paper's methods and baselines need. The
loop (calray.engine.trainer) calls, for every plug-in of the run in order:

per step
    `loss_terms(step, terms)`  edit the named, already-weighted loss terms before they are summed —
                               add one (AIB, PMR's prototype loss, QMF's ranking term), reweight
                               (Grad-Blending's per-head weights) or keep a subset (MLA's
                               alternating unimodal step);
    `backward(terms, model)`   optionally run the backward pass itself (MMPareto combines two
                               gradients per encoder); return True when it did;
    `after_backward(model, step)`  edit gradients after backward, before clipping and the
                               optimiser step, on the accumulated gradient (eq 14, OGM-GE, AGM);
at each contribution refresh (epoch end, or every `method.update_every` steps)
    `on_contributions(W)`      react to the all-reduced modality contributions W (eq 1); return the
                               per-modality values to log, which ranks must agree on ({"a": {...}});
at each epoch end
    `on_epoch_end(model, epoch, evaluate)`  edit the model (D&R's re-initialisation) or re-estimate
                               from held-out data (`evaluate("val")` runs the loop's evaluation,
                               with per-head losses `loss_<m>`); returns scalars to log;
                               `context.embeddings(split)` gives a split's embeddings (PMR);
for checkpoints
    `state_dict()` / `load_state_dict(state)`.

A plug-in class may also set `needs_sample_index = True`: the trainer then wraps the training set
(calray.data.indexed.WithIndex) so each batch also carries its samples' indices into the training
split, seen by the per-step hooks as `step.indices` (None otherwise). The index is the GLOBAL one on
every DDP rank (the sampler shards positions of one dataset), so a per-sample history kept by a
method (QMF's loss history) can be all-reduced/gathered consistently.

A plug-in class may set `own_backward = True` when its `backward` computes gradients with
torch.autograd.grad (MMPareto's per-loss gradients, MLA's per-modality steps): DDP's reducer hooks do
not fire then, so the trainer runs every step's forward and backward under DDP's `no_sync` and the
plug-in itself averages the gradients over ranks (calray.dist.all_reduce_sum / world_size) before
anything nonlinear is computed from them, once per optimiser update (in `after_backward`), so 2 workers
× batch b compute what 1 process × 2b does. Every parameter's `.grad` must be synchronised by it.

A gradient strategy may set `unimodal_gradients = False` when it puts neither the unimodal logits nor
their cross-entropies into the loss (it may read their values, as CAL's statistics and OGM-GE's scores
do). With `method.unimodal_weight: 0` and `method.aib: off` the model then computes the unimodal logits
without autograd (`unimodal_logits_need_grad`): no backward through terms weighted 0 — for a joint
encoder (MMBT) two of its three passes.

Every hook defaults to doing nothing, so a plug-in implements only what its method does. A
plug-in registers itself by name in a registry (calray.registry), and `create_methods` builds the
run's plug-ins from the config: the gradient strategy (`method.strategy`) and the AIB.

A plug-in's own hyper-parameters are a pydantic model it declares as `Params` (a subclass of
calray.config.Strict, every field with the reference code's default); the user sets them under
`method.params` (`--set method.params.alpha=0.5`, sweep space key `method.params.alpha`), the config
validates them against the selected strategy's `Params` when it is loaded, and the plug-in reads
`self.params`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from calray.errors import ConfigError


@dataclass
class Step:
    """What the per-step hooks see. `log` collects detached scalars for the epoch means
    (`train_<name>` in metrics.jsonl)."""

    epoch: int
    step: int
    labels: torch.Tensor
    out: object  # calray.models.multimodal.ModelOutput
    ce: dict[str, torch.Tensor]  # CE(p^m, y) per modality, unweighted (eq 21)
    log: dict[str, torch.Tensor] = field(default_factory=dict)
    indices: torch.Tensor | None = None  # the batch's training-set indices (needs_sample_index), else None


Evaluate = Callable[[str], dict]  # split name → that split's metrics (the loop's evaluation)


class Method:
    """Base plug-in: every hook a no-op."""

    name = "base"
    Params = None  # a calray.config.Strict model of `method.params`, or None: the method takes none
    unimodal_gradients = True  # the loss may use the unimodal logits / CEs (see the module docstring)

    def __init__(self, cfg, modalities: list[str], context: "MethodContext"):
        self.cfg = cfg
        self.modalities = list(modalities)
        self.context = context
        self.params = self.Params.model_validate(cfg.method.params) if self.Params is not None else None

    def loss_terms(self, step: Step, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return terms

    def backward(self, terms: dict[str, torch.Tensor], model) -> bool:
        return False

    def after_backward(self, model, step: Step) -> None:
        return None

    def on_contributions(self, W: dict[str, float]) -> dict[str, dict[str, float]]:
        return {}

    def on_epoch_end(self, model, epoch: int, evaluate: Evaluate) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


@dataclass
class MethodContext:
    """What a plug-in may know about the run beyond its config."""

    seed: int
    train_class_counts: list[int]  # label histogram of the training split (H(Y) of eq 19–20)
    num_classes: int
    steps_per_epoch: int | None = None  # training batches per epoch (set by the trainer once its loaders exist)
    # split name → (embeddings {m: N×d} as the fusion sees them, labels N) of THIS rank's shard of the
    # split, the model in eval mode and back in train mode after (PMR's class prototypes); all-reduce
    # what you compute from it. None outside the trainer.
    embeddings: Callable[[str], tuple[dict[str, torch.Tensor], torch.Tensor]] | None = None


def require_base_loss(cfg, strategy: str, unimodal_weight: float | None, published_as: str) -> None:
    """A baseline's published base loss: method.aib off and method.unimodal_weight equal to
    `unimodal_weight` (0: the fused cross-entropy only; None: any weight > 0), else one ConfigError
    naming both keys. `published_as` completes "strategy X is published as …"."""
    m = cfg.method
    weight_ok = m.unimodal_weight > 0 if unimodal_weight is None else m.unimodal_weight == unimodal_weight
    if m.aib != "off" or not weight_ok:
        want = "> 0" if unimodal_weight is None else f": {unimodal_weight:g}"
        raise ConfigError(f"strategy {strategy!r} is published as {published_as}, but method.aib is {m.aib!r} and "
                          f"method.unimodal_weight is {m.unimodal_weight:g}: set method.aib: off and "
                          f"method.unimodal_weight{want}")
