"""TMC's fusion: per-modality Dirichlet opinions combined by the reduced Dempster–Shafer rule.

Trusted Multi-View Classification, Han et al., ICLR 2021 (hanmenghan/TMC, `TMC ICLR/model.py`); the
NYUD2 / MVSA-Single baselines of QingyangZhang/QMF (`RGBD-scene-recognition/models/TMC.py`,
`text-image-classification/src/models/tmc.py`), which this follows: one linear head per modality,
evidence e_m = softplus(head_m(h_m)), α_m = e_m + 1, and the opinions (b = e/S, u = K/S, S = Σα)
combined pairwise in modality order:

    C = Σ_{i≠j} b¹_i b²_j,  b_k = (b¹_k b²_k + b¹_k u² + b²_k u¹)/(1 − C),  u = u¹u²/(1 − C),
    S = K/u,  α = b·S + 1.

The fused representation is the combined α; the fused logits are log E[p] = log(α/S) (what
evaluation reads: argmax equals the reference's argmax of α). A modality's unimodal logits are its
head's raw outputs (argmax = argmax of its α). The evidential loss is the `tmc` strategy
(calray.method.tmc).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from calray.config import Strict
from calray.models.fusion import LateFusion
from calray.registry import FUSIONS


def dirichlet_alpha(logits: torch.Tensor, evidence: str = "softplus") -> torch.Tensor:
    """α = e + 1 with non-negative evidence e (softplus as the reference; relu / exp as TMC's paper allows)."""
    e = {"softplus": F.softplus, "relu": F.relu, "exp": torch.exp}[evidence](logits)
    return e + 1.0


def ds_combine_two(alpha1: torch.Tensor, alpha2: torch.Tensor) -> torch.Tensor:
    """The reduced Dempster–Shafer combination of two Dirichlet opinions (B×K each) → combined α."""
    k = alpha1.shape[1]
    s1, s2 = alpha1.sum(1, keepdim=True), alpha2.sum(1, keepdim=True)
    b1, b2 = (alpha1 - 1) / s1, (alpha2 - 1) / s2
    u1, u2 = k / s1, k / s2
    conflict = b1.sum(1, keepdim=True) * b2.sum(1, keepdim=True) - (b1 * b2).sum(1, keepdim=True)
    b = (b1 * b2 + b1 * u2 + b2 * u1) / (1 - conflict)
    u = u1 * u2 / (1 - conflict)
    return b * (k / u) + 1.0


def ds_combine(alphas: list[torch.Tensor]) -> torch.Tensor:
    """Combined opinion of M ≥ 1 modalities, folded left to right (TMC's DS_Combin)."""
    combined = alphas[0]
    for alpha in alphas[1:]:
        combined = ds_combine_two(combined, alpha)
    return combined


@FUSIONS.register("tmc")
class TMCFusion(LateFusion):
    class Params(Strict):
        evidence: Literal["softplus", "relu", "exp"] = "softplus"  # QMF's NYUD2/MVSA TMC and TMC ICLR: softplus

    def alphas(self, embs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: dirichlet_alpha(self.heads[m](embs[m]).float(), self.params.evidence) for m in self.modalities}

    def forward(self, embs):
        alpha = ds_combine(list(self.alphas(embs).values()))
        return alpha, torch.log(alpha / alpha.sum(1, keepdim=True))
