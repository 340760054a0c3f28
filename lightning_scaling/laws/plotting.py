"""Plots of a scaling-law fit (the ``plot`` extra: matplotlib, Agg backend, imported on first use).

:func:`plot_fit` writes one PNG with three panels: isoFLOP curves (loss against N per compute budget, with
each budget's parabola minimum), loss contours of the fitted law over (N, D) with the compute-optimal
frontier, and predicted against observed loss.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from lightning_scaling.laws.definitions import ChinchillaLaw
from lightning_scaling.laws.fitting import FrontierFit, LawFit, ScalingPoints, group_budgets, optimal_params_numeric


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install 'lightning-scaling[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _frontier(fit: LawFit | FrontierFit, flops: np.ndarray) -> np.ndarray:
    """N_opt (parameters) at each of ``flops``."""
    if isinstance(fit, FrontierFit):
        return fit.n_coefficient * flops**fit.a
    if isinstance(fit.law, ChinchillaLaw):  # approach 3: the closed form
        return np.asarray(fit.law.compute_optimal(flops).params, dtype=float)
    return np.asarray([optimal_params_numeric(fit.law.loss, float(c)) for c in flops])


def plot_isoflops(ax: Any, points: ScalingPoints, budget_tolerance: float = 0.1) -> None:
    """Loss against N for each compute budget, with the parabola in log N and its minimum (approach 2)."""
    groups = [g for g in group_budgets(points.flops, budget_tolerance) if g.size >= 1]
    colours = _colours(len(groups))
    for colour, g in zip(colours, groups, strict=True):
        c = float(np.exp(np.mean(np.log(points.flops[g]))))
        order = g[np.argsort(points.params[g])]
        ax.plot(points.params[order], points.loss[order], "o", color=colour, ms=4, label=f"{c:.2g} FLOPs")
        x = np.log(points.params[order])
        if np.unique(np.round(x, 9)).size >= 3:
            quad, lin, const = np.polyfit(x, points.loss[order], 2)  # Hoffmann 2022 §3.2
            grid = np.linspace(x.min(), x.max(), 100)
            ax.plot(np.exp(grid), np.polyval([quad, lin, const], grid), "-", color=colour, lw=1)
            if quad > 0 and x.min() <= -lin / (2 * quad) <= x.max():
                x_opt = -lin / (2 * quad)
                ax.plot(math.exp(x_opt), np.polyval([quad, lin, const], x_opt), "*", color=colour, ms=12, mec="black")
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("isoFLOP curves and their minima")
    if len(groups) <= 12:
        ax.legend(fontsize=6)


def plot_contours(ax: Any, points: ScalingPoints, fit: LawFit | FrontierFit) -> None:
    """Contours of the fitted loss over (N, D) (laws only), the runs, and the compute-optimal frontier."""
    n_lo, n_hi = points.params.min() / 3, points.params.max() * 3
    d_lo, d_hi = points.tokens.min() / 3, points.tokens.max() * 3
    if fit.law is not None:
        n_grid = np.geomspace(n_lo, n_hi, 120)
        d_grid = np.geomspace(d_lo, d_hi, 120)
        nn, dd = np.meshgrid(n_grid, d_grid)
        zz = np.asarray(fit.law.loss(nn, dd), dtype=float)
        cs = ax.contour(nn, dd, zz, levels=14, cmap="viridis", linewidths=0.8)
        ax.clabel(cs, fontsize=6, fmt="%.2f")
    flops = np.geomspace(6 * n_lo * d_lo, 6 * n_hi * d_hi, 60)
    n_opt = _frontier(fit, flops)
    d_opt = flops / (6.0 * n_opt)  # C = 6ND (Kaplan 2020 Table 1)
    inside = (n_opt >= n_lo) & (n_opt <= n_hi) & (d_opt >= d_lo) & (d_opt <= d_hi)
    ax.plot(n_opt[inside], d_opt[inside], "r-", lw=2, label="efficient frontier")
    ax.scatter(
        points.params, points.tokens, c=points.loss, cmap="viridis", s=12, edgecolors="k", linewidths=0.3, label="runs"
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(n_lo, n_hi)
    ax.set_ylim(d_lo, d_hi)
    ax.set_xlabel("parameters N")
    ax.set_ylabel("tokens D")
    ax.set_title("loss contours and the efficient frontier" if fit.law is not None else "runs and the frontier")
    ax.legend(fontsize=6)


def plot_predicted(ax: Any, points: ScalingPoints, fit: LawFit | FrontierFit) -> None:
    """Predicted against observed loss (laws); for approaches 1/2, N_opt fitted against observed."""
    if isinstance(fit, LawFit):
        predicted = np.asarray(fit.law.loss(points.params, points.tokens), dtype=float)
        ax.plot(points.loss, predicted, "o", ms=3)
        lo, hi = min(points.loss.min(), predicted.min()), max(points.loss.max(), predicted.max())
        ax.set_xlabel("observed loss")
        ax.set_ylabel("predicted loss")
        ax.set_title("predicted against observed")
    else:
        observed = fit.optima[:, 1]
        predicted = fit.n_coefficient * fit.optima[:, 0] ** fit.a
        ax.loglog(observed, predicted, "o", ms=4)
        lo, hi = min(observed.min(), predicted.min()), max(observed.max(), predicted.max())
        ax.set_xlabel("N_opt at each budget (observed)")
        ax.set_ylabel("N_opt from the power law")
        ax.set_title(f"approach {fit.approach}: N_opt ∝ C^{fit.a:.3f}")
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)


def plot_fit(
    points: ScalingPoints, fit: LawFit | FrontierFit, path: str | Path, *, budget_tolerance: float = 0.1, dpi: int = 120
) -> Path:
    """Write the three panels to ``path`` (PNG, or any format matplotlib knows by the suffix)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    try:
        plot_isoflops(axes[0], points, budget_tolerance)
        plot_contours(axes[1], points, fit)
        plot_predicted(axes[2], points, fit)
        fig.tight_layout()
        path = Path(path)
        try:
            fig.savefig(path, dpi=dpi)
        except (OSError, ValueError) as err:
            raise ValueError(f"plot path {str(path)!r} cannot be written: {err}") from None
    finally:
        plt.close(fig)
    return path


def _colours(count: int) -> list[Any]:
    plt = _pyplot()
    cmap = plt.get_cmap("plasma")
    return [cmap(k / max(1, count - 1) * 0.85) for k in range(count)]
