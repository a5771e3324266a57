"""The report's matplotlib figures, each built from plain tables and returned as a figure (the
document embeds it). matplotlib is imported on first use, with the Agg backend: importing the
report (as the sweep runner does) stays light."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from calray.report.loading import modalities_from


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_dynamics(rows: pd.DataFrame, title: str):
    plt = _plt()
    mods = modalities_from(rows)
    ep = rows["epoch"].astype(float) + 1
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    if "val_acc" in rows:
        ax.plot(ep, rows["val_acc"], "k-o", ms=3, label="fused val acc")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    for a in axes:
        _integer_x(a)
    ax2 = ax.twinx()
    for m in mods:
        if f"W_{m}" in rows:
            ax2.plot(ep, rows[f"W_{m}"], "--", label=f"W {m}")
    ax2.set_ylabel("contribution W")
    _merge_legends(ax, ax2)
    ax.set_title("fused accuracy and contribution W (Fig. 3 left)")
    ax = axes[1]
    ax2 = ax.twinx()
    for i, m in enumerate(mods):
        color = f"C{i}"
        if f"val_acc_{m}" in rows:
            ax.plot(ep, rows[f"val_acc_{m}"], "-o", ms=3, color=color, label=f"{m} val acc")
        if f"a_{m}" in rows:
            ax2.plot(ep, rows[f"a_{m}"], "--", color=color, label=f"a {m}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("unimodal accuracy")
    ax2.set_ylabel("modulation weight a")
    _merge_legends(ax, ax2)
    ax.set_title("unimodal accuracy and a (Fig. 3 right)")
    ax = axes[2]
    for i, m in enumerate(mods):
        if f"beta_{m}" in rows:
            ax.plot(ep, rows[f"beta_{m}"], "-", color=f"C{i}", label=f"β {m}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("AIB compression β")
    ax.legend(fontsize=8)
    ax.set_title("AIB compression factor β")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _merge_legends(ax, ax2) -> None:
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    if h1 or h2:
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="best")


def plot_importance(imp: dict[str, float], title: str):
    plt = _plt()
    names = list(imp)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1.2))
    ax.barh(names, [imp[n] for n in names], color="C0")
    ax.set_xlabel("importance")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_history(points: list[tuple[int, float, str]], direction: str, title: str, ylabel: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    styles = {"COMPLETE": ("o", "C0"), "PRUNED": ("x", "C7")}
    for state, (marker, color) in styles.items():
        pts = [(n, v) for n, v, s in points if s == state and v is not None]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=color, label=state.lower(), zorder=3)
    failed = [n for n, v, s in points if s == "FAIL" or (s not in styles and v is None)]
    if failed:  # no value: marked on the bottom edge
        ax.scatter(failed, [0.02] * len(failed), marker="v", color="C3", transform=ax.get_xaxis_transform(),
                   label="failed / no value", zorder=3, clip_on=False)
    best, xs, ys = None, [], []
    for n, v, s in sorted(points):
        if s == "COMPLETE" and v is not None:
            best = v if best is None else (max(best, v) if direction == "maximize" else min(best, v))
        if best is not None:
            xs.append(n)
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="C1", label="best so far")
    _integer_x(ax)
    ax.set_xlabel("trial number")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_heatmaps(summary: pd.DataFrame, cell: str):
    plt = _plt()
    modes = [m for m in ("test", "train+test") if (summary["mode"] == m).any()]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 3.2), squeeze=False, layout="constrained")
    if "attacked" in summary.columns and summary["attacked"].nunique() > 1:  # one heat-map row per kind × attacked
        summary = summary.assign(kind=summary["kind"].astype(str) + " (" + summary["attacked"].astype(str) + ")")
    vals = summary["acc_mean"].astype(float)
    vmin, vmax = float(np.nanmin(vals)), float(np.nanmax(vals))
    im = None
    for ax, mode in zip(axes[0], modes):
        sub = summary[summary["mode"] == mode]
        piv = sub.pivot_table(index="kind", columns="eps", values="acc_mean", aggfunc="first")
        mat = piv.to_numpy(dtype=float)
        im = ax.imshow(mat, cmap="viridis", vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1e-6, aspect="auto")
        ax.set_xticks(range(len(piv.columns)), [f"{e:g}" for e in piv.columns])
        ax.set_yticks(range(len(piv.index)), list(piv.index))
        ax.set_xlabel("ε")
        ax.set_title(f"{cell}: {mode} (Table {'II' if mode == 'test' else 'III'} protocol)")
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                if not math.isnan(mat[i, j]):
                    ax.text(j, i, f"{100 * mat[i, j]:.1f}", ha="center", va="center",
                            color="white" if mat[i, j] < (vmin + vmax) / 2 else "black", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), label="mean test accuracy")
    return fig


def plot_curves(curves: dict[str, pd.DataFrame], title: str, mods: list[str]):
    """Accuracy vs epoch per axis value (mean over seed replicates, 95% CI band when n ≥ 2)."""
    plt = _plt()
    ncol = 2 if mods else 1
    fig, axes = plt.subplots(1, ncol, figsize=(6.5 * ncol, 4), squeeze=False)
    for a in axes[0]:
        _integer_x(a)
    ax = axes[0][0]
    for i, (label, df) in enumerate(curves.items()):
        _band(ax, df, "val_acc", f"C{i}", label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("fused val accuracy")
    ax.set_title("fused accuracy vs epoch (Fig. 2 left)")
    ax.legend(fontsize=8)
    if mods:
        ax = axes[0][1]
        for i, (label, df) in enumerate(curves.items()):
            for j, m in enumerate(mods):
                _band(ax, df, f"val_acc_{m}", f"C{i}", f"{label} {m}", ls=["-", "--", ":", "-."][j % 4])
        ax.set_xlabel("epoch")
        ax.set_ylabel("unimodal val accuracy")
        ax.set_title("unimodal accuracy vs epoch (Fig. 2 right)")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _band(ax, df: pd.DataFrame, col: str, color: str, label: str, ls: str = "-") -> None:
    if col not in df.columns:
        return
    g = df.dropna(subset=["epoch", col]).groupby("epoch")[col]
    mean, std, n = g.mean(), g.std(), g.size()
    x = mean.index.to_numpy(dtype=float) + 1
    ax.plot(x, mean.to_numpy(), ls, color=color, label=label + (f" (n={int(n.max())})" if n.max() > 1 else ""))
    if n.max() > 1:
        half = 1.96 * (std / np.sqrt(n)).fillna(0).to_numpy()
        ax.fill_between(x, mean.to_numpy() - half, mean.to_numpy() + half, color=color, alpha=0.2)


def plot_eps_curves(curves: pd.DataFrame, title: str, confidence: float):
    """Accuracy vs ε per variant, one panel per (mode, kind, attacked): the mean over final seeds and
    its t-interval band (calray.report.comparison.curve_table), where n ≥ 2."""
    plt = _plt()
    panels = list(curves.groupby(["mode", "kind", "attacked"], sort=True).groups)
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.6 * nrow), squeeze=False)
    variants = sorted(curves["variant"].unique())
    for ax, (mode, kind, attacked) in zip(axes.flat, panels):
        sub = curves[(curves["mode"] == mode) & (curves["kind"] == kind) & (curves["attacked"] == attacked)]
        for i, v in enumerate(variants):
            c = sub[sub["variant"] == v].sort_values("eps")
            if c.empty:
                continue
            x = c["eps"].to_numpy(dtype=float)
            ax.plot(x, c["mean"].to_numpy(dtype=float), "-o", ms=3, color=f"C{i}",
                    label=f"{v} (n={int(c['n'].max())})")
            lo, hi = c["ci_low"].to_numpy(dtype=float), c["ci_high"].to_numpy(dtype=float)
            if np.isfinite(lo).any():
                ax.fill_between(x, lo, hi, color=f"C{i}", alpha=0.2)
        lo_y, hi_y = ax.get_ylim()  # an interval may reach past [0, 1]; accuracy cannot
        ax.set_ylim(max(lo_y, 0.0), min(hi_y, 1.0))
        ax.set_xlabel("ε")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{kind}, {mode}, attacked: {attacked}", fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{title} (bands: {100 * confidence:g}% t-interval over final seeds)")
    fig.tight_layout()
    return fig
