"""The run's method plug-ins, built from its config: the gradient strategy (`method.strategy`, from the
strategy registry) followed by the asymmetric information bottleneck (always present: β is logged
even with `method.aib: off`, when it adds no loss term)."""

from __future__ import annotations

import calray.method.strategies  # noqa: F401, I001 — importing registers the strategies, in this order
import calray.method.ogm_ge  # noqa: F401, I001
import calray.method.agm  # noqa: F401, I001
import calray.method.arl  # noqa: F401, I001
import calray.method.pmr  # noqa: F401, I001
import calray.method.gblending  # noqa: F401, I001
import calray.method.tmc  # noqa: F401, I001
import calray.method.qmf  # noqa: F401, I001
import calray.method.eau  # noqa: F401, I001 — EAU (Gao et al., CVPR 2024)
import calray.method.mmpareto  # noqa: F401, I001 — MMPareto (Wei & Hu, ICML 2024)
import calray.method.mla  # noqa: F401, I001 — MLA (Zhang et al., CVPR 2024)
import calray.method.dr  # noqa: F401, I001 — Diagnosing & Re-learning (Wei et al., ECCV 2024)
from calray.method.asymmetric_ib import AsymmetricIB
from calray.method.base import Method, MethodContext
from calray.registry import STRATEGIES


def create_methods(cfg, modalities: list[str], context: MethodContext) -> list[Method]:
    strategy = STRATEGIES.get(cfg.method.strategy)(cfg, modalities, context)
    return [strategy, AsymmetricIB(cfg, modalities, context)]


def modulates_gradients(strategy: str) -> bool:
    """Whether `strategy` rescales gradients (and so is undone by an adaptive optimiser)."""
    return bool(getattr(STRATEGIES.get(strategy), "modulates", False))


def unimodal_logits_need_grad(cfg) -> bool:
    """Whether the run's loss can depend on the unimodal logits: a nonzero `method.unimodal_weight`, the
    AIB (its eq 19/20 terms hold the unimodal CEs), or a strategy that does not declare
    `unimodal_gradients = False` (calray.method.base)."""
    m = cfg.method
    return m.unimodal_weight != 0 or m.aib != "off" or bool(getattr(STRATEGIES.get(m.strategy), "unimodal_gradients", True))
