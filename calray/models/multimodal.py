"""The multimodal classifier every method trains: encoders → (AIB heads) → fusion + unimodal heads."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from torch.utils.data import default_collate

from calray.config import EncoderConfig
from calray.models.encoders import build_encoder
from calray.models.fusion import Fusion, LateFusion, build_fusion
from calray.models.heads import VariationalHead

EMB_MEAN_MOMENTUM = 0.01  # EMA of each embedding, used by the `mean` ablation of φ (eq 8)
# The EMA is warm-started: step k (0-based) uses rate max(momentum, 1/(k+1)), so for the first
# 1/momentum steps it is the exact mean of the batch means (no bias toward the zero init).


@dataclass
class ModelOutput:
    embeddings: dict[str, torch.Tensor]  # what the fusion sees: z_m with AIB, else h_m
    fused_repr: torch.Tensor
    fused_logits: torch.Tensor
    unimodal_logits: dict[str, torch.Tensor]
    ablated_logits: dict[str, torch.Tensor] = field(default_factory=dict)  # fusion without m (no grad)
    mu: dict[str, torch.Tensor] = field(default_factory=dict)  # AIB posterior means
    logvar: dict[str, torch.Tensor] = field(default_factory=dict)


class MultimodalModel(nn.Module):
    def __init__(self, encoders: dict[str, nn.Module], fusion: Fusion,
                 aib_heads: dict[str, VariationalHead] | None = None,
                 separate_heads: dict[str, nn.Module] | None = None):
        super().__init__()
        self.modalities = list(encoders)
        self.encoders = nn.ModuleDict(encoders)
        self.aib_heads = nn.ModuleDict(aib_heads or {})
        self.fusion = fusion
        self.separate_heads = nn.ModuleDict(separate_heads or {})
        for m in self.modalities:
            self.register_buffer(f"emb_mean_{m}", torch.zeros(fusion.dims[m]))
        self.register_buffer("emb_mean_steps", torch.zeros((), dtype=torch.long))
        self._modality_params: dict[str, list[nn.Parameter]] = {}  # modality_parameters' cache
        self.unimodal_grad = True  # False: the unimodal logits without autograd (set by the trainer)

    def modality_parameters(self, m: str) -> list[nn.Parameter]:
        """θ_m of eq 11: the parameters exclusive to modality m's branch (encoder + AIB head).

        Cached: gradient scaling asks every step, and walking the module tree costs as much as the
        scaling itself on small models. Parameters keep their identity under .to() and DDP."""
        if m not in self._modality_params:
            params = list(self.encoders[m].parameters())
            if m in self.aib_heads:
                params += list(self.aib_heads[m].parameters())
            self._modality_params[m] = params
        return list(self._modality_params[m])

    def shared_parameters(self) -> list[nn.Parameter]:
        """θ_s: the fusion module and unimodal heads (never modulated)."""
        own = {id(p) for m in self.modalities for p in self.modality_parameters(m)}
        return [p for p in self.parameters() if id(p) not in own]

    def drop_frozen_gradients(self, epoch: int) -> None:
        """No update this epoch for the parameters the fusion's recipe freezes (Fusion.frozen_parameters).

        Their gradients are computed, and all-reduced under DDP, then dropped: toggling requires_grad
        instead would change the set of parameters DDP's reducer waits for between epochs. An optimiser
        skips a parameter without a gradient (no weight decay, no moment update), as for a frozen one."""
        for p in self.fusion.frozen_parameters(epoch):
            p.grad = None

    def embedding_mean(self, m: str) -> torch.Tensor:
        return getattr(self, f"emb_mean_{m}")

    def forward(self, inputs: dict, ablation: str | None = None) -> ModelOutput:
        """`ablation` ("zero" | "mean" | None): also return, without gradient, the fused logits with
        each modality removed — its embedding zero-filled or replaced by its running mean (eq 8)."""
        embs = self.fusion.encode(self.encoders, inputs)  # default: each encoder alone (Fusion.encode)
        mu, logvar = {}, {}
        for m in self.aib_heads:
            embs[m], mu[m], logvar[m] = self.aib_heads[m](embs[m])
        if self.training and ablation == "mean":  # the running mean is only needed by that ablation
            with torch.no_grad():
                rate = (1.0 / (self.emb_mean_steps + 1).float()).clamp(min=EMB_MEAN_MOMENTUM)
                for m, h in embs.items():
                    self.embedding_mean(m).lerp_(h.detach().float().mean(0), rate)
                self.emb_mean_steps += 1
        fused_repr, fused_logits = self.fusion(embs)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.unimodal_grad):
            if self.separate_heads:
                unimodal = {m: self.separate_heads[m](embs[m]) for m in self.modalities}
            else:
                unimodal = {m: self.fusion.unimodal_logits(embs, m) for m in self.modalities}
        ablated = {}
        if ablation == "zero" and self._ablation_is_unimodal():
            # two modalities, shared head: "fusion without m" is exactly the other's unimodal logits
            a, b = self.modalities
            ablated = {a: unimodal[b].detach(), b: unimodal[a].detach()}
        elif ablation is not None:
            with torch.no_grad():
                for m in self.modalities:
                    detached = {k: v.detach() for k, v in embs.items()}
                    if ablation == "zero":
                        detached[m] = torch.zeros_like(detached[m])
                    else:
                        detached[m] = self.embedding_mean(m).to(detached[m].dtype).expand_as(detached[m])
                    ablated[m] = self.fusion(detached)[1]
        return ModelOutput(embs, fused_repr, fused_logits, unimodal, ablated, mu, logvar)

    def _ablation_is_unimodal(self) -> bool:
        return len(self.modalities) == 2 and not self.separate_heads and not isinstance(self.fusion, LateFusion)


def batched_sample(dataset, n: int = 2):
    """A collated batch of the first n items, used to infer input sizes when building encoders."""
    return default_collate([dataset[i] for i in range(min(n, len(dataset)))])


def build_model(cfg, splits) -> MultimodalModel:
    """Build from `cfg.model` / `cfg.method` (AIB heads) and the dataset's modalities and classes."""
    inputs, _ = batched_sample(splits.train)
    encoders, dims = {}, {}
    for m in splits.modalities:
        ecfg = cfg.model.encoders.get(m, EncoderConfig())
        enc = build_encoder(ecfg, inputs[m], m)
        encoders[m] = enc
        dims[m] = enc.out_dim
    aib_heads = None
    if cfg.method.aib != "off":
        aib_heads = {m: VariationalHead(d, cfg.method.latent_dim or d) for m, d in dims.items()}
        dims = {m: h.latent_dim for m, h in aib_heads.items()}
    fusion = build_fusion(cfg.model.fusion, dims, splits.num_classes, cfg.model.fusion_dim, cfg.model.fusion_params)
    fusion.bind(encoders, cfg)  # a joint encoder's own parameters and checks (Fusion.bind)
    separate = None
    if cfg.model.unimodal_head == "separate" and cfg.model.fusion != "late":
        separate = {m: nn.Linear(d, splits.num_classes) for m, d in dims.items()}
    return MultimodalModel(encoders, fusion, aib_heads, separate)
