"""EAU's fusion: per-modality Gaussian latents, variance-weighted channel-gated fusion, an IB head.

Embracing Unimodal Aleatoric Uncertainty for Robust Multimodal Fusion, Gao et al., CVPR 2024 (the CAL
paper's [6], also spelt "EUA" there). The authors' MVSA-Single code ("URMF") survives only as copies; read:
Knightrider16/EAURMF at its initial commit 17d012d (`src/models/late_fusion.py`, `src/models/bert.py`,
`src/models/image.py`, `attention.py`, `util.py`, `train.py`) — a fork whose later commits are "FIXED"
edits — and an unattributed copy of the same `late_fusion.py` whose prediction head is the MLP below.
For modalities m with encoder output h_m (latent size L, K classes):

    μ_m = A_m h_m,  log σ²_m = B_m h_m                          (the BertClf/ImageClf mu/logvar layers)
    w_m = softmax_m(−σ²_m)    (per latent dimension; = the reference's swapped softmax([σ²_img, σ²_txt]))
    x_m = μ_m ⊙ w_m,   g = sigmoid(G · mean_d x),   h = Σ_m (1 + g_m) x_m    (ChannelGate(M, 'avg'))
    μ_f = C h,  log σ²_f = D h,   z = μ_f + s_f ⊙ ε   →  IB logits E z
    fused logits = MLP(μ_f)   (Linear(L, 64) → BatchNorm → ReLU → Dropout(0.211) → Linear(64, K))

s = exp(log σ²) is the reference's std (`reparameterise(mu, torch.exp(logvar))`; `std_from: sigma` uses
exp(½ log σ²)). The ChannelGate's Conv1d(M, M, 3, padding 1, no bias) sees a length-1 input, so only its
centre tap acts: G is an M×M matrix without bias. Training also returns two samples z¹_m, z²_m of each
modality's Gaussian (the contrastive term) and, per sample, the uncertainty probe U_m: the variance over
classes of the fused logits with modality m's latent drawn `uncertainty_samples` times (the others at μ),
averaged over the draws (the reference's `cog_uncertainty_dict`, which scales the encoders' gradients).

Every random draw (ε, the dropout mask) is taken from a generator seeded by the run seed and a step
counter (buffers), for the GLOBAL batch, each rank keeping its rows (r, r+W, …: the sampler's
interleaving), so 2 workers × b draw what 1 process × 2b draws. The BatchNorm does not shard that way:
the `eau` strategy refuses `distributed.workers > 1` with it on.

`fused_repr` packs what the `eau` strategy reads (`unpack`): μ_f, log σ²_f, the IB logits and per
modality μ_m, log σ²_m, z¹_m, z²_m, U_m (in evaluation the same layout with every ε = 0, U = 0). The unimodal logits are a linear head on μ_m (the reference's
per-modality `clf`, which its loss never trains). docs/baselines/eau.md lists the deviations.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from calray.config import Strict
from calray.dist import is_distributed
from calray.models.fusion import Fusion
from calray.registry import FUSIONS


def variance_weights(logvars: list[torch.Tensor]) -> torch.Tensor:
    """w (M×B×L): softmax over modalities of −σ²_m, per latent dimension."""
    return torch.softmax(-torch.stack(logvars).exp(), dim=0)


def global_noise(seed: int, step: int, n_local: int, sizes: list[int]) -> list[torch.Tensor]:
    """Standard normal draws (n_local × d each) for this rank's rows of the global batch."""
    world = dist.get_world_size() if is_distributed() else 1
    rank = dist.get_rank() if world > 1 else 0
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return [torch.randn(n_local * world, d, generator=g)[rank::world] for d in sizes]


@FUSIONS.register("eau")
class EAUFusion(Fusion):
    class Params(Strict):
        latent_dim: int = Field(128, ge=1)  # the reference's Linear(·, 128) Gaussian heads
        head_hidden: int = Field(64, ge=1)  # fc_fusion1: Linear(128, 64) → BN → ReLU → Dropout → Linear(64, K)
        dropout: float = Field(0.211, ge=0.0, lt=1.0)
        batchnorm: bool = True  # the reference head's BatchNorm1d(64); refused under DDP by the eau strategy
        gate_pool: Literal["avg", "max"] = "avg"  # ChannelGate(2, 'avg')
        uncertainty_samples: int = Field(10, ge=0)  # cog_uncertainty_sample(..., sample_times=10); 0: off
        std_from: Literal["variance", "sigma"] = "variance"  # the reference samples with std = exp(logvar)

    def __init__(self, dims, num_classes, fusion_dim, params=None):
        super().__init__(dims, num_classes, fusion_dim, params)
        p, latent, m = self.params, self.params.latent_dim, len(dims)
        self.mu = nn.ModuleDict({k: nn.Linear(d, latent) for k, d in dims.items()})
        self.logvar = nn.ModuleDict({k: nn.Linear(d, latent) for k, d in dims.items()})
        self.clf = nn.ModuleDict({k: nn.Linear(latent, num_classes) for k in dims})
        self.gate = nn.Linear(m, m, bias=False)
        self.fused_mu, self.fused_logvar = nn.Linear(latent, latent), nn.Linear(latent, latent)
        self.ib = nn.Linear(latent, num_classes)
        self.hidden = nn.Linear(latent, p.head_hidden)
        self.bn = nn.BatchNorm1d(p.head_hidden) if p.batchnorm else None
        self.out = nn.Linear(p.head_hidden, num_classes)
        self.register_buffer("noise_seed", torch.tensor(torch.initial_seed() % (2**31), dtype=torch.long))
        self.register_buffer("noise_step", torch.zeros((), dtype=torch.long))

    def branch_parameters(self, m: str) -> list[nn.Parameter]:
        """Modality m's own fusion-side parameters (its Gaussian heads and unimodal head: the
        reference's txtclf / imgclf beyond the encoder)."""
        return [*self.mu[m].parameters(), *self.logvar[m].parameters(), *self.clf[m].parameters()]

    def std(self, logvar: torch.Tensor) -> torch.Tensor:
        return logvar.exp() if self.params.std_from == "variance" else (0.5 * logvar).exp()

    def fuse(self, latents: list[torch.Tensor]) -> torch.Tensor:
        """The ChannelGate: sigmoid(G · pool_d x) gates each modality's row, rows summed (B×L)."""
        x = torch.stack(latents, dim=1)  # B × M × L
        pooled = x.mean(2) if self.params.gate_pool == "avg" else x.amax(2)
        return (x * (1 + torch.sigmoid(self.gate(pooled))[..., None])).sum(1)

    def head(self, mu_f: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """MLP(μ_f); `keep`: the dropout mask (training), None: evaluation (BN running statistics)."""
        x = self.hidden(mu_f)
        if self.bn is not None:
            batch_stats = keep is not None and x.shape[0] > 1
            x = F.batch_norm(x, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias,
                             training=batch_stats, momentum=self.bn.momentum, eps=self.bn.eps)
        x = F.relu(x)
        if keep is not None and self.params.dropout > 0:
            x = x * keep / (1 - self.params.dropout)
        return self.out(x)

    def gaussians(self, embs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [self.mu[m](embs[m]) for m in self.modalities], [self.logvar[m](embs[m]) for m in self.modalities]

    def draws(self, n: int) -> list[torch.Tensor]:
        """This step's global-batch noise: ε_IB, the dropout uniforms, 2 contrastive ε per modality and
        the probe's ε (n·S × L per modality), in that order; advances the step counter."""
        latent, s, m = self.params.latent_dim, self.params.uncertainty_samples, len(self.modalities)
        sizes = [latent, self.params.head_hidden] + [latent] * (2 * m) + [latent * s] * (m if s else 0)
        noise = global_noise(int(self.noise_seed), int(self.noise_step), n, sizes)
        self.noise_step += 1
        return noise

    def forward(self, embs):
        mus, logvars = self.gaussians(embs)
        w = variance_weights(logvars)
        h = self.fuse([mu * w[i] for i, mu in enumerate(mus)])
        mu_f, logvar_f = self.fused_mu(h), self.fused_logvar(h)
        if not (self.training and torch.is_grad_enabled()):  # evaluation or an ablation pass: no draws,
            parts = [mu_f, logvar_f, self.ib(mu_f)]  # the same layout with every ε = 0
            for mu, lv in zip(mus, logvars):
                parts += [mu, lv, mu, mu, mu.new_zeros(len(mu), 1)]
            return torch.cat(parts, dim=1), self.head(mu_f, None)
        eps_ib, u, *rest = [e.to(mu_f.device, mu_f.dtype) for e in self.draws(mu_f.shape[0])]
        logits = self.head(mu_f, (u >= self.params.dropout).to(mu_f.dtype))
        parts = [mu_f, logvar_f, self.ib(mu_f + self.std(logvar_f) * eps_ib)]
        con, probe = rest[: 2 * len(mus)], rest[2 * len(mus):]
        unc = self.uncertainty(mus, logvars, probe)
        for i, (mu, lv) in enumerate(zip(mus, logvars)):
            parts += [mu, lv, mu + self.std(lv) * con[2 * i], mu + self.std(lv) * con[2 * i + 1], unc[i]]
        return torch.cat(parts, dim=1), logits

    @torch.no_grad()
    def uncertainty(self, mus, logvars, probe) -> list[torch.Tensor]:
        """U_m (B×1): Var_k of the fused logits with m's latent drawn S times (others at μ), draw mean."""
        s = self.params.uncertainty_samples
        if not s:
            return [mus[0].new_zeros(len(mus[0]), 1) for _ in mus]
        n, latent = mus[0].shape
        out = []
        for i, (mu, lv) in enumerate(zip(mus, logvars)):
            sample = (mu[:, None] + self.std(lv)[:, None] * probe[i].view(n, s, latent)).reshape(n * s, latent)
            rows = [sample if j == i else other.repeat_interleave(s, 0) for j, other in enumerate(mus)]
            logits = self.head(self.fused_mu(self.fuse(rows)), None)
            out.append(logits.var(dim=1).view(n, s).mean(1, keepdim=True))
        return out

    def unimodal_logits(self, embs, m):
        return self.clf[m](self.mu[m](embs[m]))


def unpack(fused_repr: torch.Tensor, modalities: list[str], latent: int, num_classes: int) -> dict:
    """The training forward's packed `fused_repr` → {"mu", "logvar", "ib", "modalities": {m: {...}}}."""
    sizes = [latent, latent, num_classes] + [latent, latent, latent, latent, 1] * len(modalities)
    parts = list(fused_repr.split(sizes, dim=1))
    out = {"mu": parts[0], "logvar": parts[1], "ib": parts[2], "modalities": {}}
    for i, m in enumerate(modalities):
        mu, lv, z1, z2, unc = parts[3 + 5 * i: 8 + 5 * i]
        out["modalities"][m] = {"mu": mu, "logvar": lv, "z1": z1, "z2": z2, "uncertainty": unc[:, 0]}
    return out
