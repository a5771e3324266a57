"""Diagnosing & Re-learning (Wei, Li, Hu: "Diagnosing and Re-learning for Balanced Multimodal Learning",
ECCV 2024) as a strategy plug-in.

Reference code (read, not copied): GeWu-Lab/Diagnosing_Relearning_ECCV2024, code/ours.py (`purity_score`,
`reinit_score`, `reinit`, `get_feature`, the re-initialisation in `main`), code/script/ours.sh.

Every `reinit_epoch` epochs (after epochs 20, 40, … counted from 0, epoch 0 excluded), at most
`reinit_num` times: each modality's encoder features (what the fusion sees) over the training and the
validation split are min-max scaled to [−1, 1] (per feature, per set), clustered by k-means into K
clusters (K = the number of classes, random_state 0) and scored by purity against the labels; the
modality's learning state is the train/val purity gap, and its encoder is softly re-initialised
    θ_m ← α_m·θ_m⁰ + (1 − α_m)·θ_m,   α_m = tanh(move_lambda · |purity_train − purity_val|),
θ_m⁰ its parameters at initialisation (taken before the first optimiser step). Trained on the fused CE
only (the reference's loss), so the config must say so.

DDP: every rank holds a shard of each split (`MethodContext.embeddings`); the shards are gathered in
the split's order (calray.dist.gather_interleaved), so every rank clusters the same features and applies
the same α. docs/baselines/dr.md lists the deviations.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import Field
from sklearn.cluster import KMeans

from calray.config import Strict
from calray.dist import gather_interleaved
from calray.method.base import Method, Step, require_base_loss
from calray.registry import STRATEGIES


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Share of samples whose cluster's majority label is their own label."""
    hits = 0
    for c in np.unique(clusters):
        hits += np.bincount(labels[clusters == c]).max()
    return hits / len(labels)


def minmax(x: np.ndarray) -> np.ndarray:
    """Per-feature scaling to [−1, 1] (sklearn's MinMaxScaler: a constant feature maps to −1)."""
    lo, span = x.min(0), x.max(0) - x.min(0)
    return 2.0 * (x - lo) / np.where(span == 0, 1.0, span) - 1.0


def clustering_purity(features: torch.Tensor, labels: torch.Tensor, k: int, n_init: int) -> float:
    x = minmax(features.double().cpu().numpy())
    clusters = KMeans(n_clusters=k, random_state=0, n_init=n_init).fit_predict(x)
    return purity(labels.cpu().numpy(), clusters)


@STRATEGIES.register("dr")
class DiagnosingRelearning(Method):
    class Params(Strict):
        move_lambda: float = Field(3.0, ge=0.0)  # α = tanh(move_lambda·gap)
        reinit_epoch: int = Field(20, ge=1)  # re-initialise after every reinit_epoch-th epoch (0-based, not 0)
        reinit_num: int = Field(3, ge=0)  # at most this many times
        kmeans_n_init: int = Field(10, ge=1)  # k-means restarts (sklearn's default when the reference was written)

    def __init__(self, cfg, modalities, context):
        super().__init__(cfg, modalities, context)
        require_base_loss(cfg, "dr", 0, "the fused cross-entropy only")
        self.init: dict[str, list[torch.Tensor]] | None = None  # θ_m⁰ per modality
        self.done = 0  # re-initialisations so far

    def on_contributions(self, W):
        return {"a": {m: 0.0 for m in self.modalities}}  # no contribution-softmax a: logged as 0

    def after_backward(self, model, step: Step) -> None:
        if self.init is None:  # the first update, before optimizer.step(): still the initial parameters
            self.init = {m: [p.detach().clone() for p in model.modality_parameters(m)] for m in self.modalities}

    def learning_state(self, m: str, train, val) -> dict[str, float]:
        p = self.params
        k = self.context.num_classes
        p_train = clustering_purity(train[0][m], train[1], k, p.kmeans_n_init)
        p_val = clustering_purity(val[0][m], val[1], k, p.kmeans_n_init)
        alpha = math.tanh(p.move_lambda * abs(p_train - p_val))
        return {f"dr_purity_train_{m}": p_train, f"dr_purity_val_{m}": p_val, f"dr_alpha_{m}": alpha}

    def on_epoch_end(self, model, epoch, evaluate) -> dict[str, float]:
        p = self.params
        if epoch == 0 or epoch % p.reinit_epoch != 0 or self.done >= p.reinit_num or self.init is None:
            return {}
        train, val = (self._whole(split) for split in ("train", "val"))
        out = {}
        with torch.no_grad():
            for m in self.modalities:
                state = self.learning_state(m, train, val)
                out.update(state)
                alpha = state[f"dr_alpha_{m}"]
                for param, init in zip(model.modality_parameters(m), self.init[m]):
                    param.copy_(alpha * init.to(param) + (1.0 - alpha) * param)
        self.done += 1
        out["dr_reinits"] = float(self.done)
        return out

    def _whole(self, split: str):
        embs, labels = self.context.embeddings(split)  # this rank's shard
        return {m: gather_interleaved(h) for m, h in embs.items()}, gather_interleaved(labels)

    def state_dict(self) -> dict:
        init = None if self.init is None else {m: [t.cpu() for t in v] for m, v in self.init.items()}
        return {"init": init, "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.init, self.done = state["init"], state["done"]
