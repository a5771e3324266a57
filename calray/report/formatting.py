"""Small formatting helpers shared by every section: percentages, numbers, noise labels, file slugs."""

from __future__ import annotations

import math
import re

import numpy as np


def num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def pct(x, digits: int = 2) -> str:
    """An accuracy in [0, 1] as a percentage string ('—' when missing)."""
    v = num(x)
    return "—" if v is None else f"{100 * v:.{digits}f}"


def pct_mean_std(values) -> str:
    vals = [v for v in (num(x) for x in values) if v is not None]
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{100 * vals[0]:.2f} (n=1)"
    return f"{100 * np.mean(vals):.2f} ± {100 * np.std(vals, ddof=1):.2f} (n={len(vals)})"


def fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        return f"{float(x):.{digits}g}"
    return str(x)


def noise_label(noise: dict | None) -> str:
    noise = noise or {}
    kind = noise.get("kind") or "none"
    eps = num(noise.get("eps")) or 0.0
    if kind == "none" or eps == 0:
        return "clean"
    return f"{kind} ε={eps:g} ({noise.get('mode') or 'test'})"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "x"
