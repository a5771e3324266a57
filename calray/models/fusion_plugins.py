"""Every fusion, registered by importing its module: the built-in fusions (calray.models.fusion) and
the baselines' fusions, one module each. The FUSIONS registry imports this module on first lookup."""

from __future__ import annotations

import calray.models.fusion  # noqa: F401, I001 — importing registers concat, sum, film, gated, late
