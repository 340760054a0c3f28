"""Bootstrap over runs for :mod:`lightning_scaling.fit` (SPEC.md §3): resample runs with replacement,
refit, percentile intervals. :func:`bootstrap` and :class:`BootstrapResult` are re-exported by
:mod:`lightning_scaling.fit`.

The fitters and result types live in :mod:`lightning_scaling.fit`, which imports this module; they are
imported inside the functions here so that either module can be imported first. Pure numpy/scipy: imports
neither lightning, torch nor triton.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_scaling._batched_lbfgs import batched_lbfgs
from lightning_scaling._validation import fraction, one_of, positive_float, positive_int

if TYPE_CHECKING:
    from lightning_scaling.fit import FrontierFit, LawFit, ScalingPoints


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
        return {"confidence": self.confidence, "budget": self.budget, "n_resamples": self.n_resamples,
                "failed": self.failed, "intervals": {k: list(v) for k, v in self.intervals.items()}}


def _optimum_of(fit: LawFit | FrontierFit, budget: float) -> dict[str, float]:
    from lightning_scaling.fit import FrontierFit, optimal_params_numeric

    if isinstance(fit, FrontierFit):
        n, d = fit.optimal(budget)
        return {"n_opt": n, "d_opt": d}
    if fit.approach == "3":
        alloc = fit.law.compute_optimal(budget)
        return {"n_opt": float(alloc.params), "d_opt": float(alloc.tokens), "loss_opt": float(alloc.loss)}
    n = optimal_params_numeric(fit.law.loss, budget)
    d = budget / (6.0 * n)  # C = 6ND
    return {"n_opt": n, "d_opt": d, "loss_opt": float(fit.law.loss(n, d))}


def _summary(fit: LawFit | FrontierFit, budget: float) -> dict[str, float]:
    out = dict(fit.parameters)
    out.update(a=fit.a, b=fit.b)
    out.update(_optimum_of(fit, budget))
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


def bootstrap(points: ScalingPoints, approach: str = "3", n_resamples: int = 200, *, budget: float | None = None,
              confidence: float = 0.95, seed: int = 0, fit: LawFit | FrontierFit | None = None,
              **fit_kwargs: Any) -> BootstrapResult:
    """Resample runs with replacement ``n_resamples`` times, refit, and report percentile intervals.

    For approach 3 and Kaplan all resamples are refitted together in one batched L-BFGS (each resample a
    weighted objective), started from the distinct local minima the full-data fit found (``fit``, computed
    when not given) and polished with scipy. ``budget`` (FLOPs) is where the optimum is reported; default:
    the largest budget in the data.
    """
    from lightning_scaling.fit import APPROACHES, HUBER_DELTA, fit_approach1, fit_approach2, fit_approach3, fit_kaplan

    approach = one_of("approach", str(approach), APPROACHES)
    n_resamples = positive_int("n_resamples", n_resamples)
    confidence = fraction("confidence", confidence, inclusive_high=False)
    budget = float(np.max(points.flops)) if budget is None else positive_float("budget", budget)
    rng = np.random.default_rng(seed)
    counts = _resample_counts(points, n_resamples, rng)
    fitter = {"1": fit_approach1, "2": fit_approach2, "3": fit_approach3, "kaplan": fit_kaplan}[approach]
    if fit is None:
        fit = fitter(points, **fit_kwargs)
    summaries: list[dict[str, float]] = []
    failed = 0
    if approach in ("3", "kaplan"):
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


def _bootstrap_law(points: ScalingPoints, fit: LawFit, counts: np.ndarray, budget: float, delta: float
                   ) -> tuple[list[dict[str, float]], int]:
    from lightning_scaling.fit import LawFit, _approach3_objective, _kaplan_objective, frontier_exponents
    from lightning_scaling.laws import ChinchillaLaw, KaplanLaw

    log_n, log_d, log_l = np.log(points.params), np.log(points.tokens), np.log(points.loss)
    if fit.approach == "3":
        fun = _approach3_objective(log_n, log_d, log_l, delta)
    else:
        fun = _kaplan_objective(log_n, log_d, log_l, delta)
    starts = fit.local_minima if fit.local_minima is not None else fit.theta[None, :]
    starts = np.vstack([fit.theta[None, :], starts])[:4]
    k = starts.shape[0]
    x0 = np.repeat(starts[None, :, :], counts.shape[0], axis=0).reshape(-1, starts.shape[1])
    weights = np.repeat(counts, k, axis=0)
    x, f, _ = batched_lbfgs(fun, x0, weights=weights)
    x, f = x.reshape(counts.shape[0], k, -1), f.reshape(counts.shape[0], k)
    out, failed = [], 0
    for s in range(counts.shape[0]):
        theta = x[s, int(np.argmin(f[s]))]
        if not np.all(np.isfinite(theta)):
            failed += 1
            continue
        if fit.approach == "3":
            a_, b_, e_, alpha, beta = (float(v) for v in theta)
            if alpha <= 0 or beta <= 0:
                failed += 1
                continue
            law = ChinchillaLaw(E=math.exp(e_), A=math.exp(a_), B=math.exp(b_), alpha=alpha, beta=beta)
            params = {"E": law.E, "A": law.A, "B": law.B, "alpha": alpha, "beta": beta}
            a, b = beta / (alpha + beta), alpha / (alpha + beta)  # Hoffmann 2022 eq. 4
        else:
            an, ad, lnc, ldc = (float(v) for v in theta)
            if an <= 0 or ad <= 0:
                failed += 1
                continue
            law = KaplanLaw(alpha_n=an, n_c=math.exp(lnc), alpha_d=ad, d_c=math.exp(ldc))
            params = {"alpha_n": an, "alpha_d": ad, "n_c": law.n_c, "d_c": law.d_c}
            a, b = frontier_exponents(law.loss, float(points.flops.min()), float(points.flops.max()))
        refit = LawFit(fit.approach, law, float(f[s].min()), np.zeros(0), theta, len(points), k, a, b, params)
        out.append(_summary(refit, budget))
    return out, failed
