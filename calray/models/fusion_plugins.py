"""Every fusion, registered by importing its module: the built-in fusions (calray.models.fusion) and
the baselines' fusions, one module each. The FUSIONS registry imports this module on first lookup."""

from __future__ import annotations

import calray.models.fusion  # noqa: F401, I001 — importing registers concat, sum, film, gated, late
import calray.models.block  # noqa: F401, I001 — BLOCK (Ben-Younes et al., AAAI 2019)
import calray.models.tmc  # noqa: F401, I001
import calray.models.qmf  # noqa: F401, I001
import calray.models.eau  # noqa: F401, I001 — EAU (Gao et al., CVPR 2024)
import calray.models.mmtm  # noqa: F401, I001 — MMTM (Joze et al., CVPR 2020)
import calray.models.mmbt  # noqa: F401, I001 — MMBT (Kiela et al., 2019)
import calray.models.mla  # noqa: F401, I001 — MLA's shared head (Zhang et al., CVPR 2024)
