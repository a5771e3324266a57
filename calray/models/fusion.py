"""Fusion registry: embeddings {m: B×d_m} → (fused representation, fused logits).

Every fusion also defines the *shared-head* unimodal logits of modality m: the fusion run with
every other modality zero-filled (ARL's definition; for `concat` this is W[:, slice_m]·h_m + b).
`late` is the exception: its unimodal logits are its per-modality heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calray.errors import ConfigError
from calray.registry import FUSIONS


class Fusion(nn.Module):
    """A fusion's own hyper-parameters are its `Params` model (a calray.config.Strict), set under
    `model.fusion_params` and read as `self.params`.

    Joint encoders (MMTM, MMBT: the encoders exchange information before the fusion) override two
    methods; every other fusion inherits the defaults:
      `bind(encoders, cfg)`  called once by build_model before the model is assembled: build the
                             parameters that depend on the encoders, check the encoders and settings
                             the fusion needs (ConfigError naming the key); default: nothing;
      `encode(encoders, inputs)`  the batch's embeddings {m: h_m}, replacing the independent
                             per-modality encoding; default: each encoder on its own input.
    A fusion whose published recipe freezes parameters for its first epochs (MMBT) also overrides
      `frozen_parameters(epoch)`  the parameters not updated in that (0-based) epoch; default none.
    The embeddings go on through the AIB heads (if any) to `forward` and `unimodal_logits` as for
    any fusion, so the zero-fill definitions below apply to what `encode` returns; a joint fusion
    documents what "modality m alone" then means. `modality_parameters(m)` stays encoder m (+ its
    AIB head); parameters a joint fusion adds (transfer modules, projections) are shared.
    """

    Params = None

    def __init__(self, dims: dict[str, int], num_classes: int, fusion_dim: int | None, params: dict | None = None):
        super().__init__()
        self.params = self.Params.model_validate(params or {}) if self.Params is not None else None
        self.modalities = list(dims)
        self.dims = dict(dims)
        self.num_classes = num_classes
        self.fusion_dim = fusion_dim or min(dims.values())

    def bind(self, encoders: dict[str, nn.Module], cfg) -> None:
        return None

    def encode(self, encoders, inputs: dict) -> dict[str, torch.Tensor]:
        return {m: encoders[m](inputs[m]) for m in encoders}

    def frozen_parameters(self, epoch: int) -> list[nn.Parameter]:
        return []

    def forward(self, embs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def zero_filled(self, embs: dict[str, torch.Tensor], keep: set[str]) -> dict[str, torch.Tensor]:
        return {m: (h if m in keep else torch.zeros_like(h)) for m, h in embs.items()}

    def unimodal_logits(self, embs: dict[str, torch.Tensor], m: str) -> torch.Tensor:
        return self(self.zero_filled(embs, {m}))[1]


class ConcatFusion(Fusion):
    def __init__(self, dims, num_classes, fusion_dim, params=None):
        super().__init__(dims, num_classes, fusion_dim, params)
        self.head = nn.Linear(sum(dims.values()), num_classes)

    def forward(self, embs):
        z = torch.cat([embs[m] for m in self.modalities], dim=1)
        return z, self.head(z)

    def unimodal_logits(self, embs, m):
        """The zero-filled head (W·[0, …, h_m, …, 0] + b) computed as its slice, W[:, slice_m]·h_m + b:
        the same values without building the zero-padded input."""
        start = sum(self.dims[k] for k in self.modalities[:self.modalities.index(m)])
        return F.linear(embs[m], self.head.weight[:, start:start + self.dims[m]], self.head.bias)


class SumFusion(Fusion):
    def __init__(self, dims, num_classes, fusion_dim, params=None):
        super().__init__(dims, num_classes, fusion_dim, params)
        self.proj = nn.ModuleDict({m: nn.Linear(d, self.fusion_dim) for m, d in dims.items()})
        self.head = nn.Linear(self.fusion_dim, num_classes)

    def forward(self, embs):
        z = sum(self.proj[m](embs[m]) for m in self.modalities)
        return z, self.head(z)


class FiLMFusion(Fusion):
    """The first modality is modulated by the others: γ, β = split(Linear(cat others)); z = γ·x + β."""

    def __init__(self, dims, num_classes, fusion_dim, params=None):
        super().__init__(dims, num_classes, fusion_dim, params)
        first, *rest = self.modalities
        if not rest:
            raise ConfigError("model.fusion: film needs at least two modalities")
        self.x_proj = nn.Linear(dims[first], self.fusion_dim)
        self.film = nn.Linear(sum(dims[m] for m in rest), 2 * self.fusion_dim)
        self.head = nn.Linear(self.fusion_dim, num_classes)

    def forward(self, embs):
        first, *rest = self.modalities
        gamma, beta = self.film(torch.cat([embs[m] for m in rest], dim=1)).chunk(2, dim=1)
        z = gamma * self.x_proj(embs[first]) + beta
        return z, self.head(z)


class GatedFusion(Fusion):
    """OGM-GE's gated fusion generalised to M: z = σ(P_0 h_0) ⊙ Σ_{m>0} P_m h_m."""

    def __init__(self, dims, num_classes, fusion_dim, params=None):
        super().__init__(dims, num_classes, fusion_dim, params)
        if len(dims) < 2:
            raise ConfigError("model.fusion: gated needs at least two modalities")
        self.proj = nn.ModuleDict({m: nn.Linear(d, self.fusion_dim) for m, d in dims.items()})
        self.head = nn.Linear(self.fusion_dim, num_classes)

    def forward(self, embs):
        first, *rest = self.modalities
        gate = torch.sigmoid(self.proj[first](embs[first]))
        z = gate * sum(self.proj[m](embs[m]) for m in rest)
        return z, self.head(z)


class LateFusion(Fusion):
    """Mean of per-modality logits; its unimodal logits are those per-modality heads."""

    def __init__(self, dims, num_classes, fusion_dim, params=None):
        super().__init__(dims, num_classes, fusion_dim, params)
        self.heads = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})

    def forward(self, embs):
        logits = [self.heads[m](embs[m]) for m in self.modalities]
        return torch.cat(logits, dim=1), torch.stack(logits).mean(dim=0)

    def unimodal_logits(self, embs, m):
        return self.heads[m](embs[m])


for _name, _cls in (("concat", ConcatFusion), ("sum", SumFusion), ("film", FiLMFusion), ("gated", GatedFusion),
                    ("late", LateFusion)):
    FUSIONS.register(_name)(_cls)


def build_fusion(name: str, dims: dict[str, int], num_classes: int, fusion_dim: int | None,
                 params: dict | None = None) -> Fusion:
    return FUSIONS.get(name)(dims, num_classes, fusion_dim, params)
