"""QMF's fusion: late fusion weighted per sample by an energy-based confidence.

Quality-aware Multimodal Fusion (Provable Dynamic Fusion for Low-Quality Multimodal Data), Zhang et al.,
ICML 2023; reference QingyangZhang/QMF (`RGBD-scene-recognition/models/QMF.py`,
`text-image-classification/src/models/late_fusion.py`). One linear head per modality; the confidence
of modality m is the negative free energy scaled by 1/10,

    c_m = −0.1 · E(x_m) = 0.1 · logsumexp_k f_m(x_m)_k,   fused logits = Σ_m c_m · f_m(x_m),

with c_m detached in the fused logits on MVSA (`--df`) and not on NYUD2 (`detach_confidence`). The
ranking regulariser on c_m is the `qmf` strategy (calray.method.qmf).
"""

from __future__ import annotations

import torch
from pydantic import Field

from calray.config import Strict
from calray.models.fusion import LateFusion
from calray.registry import FUSIONS


def energy_confidence(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """c = −scale · energy = scale · logsumexp(logits), per row (B)."""
    return scale * torch.logsumexp(logits, dim=1)


@FUSIONS.register("qmf")
class QMFFusion(LateFusion):
    class Params(Strict):
        conf_scale: float = Field(0.1, gt=0.0)  # the reference's −0.1·energy (MVSA: energy / 10)
        detach_confidence: bool = False  # NYUD2 reference: False; MVSA reference (--df): True

    def forward(self, embs):
        logits = [self.heads[m](embs[m]) for m in self.modalities]
        fused = 0
        for z in logits:
            conf = energy_confidence(z, self.params.conf_scale)[:, None]
            fused = fused + z * (conf.detach() if self.params.detach_confidence else conf)
        return torch.cat(logits, dim=1), fused
