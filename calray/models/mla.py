"""MLA's fusion (Zhang, Latham, Yao: "Multimodal Representation Learning by Alternating Unimodal Adaptation",
CVPR 2024): ONE classification head shared by every modality, and the test-time prediction the entropy-
weighted sum of the modalities' logits through it. Trained by the `mla` strategy (calray/method/mla.py).

Reference code (read, not copied): Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation —
models/basic_model.py (`AVClassifier` with `--gs_flag`: `ConcatFusion(input_dim=512)`, i.e. one
Linear(d → K) applied to each modality's embedding), main.py (`valid` with `--dynamic`:
`calculate_gating_weights`, `calculate_entropy`).

Per sample and modality: l_m = head(h_m), e_m = −Σ_k p_k log p_k with p = softmax(l_m), weights
λ_m = exp(max_j e_j − e_m) / Σ_k exp(max_j e_j − e_k) = softmax(−e)_m (no gradient), and
fused_logits = Σ_m λ_m·l_m; with `dynamic: false` the plain mean (the reference's fixed av_alpha = 0.5).
Unimodal logits are head(h_m) — not a zero-filled fusion.

Deviation: the reference's `calculate_entropy` takes the softmax over the *batch* (dim=0, dim=1 is
commented out) and sums over the whole batch, so its weights are one pair per test batch; here they are
per sample, as the paper describes and as a prediction must be (independent of the batch it is in).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calray.config import Strict
from calray.errors import ConfigError
from calray.models.fusion import Fusion
from calray.registry import FUSIONS


def entropy_weights(logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """λ_m per sample (B×1): softmax over modalities of minus each prediction's entropy."""
    ent = []
    for v in logits.values():
        logp = F.log_softmax(v.float(), dim=1)
        ent.append(-(logp.exp() * logp).sum(1))
    w = torch.softmax(-torch.stack(ent, dim=1), dim=1)  # = exp(max e − e_m) / Σ_k exp(max e − e_k)
    return {m: w[:, i:i + 1] for i, m in enumerate(logits)}


@FUSIONS.register("mla")
class MLAFusion(Fusion):
    class Params(Strict):
        dynamic: bool = True  # entropy-weighted fusion (the reference's --dynamic); false: the mean

    def __init__(self, dims, num_classes, fusion_dim, params=None):
        super().__init__(dims, num_classes, fusion_dim, params)
        if len(set(dims.values())) != 1:
            raise ConfigError(f"model.fusion: mla shares one head between the modalities, so their embeddings "
                              f"need one size (model.encoders.<m>.out_dim / hidden); got {dims}")
        self.head = nn.Linear(next(iter(dims.values())), num_classes)

    def forward(self, embs):
        logits = {m: self.head(embs[m]) for m in self.modalities}
        if self.params.dynamic:
            with torch.no_grad():
                w = entropy_weights(logits)
            fused = sum(w[m].to(logits[m].dtype) * logits[m] for m in self.modalities)
        else:
            fused = torch.stack(list(logits.values())).mean(0)
        return torch.cat([embs[m] for m in self.modalities], dim=1), fused

    def unimodal_logits(self, embs, m):
        return self.head(embs[m])
