"""The AIB's variational head (paper eq 18): h_m → q(z_m | x_m) = N(μ, diag σ²), reparameterised."""

from __future__ import annotations

import torch
from torch import nn


class VariationalHead(nn.Module):
    """h → (μ, log σ²) → z (eq 18)."""

    def __init__(self, in_dim: int, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.params = nn.Linear(in_dim, 2 * latent_dim)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.params(h).chunk(2, dim=1)
        logvar = logvar.clamp(-20.0, 20.0)
        if self.training:
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        else:
            z = mu
        return z, mu, logvar
