"""BLOCK fusion (Ben-Younes, Cadene, Thome, Cord: "BLOCK: Bilinear Superdiagonal Fusion for Visual Question
Answering and Visual Relationship Detection", AAAI 2019), as a fusion of the one model.

Reference code (read, not copied): Cadene/block.bootstrap.pytorch, block/models/networks/fusions/fusions.py,
class `Block` (+ `get_sizes_list`, `get_chunks`); defaults from its signature, the VQA2 option file
block/options/vqa2/block.yaml uses chunks 18 and dropout_input 0.1.

The rule: x_0 = W_0 h_0, x_1 = W_1 h_1 (each to `mm_dim`); both split into `chunks` blocks of (nearly) equal
size s_c; per block c a rank-`rank` bilinear (Tucker-style, "block-superdiagonal") interaction

    z_c = Σ_{r=1..rank} (M_c^0 x_0^c)_r ⊙ (M_c^1 x_1^c)_r,    M_c^i : s_c → rank·s_c,

signed square root and L2 normalisation (per block for pos_norm 'before_cat', of the concatenation for
'after_cat'), then the output projection to the classes. `fused_repr` is the normalised z (mm_dim), before
the output dropout/projection.

Unimodal logits (`Fusion.unimodal_logits`, the default): the fusion run with the other modality's
embedding zero-filled. For a bilinear fusion that is *not* "modality m alone through a linear map": the
zeroed input still passes the other branch's biases, x_other = b_other, so the unimodal logits are the
bilinear interaction of h_m with a learned constant vector, z_c = Σ_r (M_c^m x_m^c)_r ⊙ (M_c^o b_o^c + β_c^o)_r.
They depend on h_m only, through the same shared parameters, which is what the unimodal losses and the
contribution tracker need; they are not the OGM-GE sliced-head logits of concat.

Deviations from the reference: two modalities only (the reference fuses exactly two inputs; a ConfigError
otherwise); the modality order is the dataset's (h_0 = first modality); `model.fusion_dim` is not used
(the block's size is `model.fusion_params.mm_dim`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from calray.config import Strict
from calray.errors import ConfigError
from calray.models.fusion import Fusion
from calray.registry import FUSIONS


def block_sizes(dim: int, chunks: int) -> list[int]:
    """`chunks` block sizes summing to `dim`: ceil(dim/chunks) each, the shortfall taken from the last
    blocks (the reference's get_sizes_list)."""
    size = -(-dim // chunks)
    sizes = [size] * chunks
    sizes[-1] -= sum(sizes) - dim
    if sizes[-1] < 0:  # e.g. dim 9, chunks 6: [2, 2, 2, 2, 2, -1] → [2, 2, 2, 1, 1, 1]
        missing = sizes[-2] - sizes[-1]
        sizes[-1] = sizes[-2]
        for j in range(missing):
            sizes[-j - 1] -= 1
    if sum(sizes) != dim or min(sizes) <= 0:  # the reference would build an empty block (dim 10, chunks 6)
        raise ConfigError(f"model.fusion_params: mm_dim {dim} cannot be split into {chunks} chunks")
    return sizes


def signed_sqrt_l2(z: torch.Tensor) -> torch.Tensor:
    """Power normalisation sqrt(relu(z)) − sqrt(relu(−z)), then L2 over the features."""
    return F.normalize(torch.sqrt(F.relu(z)) - torch.sqrt(F.relu(-z)), p=2, dim=1)


@FUSIONS.register("block")
class BlockFusion(Fusion):
    class Params(Strict):
        mm_dim: int = Field(1600, ge=1)
        chunks: int = Field(20, ge=1)
        rank: int = Field(15, ge=1)
        shared: bool = False  # one set of projections for both modalities (needs equal embedding sizes)
        dropout_input: float = Field(0.0, ge=0.0, lt=1.0)
        dropout_pre_lin: float = Field(0.0, ge=0.0, lt=1.0)
        dropout_output: float = Field(0.0, ge=0.0, lt=1.0)
        pos_norm: Literal["before_cat", "after_cat"] = "before_cat"

    def __init__(self, dims, num_classes, fusion_dim, params=None):
        super().__init__(dims, num_classes, fusion_dim, params)
        p = self.params
        if len(dims) != 2:
            raise ConfigError(f"model.fusion: block fuses exactly two modalities, got {len(dims)} ({', '.join(dims)})")
        if p.chunks > p.mm_dim:
            raise ConfigError(f"model.fusion_params.chunks: {p.chunks} chunks exceed mm_dim {p.mm_dim}")
        d0, d1 = (dims[m] for m in self.modalities)
        if p.shared and d0 != d1:
            raise ConfigError(f"model.fusion_params.shared: needs equal embedding sizes, got {d0} and {d1}")
        self.sizes = block_sizes(p.mm_dim, p.chunks)
        self.linear0 = nn.Linear(d0, p.mm_dim)
        self.linear1 = self.linear0 if p.shared else nn.Linear(d1, p.mm_dim)
        self.merge0 = nn.ModuleList(nn.Linear(s, s * p.rank) for s in self.sizes)
        self.merge1 = self.merge0 if p.shared else nn.ModuleList(nn.Linear(s, s * p.rank) for s in self.sizes)
        self.linear_out = nn.Linear(p.mm_dim, num_classes)

    def forward(self, embs):
        p = self.params
        first, second = self.modalities
        x0 = F.dropout(self.linear0(embs[first]), p.dropout_input, self.training)
        x1 = F.dropout(self.linear1(embs[second]), p.dropout_input, self.training)
        blocks = []
        for c0, c1, m0, m1 in zip(x0.split(self.sizes, dim=1), x1.split(self.sizes, dim=1), self.merge0, self.merge1):
            z = (m0(c0) * m1(c1)).view(x0.shape[0], p.rank, -1).sum(1)  # the rank-R bilinear block
            blocks.append(signed_sqrt_l2(z) if p.pos_norm == "before_cat" else z)
        z = torch.cat(blocks, dim=1)
        if p.pos_norm == "after_cat":
            z = signed_sqrt_l2(z)
        logits = self.linear_out(F.dropout(z, p.dropout_pre_lin, self.training))
        return z, F.dropout(logits, p.dropout_output, self.training)
