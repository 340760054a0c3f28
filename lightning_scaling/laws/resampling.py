"""The bootstrap over runs: resample whole runs with replacement, refit with the fitters of
:mod:`lightning_scaling.laws.fitting`, and report percentile intervals (Efron & Tibshirani 1993, ch. 13).
:func:`bootstrap` and :class:`BootstrapResult` are re-exported by :mod:`lightning_scaling.laws`. Pure numpy:
imports neither scipy, lightning, torch nor triton.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_scaling.argument_checks import fraction, one_of, positive_float, positive_int
from lightning_scaling.laws.batched_bfgs import batched_bfgs, batched_newton, distinct_best
from lightning_scaling.laws.definitions import ChinchillaLaw, KaplanLaw
from lightning_scaling.laws.fitting import (
    APPROACHES,
    HUBER_DELTA,
    FrontierFit,
    LawFit,
    ScalingPoints,
    _approach3_hessian,
    _approach3_objective,
    _distinct,
    _effect_problem,
    _exponent_problem,
    _kaplan_objective,
    fit_approach1,
    fit_approach2,
    fit_approach3,
    fit_kaplan,
    frontier_exponents,
    optimum_at,
)


@dataclass(frozen=True)
class BootstrapResult:
    """Percentile intervals from refitting on runs resampled with replacement.

    ``intervals[name] = (low, high)`` at ``confidence``; names: every fitted parameter, ``a``, ``b``, and at
    ``budget`` FLOPs ``n_opt`` (parameters), ``d_opt`` (tokens) and, for laws, ``loss_opt`` (nats).
    ``samples[name]`` holds the refits that succeeded (``failed`` counts the rest)."""

    intervals: dict[str, tuple[float, float]]
    samples: dict[str, np.ndarray]
    confidence: float
    budget: float
    n_resamples: int
    failed: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "confidence": self.confidence,
            "budget": self.budget,
            "n_resamples": self.n_resamples,
            "failed": self.failed,
            "intervals": {k: list(v) for k, v in self.intervals.items()},
        }


def _summary(fit: LawFit | FrontierFit, budget: float) -> dict[str, float]:
    out = dict(fit.parameters)
    out.update(a=fit.a, b=fit.b)
    out.update(optimum_at(fit, budget))
    return out


def _resample_counts(pts: ScalingPoints, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, n_points) multiplicities from drawing runs with replacement."""
    groups = pts.run_groups()
    counts = np.zeros((n_resamples, len(pts)))
    draws = rng.integers(0, len(groups), size=(n_resamples, len(groups)))
    for s in range(n_resamples):
        run_counts = np.bincount(draws[s], minlength=len(groups))
        for k, g in enumerate(groups):
            counts[s, g] = run_counts[k]
    return counts


def bootstrap(
    points: ScalingPoints,
    approach: str = "3",
    n_resamples: int = 200,
    *,
    budget: float | None = None,
    confidence: float = 0.95,
    seed: int = 0,
    fit: LawFit | FrontierFit | None = None,
    **fit_kwargs: Any,
) -> BootstrapResult:
    """Resample runs with replacement ``n_resamples`` times, refit, and report percentile intervals.

    For approach 3 and Kaplan all resamples are refitted together in one batched minimisation (each
    resample a weighted objective), started from the best distinct optima the full-data fit found (``fit``,
    computed when not given); a resample whose fit the full fit would reject as undetermined counts as
    failed. ``budget`` (FLOPs) is where the optimum is reported; default:
    the largest budget in the data.
    """

    approach = one_of("approach", str(approach), APPROACHES)
    n_resamples = positive_int("n_resamples", n_resamples)
    confidence = fraction("confidence", confidence, inclusive_high=False)
    budget = float(np.max(points.flops)) if budget is None else positive_float("budget", budget)
    rng = np.random.default_rng(seed)
    counts = _resample_counts(points, n_resamples, rng)
    fitters: dict[str, Callable[..., LawFit | FrontierFit]] = {
        "1": fit_approach1,
        "2": fit_approach2,
        "3": fit_approach3,
        "kaplan": fit_kaplan,
    }
    fitter = fitters[approach]
    if fit is None:
        fit = fitter(points, **fit_kwargs)
    elif fit.approach != approach:
        raise ValueError(
            f"fit comes from approach {fit.approach!r} but approach is {approach!r}; pass the fit of the same "
            "approach, or leave fit out to fit it here"
        )
    summaries: list[dict[str, float]] = []
    failed = 0
    if isinstance(fit, LawFit):  # approach 3 or Kaplan
        summaries, failed = _bootstrap_law(points, fit, counts, budget, fit_kwargs.get("delta", HUBER_DELTA))
    else:
        for s in range(n_resamples):
            idx = np.repeat(np.arange(len(points)), counts[s].astype(int))
            sample = points.subset(idx)
            try:
                summaries.append(_summary(fitter(sample, **fit_kwargs), budget))
            except ValueError:
                failed += 1
    if not summaries:
        raise ValueError(f"every bootstrap resample failed to fit ({failed} of {n_resamples})")
    names = list(summaries[0])
    samples = {k: np.asarray([s[k] for s in summaries]) for k in names}
    tail = 100 * (1 - confidence) / 2
    intervals = {k: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) for k, v in samples.items()}
    return BootstrapResult(intervals, samples, confidence, budget, n_resamples, failed)


def _bootstrap_law(
    points: ScalingPoints, fit: LawFit, counts: np.ndarray, budget: float, delta: float
) -> tuple[list[dict[str, float]], int]:
    """Refit approach 3 or Kaplan on every resample at once: one row per (resample, start), the resample's
    multiplicities as point weights. Approach 3 runs Newton's method (its exact Hessian); Kaplan runs BFGS. A
    resample whose best fit the full fit would reject (fewer distinct model sizes or token counts than the
    fit needs, an exponent outside (0, MAX_EXPONENT], a term below the Huber threshold) counts as failed."""

    log_n, log_d, log_l = np.log(points.params), np.log(points.tokens), np.log(points.loss)
    starts = fit.local_minima if fit.local_minima is not None else fit.theta[None, :]
    starts = np.vstack([fit.theta[None, :], starts])
    starts = starts[distinct_best(starts, np.zeros(starts.shape[0]), 4, decimals=6)]
    k = starts.shape[0]
    x0 = np.repeat(starts[None, :, :], counts.shape[0], axis=0).reshape(-1, starts.shape[1])
    weights = np.repeat(counts, k, axis=0)
    if fit.approach == "3":
        fun = _approach3_objective(log_n, log_d, log_l, delta)
        x, f, _ = batched_newton(fun, _approach3_hessian(log_n, log_d, log_l, delta), x0, weights=weights)
        need = 3
    else:
        fun = _kaplan_objective(log_n, log_d, log_l, delta)
        x, f, *_ = batched_bfgs(fun, x0, weights=weights, ftol=1e-12)
        need = 2
    x, f = x.reshape(counts.shape[0], k, -1), f.reshape(counts.shape[0], k)
    out, failed = [], 0
    for s in range(counts.shape[0]):
        theta = x[s, int(np.argmin(f[s]))]
        sample = points.subset(np.flatnonzero(counts[s] > 0))
        if not (
            np.all(np.isfinite(theta))
            and np.all(np.abs(theta[:3]) < 700)
            and _distinct(sample.params).size >= need
            and _distinct(sample.tokens).size >= need
        ):
            failed += 1
            continue
        if fit.approach == "3":
            a_, b_, e_, alpha, beta = (float(v) for v in theta)
            exponents = {"alpha": alpha, "beta": beta}
        else:
            an, ad, lnc, ldc = (float(v) for v in theta)
            exponents = {"alpha_n": an, "alpha_d": ad}
        if _exponent_problem("bootstrap", exponents) is not None:
            failed += 1
            continue
        if fit.approach == "3":
            law: Any = ChinchillaLaw(E=math.exp(e_), A=math.exp(a_), B=math.exp(b_), alpha=alpha, beta=beta)
            params = {"E": law.E, "A": law.A, "B": law.B, "alpha": alpha, "beta": beta}
            a, b = beta / (alpha + beta), alpha / (alpha + beta)  # Hoffmann 2022 eq. 4
        else:
            law = KaplanLaw(alpha_n=an, n_c=math.exp(lnc), alpha_d=ad, d_c=math.exp(ldc))
            params = {"alpha_n": an, "alpha_d": ad, "n_c": law.n_c, "d_c": law.d_c}
            a, b = frontier_exponents(law.loss, float(points.flops.min()), float(points.flops.max()))
        if _effect_problem("bootstrap", law.loss, sample, delta) is not None:
            failed += 1
            continue
        refit = LawFit(fit.approach, law, float(f[s].min()), np.zeros(0), theta, len(points), k, a, b, params)
        out.append(_summary(refit, budget))
    return out, failed
