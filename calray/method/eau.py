"""EAU (Embracing Unimodal Aleatoric Uncertainty, Gao et al., CVPR 2024) as a plug-in: its loss and its
uncertainty-scaled encoder gradients, on the `eau` fusion (calray.models.eau).

Reference: the authors' MVSA-Single code ("URMF") as copied in Knightrider16/EAURMF at 17d012d — `util.py`
(totolloss, KL_normal, KL_regular, Contrastive_loss, con_loss), `train.py` (model_forward, the gradient
modulation) — read, not copied. With s = exp(log σ²) the reference's std and B the batch:

    L = CE(MLP(μ_f), y)                                    (the loop's "fused" term)
      + 1e-3 · [KL(q_f ‖ N(0, I)) + Σ_m KL(q_m ‖ N(0, I))]   (KL_normal, proper log-variance form)
      + 1e-3 · CE(E z, y),  z = μ_f + s_f ε                 (the IB head)
      + 1e-5 · Σ_{i<j} KL_reg(q_j ‖ q_i)                     (KL_regular; s taken as the std)
      + 1e-3 · Σ_m InfoNCE_τ(z¹_m, z²_m),  τ = 0.5           (two draws of modality m's Gaussian)

InfoNCE as the reference computes it: S_ij = exp(cos(z¹_i, z²_j)/τ), ℓ_i = −log(S_ii / (2 Σ_j S_ij − S_ii)),
symmetrised ((ℓ(z¹, z²) + ℓ(z², z¹))/2), batch mean — its "intra-view" term is the inter-view S again.
The unimodal cross-entropies are not in the loss (`method.unimodal_weight: 0` is required; the loop's
zero-weighted term stays, so the unimodal heads get zero gradients rather than none).
Gradient modulation, for modulation_start ≤ epoch ≤ modulation_end: every gradient of modality m's
branch (encoder + its Gaussian and unimodal heads) × (1 + ζ · mean_{k≠m} Ū_k), Ū_k the batch mean of the
fusion's uncertainty probe with k's latent sampled (the reference: text × (1 + ζ·Ū_image) and back).

DDP: the InfoNCE pairs every sample with the whole batch, so z¹, z² are gathered into the single-process
batch (calray.method.qmf.global_batch) and the term's gradient is scaled by the world size (DDP's mean is
then the global gradient); Ū is all-reduced. With the fusion's BatchNorm on, 2 workers cannot equal one
process (batch statistics per shard), so that combination is refused. docs/baselines/eau.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from calray.config import Strict
from calray.dist import all_reduce_sum, world_size
from calray.errors import ConfigError
from calray.method.aib import kl_to_standard_normal  # the reference's KL_normal: the same bound
from calray.method.base import Method, Step
from calray.method.qmf import global_batch
from calray.models.eau import unpack
from calray.registry import STRATEGIES


def kl_regular(mu_a, logvar_a, mu_b, logvar_b) -> torch.Tensor:
    """The reference's KL_regular(a, b): KL(N(μ_a, s_a²) ‖ N(μ_b, s_b²)) with s = exp(log σ²) as the std."""
    s_a, s_b = logvar_a.exp(), logvar_b.exp()
    kl = logvar_b - logvar_a + (s_a.pow(2) + (mu_a - mu_b).pow(2)) / (2 * s_b.pow(2)) - 0.5
    return kl.sum(1).mean()


def info_nce(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """The reference's Contrastive_loss(τ)(z1, z2) (batch mean)."""
    def one_way(a, b):
        s = torch.exp(F.normalize(a) @ F.normalize(b).t() / tau)
        return -torch.log(s.diag() / (2 * s.sum(1) - s.diag()))
    return ((one_way(z1, z2) + one_way(z2, z1)) * 0.5).mean()


@STRATEGIES.register("eau")
class EAU(Method):
    class Params(Strict):
        kl_weight: float = Field(1e-3, ge=0.0)  # totolloss: 1e-3 · (kl_loss + txt_kl_loss + img_kl_loss)
        ib_weight: float = Field(1e-3, ge=0.0)  # 1e-3 · IB_loss
        regular_weight: float = Field(1e-5, ge=0.0)  # model_forward: 1e-5 · KL_regular(txt, img)
        contrastive_weight: float = Field(1e-3, ge=0.0)  # conloss · 1e-3
        temperature: float = Field(0.5, gt=0.0)  # Contrastive_loss(0.5)
        zeta: float = Field(0.01, ge=0.0)  # --zeta 0.01
        modulation_start: int = Field(5, ge=0)  # --modulation_starts 5
        modulation_end: int = Field(100, ge=0)  # --modulation_ends 100

    def __init__(self, cfg, modalities, context):
        super().__init__(cfg, modalities, context)
        if cfg.model.fusion != "eau" or cfg.method.aib != "off" or cfg.method.unimodal_weight != 0:
            raise ConfigError(f"method.strategy: eau needs model.fusion: eau (got {cfg.model.fusion!r}), method.aib: "
                              f"off (got {cfg.method.aib!r}) and method.unimodal_weight: 0 (got "
                              f"{cfg.method.unimodal_weight:g}): EAU's loss is on the eau fusion's latents, "
                              "without unimodal cross-entropies")
        fp = cfg.model.fusion_params
        if cfg.distributed.workers > 1 and fp.get("batchnorm", True):
            raise ConfigError("method.strategy: eau with distributed.workers > 1 needs model.fusion_params.batchnorm: "
                              "false: the reference head's BatchNorm normalises with each worker's shard statistics, "
                              "so 2 workers would not train what 1 process does")
        self.latent, self.num_classes = int(fp.get("latent_dim", 128)), context.num_classes
        self._unc_sum: torch.Tensor | None = None  # Σ over the update's samples of the per-modality U
        self._unc_n = 0
        self.last_scales = {m: 1.0 for m in self.modalities}  # the epoch's last gradient scales (logged)

    def on_contributions(self, W):
        return {"a": {m: 0.0 for m in self.modalities}}  # no contribution-softmax a: logged as 0

    def loss_terms(self, step: Step, terms):
        p = self.params
        parts = unpack(step.out.fused_repr.float(), self.modalities, self.latent, self.num_classes)
        mods = parts["modalities"]
        kl = kl_to_standard_normal(parts["mu"], parts["logvar"]) + sum(
            kl_to_standard_normal(q["mu"], q["logvar"]) for q in mods.values())
        reg = sum(kl_regular(mods[b]["mu"], mods[b]["logvar"], mods[a]["mu"], mods[a]["logvar"])
                  for i, a in enumerate(self.modalities) for b in self.modalities[i + 1:])
        con = sum(info_nce(global_batch(q["z1"].detach(), own=q["z1"]), global_batch(q["z2"].detach(), own=q["z2"]),
                           p.temperature) for q in mods.values())
        world = world_size()
        con = con.detach() + world * (con - con.detach()) if world > 1 else con  # DDP's mean → the global gradient
        out = {**terms, "eau_kl": p.kl_weight * kl, "eau_ib": p.ib_weight * F.cross_entropy(parts["ib"], step.labels),
               "eau_regular": p.regular_weight * reg, "eau_contrastive": p.contrastive_weight * con}
        unc = torch.stack([mods[m]["uncertainty"].detach().double().sum() for m in self.modalities])
        self._unc_sum = unc if self._unc_sum is None else self._unc_sum + unc
        self._unc_n += len(step.labels)
        step.log.update({f"loss_{k}": v.detach() for k, v in out.items() if k.startswith("eau_")})
        return out

    def gradient_scales(self) -> dict[str, float]:
        """1 + ζ · mean_{k≠m} Ū_k per modality, Ū over the update's global batches."""
        n = float(all_reduce_sum(torch.tensor(float(self._unc_n), dtype=torch.float64, device=self._unc_sum.device)))
        mean = (all_reduce_sum(self._unc_sum) / max(n, 1.0)).tolist()
        u = dict(zip(self.modalities, mean))
        others = {m: [u[k] for k in self.modalities if k != m] or [u[m]] for m in self.modalities}
        return {m: 1.0 + self.params.zeta * sum(v) / len(v) for m, v in others.items()}

    def after_backward(self, model, step: Step) -> None:
        if self._unc_sum is None:
            return
        active = self.params.modulation_start <= step.epoch <= self.params.modulation_end
        scales = self.gradient_scales() if active else {}
        self._unc_sum, self._unc_n = None, 0
        for m, scale in scales.items():
            for param in [*model.modality_parameters(m), *model.fusion.branch_parameters(m)]:
                if param.grad is not None:
                    param.grad.mul_(scale)
        self.last_scales = {m: scales.get(m, 1.0) for m in self.modalities}

    def on_epoch_end(self, model, epoch, evaluate):
        return {f"eau_scale_{m}": s for m, s in self.last_scales.items()}
