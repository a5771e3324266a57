"""MMTM: the Multimodal Transfer Module between ResNet branches (`model.fusion: mmtm`).

Paper: H. R. V. Joze, A. Shaban, M. L. Iuzzolino, K. Koishida, "MMTM: Multimodal Transfer Module
for CNN Fusion", CVPR 2020. Reference code read: haamoon/mmtm `mmtm.py` (class MMTM) and the NYUD2
baseline of QMF's repository, QingyangZhang/QMF `RGBD-scene-recognition/models/MMTM.py` (MMTNet) with
`train_MMTM_nyud2.py` (its loss and optimiser).

The rule (one transfer module after each chosen ResNet stage, applied to both branches at once):
    S_m = mean over H×W of the stage output A_m              (squeeze, one vector per branch)
    Z   = ReLU(W_s [S_1, …, S_M] + b_s),  W_s: ΣC → ⌊2·ΣC / ratio⌋   (joint bottleneck)
    E_m = scale · σ(W_m Z + b_m)                              (excitation, C_m per branch)
    A_m ← A_m ⊙ E_m  (channel-wise)
QMF's NYUD2 model puts modules after layer2, layer3 and layer4 (ratio 4); its prediction is the
mean of per-branch linear heads on the globally pooled features (late fusion), trained with
CE(fused) + CE(rgb) + CE(depth) — here the loop's eq 21 base with `method.unimodal_weight: 1`.
`scale` is 1 in both reference codes; the paper writes E = 2·σ(·) (`excitation_scale: 2`).

Embeddings and "modality m alone": `encode` returns each branch's pooled final features h_m, which
have passed through the transfer modules and so depend on every modality's input. The unimodal
logits of m are m's own head on h_m (as MMTNet's rgb_pred/depth_pred); "fusion without m" (eq 8,
`phi_ablation: zero`) zero-fills h_m after the joint encoder, i.e. it removes branch m's head, not
the information m already passed to the other branch through the gates. The transfer modules are
shared parameters: `modality_parameters(m)` is ResNet m only.
"""

from __future__ import annotations

import torch
from torch import nn
from pydantic import Field

from calray.config import Strict
from calray.errors import ConfigError
from calray.models.encoders import ResNetEncoder
from calray.models.fusion import LateFusion
from calray.registry import FUSIONS

STAGES = ("layer1", "layer2", "layer3", "layer4")


class TransferModule(nn.Module):
    """One MMTM between M feature maps (B×C_m×H_m×W_m; spatial sizes may differ)."""

    def __init__(self, channels: list[int], ratio: float, scale: float):
        super().__init__()
        total = sum(channels)
        self.channels = list(channels)
        self.scale = scale
        self.squeeze = nn.Linear(total, int(2 * total / ratio))
        self.excite = nn.ModuleList(nn.Linear(self.squeeze.out_features, c) for c in channels)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        s = torch.cat([a.flatten(2).mean(dim=2) for a in maps], dim=1)
        z = torch.relu(self.squeeze(s))
        return [a * (self.scale * torch.sigmoid(fc(z)))[:, :, None, None] for a, fc in zip(maps, self.excite)]


@FUSIONS.register("mmtm")
class MMTMFusion(LateFusion):
    """Late fusion (mean of per-modality heads) over ResNet branches joined by transfer modules."""

    class Params(Strict):
        stages: list[int] = Field(default_factory=lambda: [2, 3, 4])  # QMF NYUD2: after layer2, 3, 4
        ratio: float = Field(4.0, gt=0.0)  # both references: bottleneck ⌊2·ΣC/ratio⌋
        excitation_scale: float = Field(1.0, gt=0.0)  # the codes: σ(·); the paper: 2·σ(·)

    def __init__(self, dims, num_classes, fusion_dim, params=None):
        super().__init__(dims, num_classes, fusion_dim, params)
        if len(dims) < 2:
            raise ConfigError("model.fusion: mmtm needs at least two modalities")
        bad = [s for s in self.params.stages if s not in (1, 2, 3, 4)]
        if bad or len(set(self.params.stages)) != len(self.params.stages):
            raise ConfigError(f"model.fusion_params.stages: distinct ResNet stages among 1-4, got {self.params.stages}")
        self.transfer = nn.ModuleDict()

    def bind(self, encoders, cfg) -> None:
        for m in self.modalities:
            enc = encoders[m]
            if not isinstance(enc, ResNetEncoder) or enc.frames:
                raise ConfigError(f"model.encoders.{m}.name: mmtm joins ResNet branches on images "
                                  f"(resnet18…152, frames: false), got {type(enc).__name__}")
        for s in sorted(self.params.stages):
            channels = [stage_channels(encoders[m].net, s) for m in self.modalities]
            self.transfer[str(s)] = TransferModule(channels, self.params.ratio, self.params.excitation_scale)

    def encode(self, encoders, inputs):
        maps = [stem(encoders[m].net, inputs[m]) for m in self.modalities]
        for s, layer in enumerate(STAGES, start=1):
            maps = [getattr(encoders[m].net, layer)(a) for m, a in zip(self.modalities, maps)]
            if str(s) in self.transfer:
                maps = self.transfer[str(s)](maps)
        return {m: torch.flatten(encoders[m].net.avgpool(a), 1) for m, a in zip(self.modalities, maps)}


def stem(net, x: torch.Tensor) -> torch.Tensor:
    """A torchvision ResNet up to layer1's input (ResNetEncoder's B×H×W → B×1×H×W included)."""
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return net.maxpool(net.relu(net.bn1(net.conv1(x))))


def stage_channels(net, stage: int) -> int:
    """Output channels of a torchvision ResNet stage (basic or bottleneck blocks)."""
    block = getattr(net, STAGES[stage - 1])[-1]
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    return last_bn.num_features
