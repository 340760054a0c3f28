"""Gradient noise scale: the simple noise scale B_simple = tr(Σ)/|G|² from squared gradient norms measured at
two batch sizes (McCandlish et al. 2018, arXiv 1812.06162, §2.2 and Appendix A.1).

Pure math: no Lightning, no Triton, no torch. Units: batch sizes and B_simple are in *samples* (the unit the
loss is a mean over per micro-batch, e.g. sequences); |G|² and tr(Σ) are in (loss units / parameter unit)².

Use :class:`NoiseScaleEstimator` when squared norms arrive one optimizer step at a time (a callback);
:func:`unbiased_estimates` is the one-step building block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lightning_scaling.argument_checks import fraction

__all__ = ["NoiseScaleEstimate", "NoiseScaleEstimator", "least_squares_line", "noise_scale", "unbiased_estimates"]


def unbiased_estimates(sq_small: float, sq_big: float, b_small: float, b_big: float) -> tuple[float, float]:
    """One step's unbiased estimates ``(|G|², tr(Σ))`` from squared gradient norms at two batch sizes.

    ``sq_small`` is |G_small|² (averaged over the small batches you have), ``sq_big`` is |G_big|²; ``b_small``
    and ``b_big`` are their batch sizes in samples (``b_small < b_big``). Both outputs are unbiased because
    E|G_B|² = |G|² + tr(Σ)/B; a single step's |G|² can be negative when ``b_big`` is far below B_simple.
    """
    if not b_big > b_small > 0:
        raise ValueError(f"b_big must exceed b_small > 0, got b_small={b_small!r}, b_big={b_big!r}")
    # McCandlish 2018, App. A.1 (docs/math.md §5): |G|² ≈ (B_big|G_big|² − B_small|G_small|²) / (B_big − B_small)
    grad_sq = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
    # McCandlish 2018, App. A.1 (docs/math.md §5): tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)
    trace_cov = (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace_cov


def least_squares_line(
    weight: float, sum_x: float, sum_xx: float, sum_y: float, sum_xy: float
) -> tuple[float, float] | None:
    """One step's unbiased ``(|G|², tr(Σ))`` from squared norms |G_B|² measured at several batch sizes.

    Takes the weighted sums over the points (x = 1/B, y = |G_B|²): Σw, Σw·x, Σw·x², Σw·y, Σw·x·y (B in samples).
    Since E|G_B|² = |G|² + tr(Σ)/B is linear in 1/B, the least-squares line y = |G|² + tr(Σ)·x has unbiased
    intercept and slope whatever the correlation between the points (nested partial sums of accumulated
    gradients, for example). With two points it is :func:`unbiased_estimates` (McCandlish 2018, App. A.1).
    Returns None when the points do not span two batch sizes.
    """
    spread = weight * sum_xx - sum_x * sum_x  # Σw · Σw(x − x̄)²
    if not (weight > 0 and spread > 1e-9 * weight * sum_xx):
        return None
    trace_cov = (weight * sum_xy - sum_x * sum_y) / spread
    grad_sq = (sum_y - trace_cov * sum_x) / weight
    return grad_sq, trace_cov


def noise_scale(grad_sq: float, trace_cov: float) -> float:
    """B_simple = tr(Σ)/|G|² in samples (McCandlish 2018, §2.2); NaN unless |G|² > 0."""
    # McCandlish 2018, §2.2 (docs/math.md §5): B_simple = tr(Σ) / |G|²
    if not (grad_sq > 0 and math.isfinite(grad_sq) and math.isfinite(trace_cov)):
        return math.nan
    return trace_cov / grad_sq


@dataclass(frozen=True)
class NoiseScaleEstimate:
    """The current estimate. ``b_simple`` and ``stderr`` are in samples; NaN where not available yet.

    ``stderr`` is a delta-method standard error that treats the smoothed steps as independent; in real
    training consecutive steps are correlated, so read it as a lower bound on the uncertainty.
    """

    b_simple: float
    stderr: float
    grad_sq: float
    trace_cov: float
    measurements: int


class NoiseScaleEstimator:
    """Separate bias-corrected exponential moving averages of the unbiased |G|² and tr(Σ), then their ratio.

    Never averages per-step ratios tr(Σ)_t/|G|²_t: that ratio of noisy quantities is biased (and undefined
    when a step's |G|² is near zero or negative). The EMAs also track second moments so the ratio gets a
    delta-method standard error.

    Args:
        ema_decay: weight of the past per measurement, in (0, 1). The average covers about
            (1 + ema_decay)/(1 − ema_decay) measurements.
    """

    def __init__(self, ema_decay: float = 0.99) -> None:
        self.ema_decay = fraction("ema_decay", ema_decay, inclusive_high=False)
        self.reset()

    def reset(self) -> None:
        self.count = 0
        # raw (not yet bias-corrected) EMAs of G, T, G², T², G·T where G = |G|², T = tr(Σ) per step
        self._m = [0.0, 0.0, 0.0, 0.0, 0.0]

    # --- updates -------------------------------------------------------------------------------------------
    def update(self, sq_small: float, sq_big: float, b_small: float, b_big: float) -> None:
        """Add one step's squared norms (see :func:`unbiased_estimates`). Non-finite input raises ValueError."""
        values = (sq_small, sq_big, b_small, b_big)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"non-finite measurement {values!r}")
        g, t = unbiased_estimates(sq_small, sq_big, b_small, b_big)
        self.update_estimates(g, t)

    def update_estimates(self, grad_sq: float, trace_cov: float) -> None:
        """Add one step's unbiased ``(|G|², tr(Σ))`` directly."""
        beta = self.ema_decay
        for i, x in enumerate((grad_sq, trace_cov, grad_sq * grad_sq, trace_cov * trace_cov, grad_sq * trace_cov)):
            self._m[i] = beta * self._m[i] + (1.0 - beta) * x
        self.count += 1

    # --- reading -------------------------------------------------------------------------------------------
    def _corrected(self) -> list[float]:
        # Adam-style bias correction (Kingma & Ba 2015, §3): divide by 1 − β^t
        norm = 1.0 - self.ema_decay**self.count
        return [m / norm for m in self._m]

    def effective_count(self) -> float:
        """Effective number of measurements behind the weighted average, (Σw)²/Σw² (Kish's formula)."""
        if self.count == 0:
            return 0.0
        b, t = self.ema_decay, self.count
        # weights w_i ∝ β^(t−i): (Σw)²/Σw² = (1−β^t)²(1−β²)/((1−β)²(1−β^{2t}))
        return (1 - b**t) ** 2 * (1 - b * b) / ((1 - b) ** 2 * (1 - b ** (2 * t)))

    @property
    def grad_sq(self) -> float:
        """Smoothed |G|² (NaN before the first measurement)."""
        return self._corrected()[0] if self.count else math.nan

    @property
    def trace_cov(self) -> float:
        """Smoothed tr(Σ) (NaN before the first measurement)."""
        return self._corrected()[1] if self.count else math.nan

    @property
    def b_simple(self) -> float:
        """B_simple in samples: ratio of the smoothed tr(Σ) and |G|² (NaN unless |G|² > 0)."""
        return noise_scale(self.grad_sq, self.trace_cov) if self.count else math.nan

    def stderr(self) -> float:
        """Delta-method standard error of :attr:`b_simple`, in samples (NaN with fewer than 3 measurements).

        Var(T̄/Ḡ) ≈ (Var T + R² Var G − 2R Cov(G, T)) / (n_eff Ḡ²) with R = T̄/Ḡ, per-step (co)variances from
        the same weighted moments, and n_eff the effective count. Assumes the measurements are independent.
        """
        ratio = self.b_simple
        n_eff = self.effective_count()
        if self.count < 3 or not math.isfinite(ratio) or n_eff <= 1:
            return math.nan
        g, t, gg, tt, gt = self._corrected()
        unbias = n_eff / (n_eff - 1)  # weighted-variance small-sample correction
        var_g = max(gg - g * g, 0.0) * unbias
        var_t = max(tt - t * t, 0.0) * unbias
        cov = (gt - g * t) * unbias
        var_ratio = (var_t + ratio * ratio * var_g - 2 * ratio * cov) / (n_eff * g * g)
        return math.sqrt(max(var_ratio, 0.0))

    def estimate(self) -> NoiseScaleEstimate:
        """The current :class:`NoiseScaleEstimate`."""
        return NoiseScaleEstimate(self.b_simple, self.stderr(), self.grad_sq, self.trace_cov, self.count)

    # --- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"ema_decay": self.ema_decay, "count": self.count, "moments": list(self._m)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self._m = [float(v) for v in state["moments"]]
