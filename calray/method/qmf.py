"""QMF (Quality-aware Multimodal Fusion, Zhang et al., ICML 2023) as a plug-in: the ranking regulariser.

Reference: QingyangZhang/QMF — `RGBD-scene-recognition/train_QMF_nyud2.py` (rank_loss, model_forward_train),
`RGBD-scene-recognition/utils/crl_utils.py` (History), `text-image-classification/train_qmf.py`. With the
`qmf` fusion (calray.models.qmf) the loss is eq 21's CE(fused) + Σ_m CE(p^m) plus, per modality m,

    H_m[i] += CE(p^m_i, y_i)   (the cumulative per-sample loss over the run, keyed by sample index),
    ĉ = (H_m − min H_m)/(max H_m − min H_m),   pair each batch sample i with i+1 (cyclically):
    L_rank,m = mean_i relu( sign(ĉ_i − ĉ_{i+1}) · (c_m,i − c_m,i+1) − |ĉ_i − ĉ_{i+1}| ),

c_m = 0.1·logsumexp(f_m) the energy confidence: a sample with the larger loss history should not be the
more confident one (by more than the margin). Total: CE terms + λ · Σ_m L_rank,m (λ 0.1 NYUD2, 1 MVSA).
This is the reference's MarginRankingLoss(margin 0) on (c_i, c_{i+1} + margin/target, −target) in
closed form. Under DDP the batch is the global one: confidences, indices and losses are gathered in the
single-process order (calray.data.sampling interleaves ranks), every rank keeps the same history, and
each rank's gradient is the global loss's gradient on its own samples. docs/baselines/qmf.md lists the
deviations.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field

from calray.config import Strict
from calray.dist import all_reduce_sum, is_distributed
from calray.errors import ConfigError
from calray.method.base import Method, Step
from calray.models.qmf import energy_confidence
from calray.registry import STRATEGIES


def global_batch(x: torch.Tensor, own: torch.Tensor | None = None) -> torch.Tensor:
    """The global batch (W·b, …) of a per-rank tensor (b, …), in one process's order (position j·W + rank).
    `own`: this rank's rows with their autograd graph (the other ranks' rows are constants)."""
    if not is_distributed():
        return x if own is None else own
    world, rank = dist.get_world_size(), dist.get_rank()
    buf = x.new_zeros((x.shape[0], world) + tuple(x.shape[1:]))
    buf[:, rank] = x
    buf = all_reduce_sum(buf)
    if own is not None:
        buf = buf.clone()
        buf[:, rank] = own
    return buf.flatten(0, 1)


def normalised_history(history: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(H[idx] − min H)/(max H − min H); zeros while the history is flat (no ranking signal yet)."""
    lo, hi = history.min(), history.max()
    if hi <= lo:
        return torch.zeros(len(idx), dtype=history.dtype)
    return (history[idx] - lo) / (hi - lo)


def ranking_loss(conf: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
    """QMF's margin ranking loss between each sample and the next one of the batch (cyclic)."""
    diff = hist - hist.roll(-1)
    target, margin = torch.sign(diff), diff.abs()
    return F.relu(target * (conf - conf.roll(-1)) - margin).mean()


@STRATEGIES.register("qmf")
class QMF(Method):
    needs_sample_index = True

    class Params(Strict):
        rank_weight: float = Field(0.1, ge=0.0)  # λ: NYUD2 reference --lamb 0.1; MVSA reference adds it with weight 1
        history_first: bool = False  # add this batch's losses to the history before ranking (MVSA) or after (NYUD2)

    def __init__(self, cfg, modalities, context):
        super().__init__(cfg, modalities, context)
        if (cfg.model.fusion != "qmf" or cfg.model.unimodal_head != "shared" or cfg.method.aib != "off"
                or cfg.method.unimodal_weight != 1):
            raise ConfigError(f"method.strategy: qmf needs model.fusion: qmf (got {cfg.model.fusion!r}), "
                              f"model.unimodal_head: shared, method.aib: off (got {cfg.method.aib!r}) and "
                              f"method.unimodal_weight: 1 (got {cfg.method.unimodal_weight:g}): QMF's loss is "
                              "CE(fused) + Σ_m CE(p^m) + λ·ranking on the qmf fusion's confidences")
        self.scale = float(cfg.model.fusion_params.get("conf_scale", 0.1))
        n_train = int(sum(context.train_class_counts))
        self.history = {m: torch.zeros(n_train, dtype=torch.float64) for m in self.modalities}

    def on_contributions(self, W):
        return {"a": {m: 0.0 for m in self.modalities}}  # no contribution-softmax a: logged as 0

    def loss_terms(self, step: Step, terms):
        if step.indices is None:
            raise ConfigError("method.strategy: qmf needs the batch's sample indices (needs_sample_index)")
        idx = global_batch(step.indices.to(step.labels.device)).cpu()
        total = 0
        for m in self.modalities:
            logits = step.out.unimodal_logits[m].float()
            conf = energy_confidence(logits, self.scale)
            losses = global_batch(F.cross_entropy(logits, step.labels, reduction="none").detach()).double().cpu()
            if self.params.history_first:
                self.history[m].index_add_(0, idx, losses)
            hist = normalised_history(self.history[m], idx).to(conf.device, conf.dtype)
            rank = ranking_loss(global_batch(conf.detach(), own=conf), hist)
            if not self.params.history_first:
                self.history[m].index_add_(0, idx, losses)
            step.log[f"rank_{m}"] = rank.detach()
            total = total + rank
        world = dist.get_world_size() if is_distributed() else 1
        # value: the global ranking loss; gradient: world × this rank's share, so DDP's mean is the global gradient
        total = total.detach() + world * (total - total.detach()) if world > 1 else total
        return {**terms, "rank": self.params.rank_weight * total}

    def state_dict(self) -> dict:
        return {"history": {m: h.clone() for m, h in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.history = {m: h.clone().to(torch.float64) for m, h in state["history"].items()}
