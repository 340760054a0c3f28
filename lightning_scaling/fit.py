"""Fitting scaling laws to a ladder of training runs (SPEC.md §3).

* :func:`fit_approach3` fits Chinchilla's L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, eq. 2) by the
  paper's procedure: the SUM over runs of Huber(δ = 1e-3) on log-sum-exp minus log loss, L-BFGS from a grid
  of 4,500 starts. All starts run at once in a batched L-BFGS (numpy, analytic gradients); the best few are
  polished with scipy. The full grid takes seconds, a per-start scipy loop minutes.
* :func:`fit_approach2`: isoFLOP parabolas, N_opt ∝ C^a and D_opt ∝ C^b.
* :func:`fit_approach1`: the envelope of lowest loss per FLOP across training curves.
* :func:`fit_kaplan`: Kaplan et al. 2020's L(N, D) = [(N_c/N)^(α_N/α_D) + D_c/D]^α_D.
* :func:`bootstrap`: resample runs, refit, percentile intervals (in :mod:`lightning_scaling.fit_bootstrap`,
  re-exported here).

The generic batched optimiser (batched L-BFGS, multistart, scipy polish) lives in
:mod:`lightning_scaling._batched_lbfgs`; this module holds the scaling-law objectives, fitters and result types.

Units: N in parameters, D in training tokens, C in training FLOPs (C = 6ND unless given), loss in nats per
token. Pure numpy/scipy: imports neither lightning nor triton.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from lightning_scaling._batched_lbfgs import ObjectiveFn, batched_lbfgs, distinct_best, multistart, scipy_polish
from lightning_scaling._validation import positive_array, positive_float, positive_int
from lightning_scaling.fit_bootstrap import (  # noqa: F401  (re-exported: the bootstrap's home since the split)
    BootstrapResult,
    _optimum_of,
    _resample_counts,
    bootstrap,
)

HUBER_DELTA = 1e-3  # Hoffmann et al. 2022, App. D.2: Huber δ = 1e-3 on log loss

# Hoffmann et al. 2022, App. D.2: initialisation grid α, β ∈ {0, 0.5, …, 2}, e ∈ {−1, −.5, …, 1}, a, b ∈ {0, 5, …, 25}
GRID_ALPHA = np.arange(0.0, 2.01, 0.5)
GRID_BETA = np.arange(0.0, 2.01, 0.5)
GRID_E = np.arange(-1.0, 1.01, 0.5)
GRID_A = np.arange(0.0, 25.01, 5.0)
GRID_B = np.arange(0.0, 25.01, 5.0)

APPROACHES = ("1", "2", "3", "kaplan")


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScalingPoints:
    """Observed (N, D, C, loss) points: N parameters, D training tokens, C training FLOPs, loss in nats.

    ``runs`` labels which training run each point belongs to (several points per run when reading per-step
    curves); the bootstrap resamples runs, approach 1 draws one curve per run.
    """

    params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    flops: np.ndarray
    runs: np.ndarray

    @classmethod
    def from_arrays(cls, params: Any, tokens: Any = None, loss: Any = None, *, flops: Any = None,
                    runs: Sequence[Any] | None = None) -> "ScalingPoints":
        """Check and pack arrays. Give ``tokens`` or ``flops`` (then D = C / (6N), Kaplan 2020 Table 1)."""
        n = positive_array("params", params).ravel()
        if loss is None:
            raise ValueError("loss is required")
        ell = positive_array("loss", loss).ravel()
        if tokens is None and flops is None:
            raise ValueError("give tokens or flops (tokens = flops / (6 * params))")
        c = None if flops is None else positive_array("flops", flops).ravel()
        if tokens is None:
            d = c / (6.0 * n) if c.size == n.size else None  # Kaplan 2020 Table 1: C ≈ 6ND
        else:
            d = positive_array("tokens", tokens).ravel()
        for name, arr in (("tokens", d), ("loss", ell), ("flops", c)):
            if arr is not None and arr.size != n.size:
                raise ValueError(f"{name} has {arr.size} values but params has {n.size}; they must match")
        if c is None:
            c = 6.0 * n * d  # Kaplan 2020 Table 1: C ≈ 6ND
        if runs is None:
            labels = np.arange(n.size).astype(str)
        else:
            labels = np.asarray([str(r) for r in runs])
            if labels.size != n.size:
                raise ValueError(f"runs has {labels.size} labels but params has {n.size}; they must match")
        return cls(n, d, ell, c, labels)

    def __len__(self) -> int:
        return int(self.params.size)

    def subset(self, index: np.ndarray) -> "ScalingPoints":
        return ScalingPoints(self.params[index], self.tokens[index], self.loss[index], self.flops[index],
                             self.runs[index])

    def drop_highest_loss(self, count: int) -> "ScalingPoints":
        """Without the ``count`` highest-loss points (Besiroglu et al. 2024 drop 5 outliers this way)."""
        if count == 0:
            return self
        count = positive_int("drop_highest_loss", count)
        if count >= len(self):
            raise ValueError(f"drop_highest_loss={count} would leave no points (there are {len(self)})")
        keep = np.sort(np.argsort(self.loss, kind="stable")[: len(self) - count])
        return self.subset(keep)

    def run_groups(self) -> list[np.ndarray]:
        """Indices of the points of each run, in order of first appearance."""
        _, first, inverse = np.unique(self.runs, return_index=True, return_inverse=True)
        order = np.argsort(first)
        return [np.flatnonzero(inverse == k) for k in order]


def _points(params: Any, tokens: Any, loss: Any, flops: Any = None, runs: Any = None) -> ScalingPoints:
    if isinstance(params, ScalingPoints):
        return params
    return ScalingPoints.from_arrays(params, tokens, loss, flops=flops, runs=runs)


# ----------------------------------------------------------------------------------------------------------
# approach 3 (Hoffmann et al. 2022 §3.3, App. D.2)
# ----------------------------------------------------------------------------------------------------------


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss and its derivative (Huber 1964): r²/2 for |r| ≤ δ, δ(|r| − δ/2) beyond.

    The derivative is clip(r, −δ, δ), and the loss is clip·(r − clip/2) in both regimes."""
    deriv = np.clip(r, -delta, delta)
    return deriv * (r - 0.5 * deriv), deriv


def _chinchilla_log_residuals(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Residuals LSE(a − α log N, b − β log D, e) − log L (Hoffmann 2022, App. D.2) and the softmax weights
    of the first two terms (the third is 1 − w1 − w2). theta: (S, 5) rows (a, b, e, α, β); returns (S, n)."""
    a, b, e, alpha, beta = (theta[:, k : k + 1] for k in range(5))
    t1 = alpha * log_n
    np.subtract(a, t1, out=t1)
    t2 = beta * log_d
    np.subtract(b, t2, out=t2)
    m = np.maximum(t1, t2)
    np.maximum(m, e, out=m)
    # exponents below -40 (terms under 4e-18 of the largest) are clipped: exp into subnormals is very slow
    np.subtract(t1, m, out=t1)
    np.maximum(t1, -40.0, out=t1)
    np.exp(t1, out=t1)  # z1
    np.subtract(t2, m, out=t2)
    np.maximum(t2, -40.0, out=t2)
    np.exp(t2, out=t2)  # z2
    tot = np.subtract(e, m)
    np.maximum(tot, -40.0, out=tot)
    np.exp(tot, out=tot)
    tot += t1
    tot += t2
    r = np.log(tot)
    r += m
    r -= log_l
    np.reciprocal(tot, out=tot)
    t1 *= tot
    t2 *= tot
    return r, t1, t2


def _approach3_objective(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float,
                         dtype: type = np.float64) -> ObjectiveFn:
    """Σ_i w_i Huber_δ(r_i) and its gradient in θ = (a, b, e, α, β) for each row of θ (Hoffmann 2022, App. D.2).

    ``dtype=np.float32`` evaluates twice as fast to about 1e-6 relative accuracy: good for the coarse
    batched search, not for the final polish."""
    log_n, log_d, log_l = (np.asarray(v, dtype=dtype) for v in (log_n, log_d, log_l))

    def fun(theta: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        theta_in = theta
        theta = np.asarray(theta, dtype=dtype)
        if weights is not None:
            weights = np.asarray(weights, dtype=dtype)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            r, w1, w2 = _chinchilla_log_residuals(theta, log_n, log_d, log_l)
            h, dh = _huber(r, delta)
            if weights is not None:
                h *= weights
                dh *= weights
            f = h.sum(axis=1)  # SUM, not mean (Besiroglu et al. 2024)
            g = np.empty_like(theta)
            total = dh.sum(axis=1)
            w1 *= dh
            w2 *= dh
            g[:, 0] = w1.sum(axis=1)
            g[:, 1] = w2.sum(axis=1)
            g[:, 2] = total - g[:, 0] - g[:, 1]  # softmax weights sum to one
            g[:, 3] = -np.multiply(w1, log_n, out=w1).sum(axis=1)  # (no BLAS gemv: slow on shared cores)
            g[:, 4] = -np.multiply(w2, log_d, out=w2).sum(axis=1)
        f = f.astype(theta_in.dtype, copy=False)
        return np.where(np.isfinite(f), f, np.inf), g.astype(theta_in.dtype, copy=False)
    return fun


def approach3_grid() -> np.ndarray:
    """The 4,500 starts of Hoffmann et al. 2022 App. D.2 as rows (a, b, e, α, β)."""
    grid = np.meshgrid(GRID_A, GRID_B, GRID_E, GRID_ALPHA, GRID_BETA, indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=1)


def approach3_objective(theta: Any, params: Any, tokens: Any = None, loss: Any = None, delta: float = HUBER_DELTA
                        ) -> tuple[float, np.ndarray]:
    """The approach-3 objective and its gradient at one θ = (a, b, e, α, β) (for scipy and benchmarks).
    ``params`` may be a :class:`ScalingPoints` (then leave ``tokens`` and ``loss`` out)."""
    pts = _points(params, tokens, loss)
    fun = _approach3_objective(np.log(pts.params), np.log(pts.tokens), np.log(pts.loss), delta)
    f, g = fun(np.asarray(theta, dtype=float).reshape(1, 5), None)
    return float(f[0]), g[0]


def _require_points(pts: ScalingPoints, n_params: int, what: str) -> None:
    if len(pts) <= n_params:
        raise ValueError(f"{what} fits {n_params} parameters and needs more than {n_params} points; "
                         f"got {len(pts)}")


@dataclass(frozen=True)
class LawFit:
    """A fitted parametric law (approach 3 or Kaplan).

    ``law``: the fitted law object (``ChinchillaLaw`` or ``KaplanLaw``); ``objective``: the summed Huber loss
    at the optimum (nats of log loss); ``residuals``: log(predicted) − log(observed) per point; ``theta``: the
    raw optimiser parameters; ``starts``: how many starts ran; ``a``/``b``: the compute-optimal exponents
    N_opt ∝ C^a, D_opt ∝ C^b implied by the law."""

    approach: str
    law: Any
    objective: float
    residuals: np.ndarray
    theta: np.ndarray
    n_points: int
    starts: int
    a: float
    b: float
    parameters: dict[str, float] = field(default_factory=dict)
    local_minima: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"approach": self.approach, "objective": self.objective, "n_points": self.n_points,
                "starts": self.starts, "a": self.a, "b": self.b, "parameters": dict(self.parameters),
                "rms_log_residual": float(np.sqrt(np.mean(self.residuals ** 2)))}


def fit_approach3(params: Any, tokens: Any = None, loss: Any = None, *, flops: Any = None,
                  delta: float = HUBER_DELTA, starts: np.ndarray | None = None, refine: int = 200,
                  polish: int = 3, name: str = "fitted (approach 3)") -> LawFit:
    """Fit L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, eq. 2) by approach 3 (§3.3, App. D.2).

    Minimises Σ_i Huber_δ(LSE(a − α log N_i, b − β log D_i, e) − log L_i) with L-BFGS from every row of
    ``starts`` (default: the paper's 4,500-point grid, :func:`approach3_grid`), all at once, in three stages
    (see :func:`lightning_scaling._batched_lbfgs.multistart`): a float32 batched L-BFGS from every start, a
    float64 batched L-BFGS to tight tolerance from the ``refine`` best distinct end points, and a scipy
    L-BFGS-B polish of the ``polish`` best; the lowest objective wins. A, B, E = exp(a, b, e).

    ``params`` may be a :class:`ScalingPoints`; otherwise N (parameters), D (tokens, or ``flops`` with
    D = C/(6N)) and loss (nats). Returns a :class:`LawFit` whose ``.law`` is a ``ChinchillaLaw``.
    """
    from lightning_scaling.laws import ChinchillaLaw

    pts = _points(params, tokens, loss, flops)
    _require_points(pts, 5, "approach 3")
    delta = positive_float("delta", delta)
    x0 = approach3_grid() if starts is None else np.asarray(starts, dtype=float)
    if x0.ndim != 2 or x0.shape[1] != 5 or not np.all(np.isfinite(x0)):
        raise ValueError("starts must be a finite (S, 5) array of rows (a, b, e, alpha, beta)")
    log_n, log_d, log_l = np.log(pts.params), np.log(pts.tokens), np.log(pts.loss)
    fun = _approach3_objective(log_n, log_d, log_l, delta)
    x, f = multistart(fun, _approach3_objective(log_n, log_d, log_l, delta, np.float32), x0, refine)
    best = distinct_best(x, f, max(1, int(polish)))
    if best.size == 0:
        raise ValueError("approach 3 found no finite fit; check that loss decreases with params and tokens")
    polished = [scipy_polish(fun, x[i]) for i in best]
    theta, obj = min(polished, key=lambda t: t[1])
    a_, b_, e_, alpha, beta = (float(v) for v in theta)
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"approach 3 found no decreasing law (alpha={alpha:.3g}, beta={beta:.3g}); the runs "
                         "do not show loss falling with both params and tokens")
    if max(a_, b_, e_) > 700 or min(a_, b_, e_) < -700:
        raise ValueError(f"approach 3 diverged (log A={a_:.3g}, log B={b_:.3g}, log E={e_:.3g}): the runs do not "
                         "constrain the law; add runs that vary params and tokens more widely")
    law = ChinchillaLaw(E=math.exp(e_), A=math.exp(a_), B=math.exp(b_), alpha=alpha, beta=beta, name=name)
    r = _chinchilla_log_residuals(theta.reshape(1, 5), log_n, log_d, log_l)[0]
    parameters = {"E": law.E, "A": law.A, "B": law.B, "alpha": alpha, "beta": beta}
    return LawFit("3", law, obj, r[0], np.asarray(theta), len(pts), int(x0.shape[0]),
                  beta / (alpha + beta), alpha / (alpha + beta), parameters,  # Hoffmann 2022 eq. 4: a = β/(α+β)
                  local_minima=x[best])


# ----------------------------------------------------------------------------------------------------------
# Kaplan et al. 2020, eq. 1.5: L(N, D) = [(N_c/N)^(α_N/α_D) + D_c/D]^α_D
# ----------------------------------------------------------------------------------------------------------


def _kaplan_objective(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float) -> ObjectiveFn:
    """Huber on log residuals of Kaplan 2020 eq. 1.5; rows θ = (α_N, α_D, log N_c, log D_c)."""
    def fun(theta: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            an, ad, lnc, ldc = (theta[:, k : k + 1] for k in range(4))
            ratio = an / ad
            u1 = ratio * (lnc - log_n)
            u2 = ldc - log_d
            m = np.maximum(u1, u2)
            z1, z2 = np.exp(u1 - m), np.exp(u2 - m)
            tot = z1 + z2
            lse = m + np.log(tot)
            w1, w2 = z1 / tot, z2 / tot
            r = ad * lse - log_l
            h, dh = _huber(r, delta)
            if weights is not None:
                h, dh = h * weights, dh * weights
            g = np.empty_like(theta)
            g[:, 0] = np.einsum("sn,sn->s", dh, w1 * (lnc - log_n))
            g[:, 1] = np.einsum("sn,sn->s", dh, lse - w1 * ratio * (lnc - log_n))
            g[:, 2] = np.einsum("sn,sn->s", dh, w1 * an)
            g[:, 3] = np.einsum("sn,sn->s", dh, w2 * ad)
            f = h.sum(axis=1)
        return np.where(np.isfinite(f), f, np.inf), g
    return fun


def kaplan_grid() -> np.ndarray:
    """Starts for :func:`fit_kaplan`: rows (α_N, α_D, log N_c, log D_c) around Kaplan 2020's values."""
    grid = np.meshgrid([0.03, 0.08, 0.2, 0.5], [0.03, 0.1, 0.3, 0.8], np.log([1e8, 1e11, 1e14, 1e17]),
                       np.log([1e8, 1e11, 1e14, 1e17]), indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=1)


def fit_kaplan(params: Any, tokens: Any = None, loss: Any = None, *, flops: Any = None,
               delta: float = HUBER_DELTA, polish: int = 4, name: str = "fitted (Kaplan)") -> LawFit:
    """Fit Kaplan et al. 2020's L(N, D) = [(N_c/N)^(α_N/α_D) + D_c/D]^α_D (eq. 1.5) by the approach-3 recipe:
    summed Huber on log loss, batched L-BFGS from a grid of starts. ``.law`` is a ``KaplanLaw``; ``a``/``b``
    are NaN-free compute-optimal exponents read off the law numerically (see :func:`frontier_exponents`)."""
    from lightning_scaling.laws import KaplanLaw

    pts = _points(params, tokens, loss, flops)
    _require_points(pts, 4, "the Kaplan law")
    delta = positive_float("delta", delta)
    log_n, log_d, log_l = np.log(pts.params), np.log(pts.tokens), np.log(pts.loss)
    fun = _kaplan_objective(log_n, log_d, log_l, delta)
    x0 = kaplan_grid()
    x, f, _ = batched_lbfgs(fun, x0)
    best = distinct_best(x, np.where((x[:, 0] > 0) & (x[:, 1] > 0), f, np.inf), max(1, int(polish)))
    if best.size == 0:
        raise ValueError("the Kaplan fit found no law with positive exponents; check the runs")
    theta, obj = min((scipy_polish(fun, x[i]) for i in best), key=lambda t: t[1])
    an, ad, lnc, ldc = (float(v) for v in theta)
    if an <= 0 or ad <= 0:
        raise ValueError(f"the Kaplan fit found no decreasing law (alpha_n={an:.3g}, alpha_d={ad:.3g})")
    law = KaplanLaw(alpha_n=an, n_c=math.exp(lnc), alpha_d=ad, d_c=math.exp(ldc))
    r = ad * np.logaddexp(an / ad * (lnc - log_n), ldc - log_d) - log_l
    a, b = frontier_exponents(law.loss, float(np.min(pts.flops)), float(np.max(pts.flops)))
    parameters = {"alpha_n": an, "alpha_d": ad, "n_c": law.n_c, "d_c": law.d_c}
    return LawFit("kaplan", law, obj, r, np.asarray(theta), len(pts), int(x0.shape[0]), a, b, parameters,
                  local_minima=x[best])


def optimal_params_numeric(loss_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], flops: float,
                           points: int = 801, span: float = 8.0) -> float:
    """N (parameters) minimising loss_fn(N, C/(6N)) at ``flops`` (C = 6ND, Kaplan 2020 Table 1), by a grid in
    log N over ``span`` decades around √(C/6) refined with a parabola through the best three points."""
    centre = 0.5 * math.log(flops / 6.0)
    log_n = np.linspace(centre - span * math.log(10) / 2, centre + span * math.log(10) / 2, points)
    n = np.exp(log_n)
    values = np.asarray(loss_fn(n, flops / (6.0 * n)), dtype=float)
    k = int(np.clip(np.nanargmin(values), 1, points - 2))
    y0, y1, y2 = values[k - 1 : k + 2]
    den = y0 - 2 * y1 + y2
    shift = 0.5 * (y0 - y2) / den if den > 0 else 0.0
    return float(math.exp(log_n[k] + shift * (log_n[1] - log_n[0])))


def frontier_exponents(loss_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], c_low: float, c_high: float
                       ) -> tuple[float, float]:
    """Exponents a, b of N_opt ∝ C^a, D_opt ∝ C^b for any law, from its numeric optimum at two budgets."""
    if not c_high > c_low:
        c_low, c_high = c_low / 10.0, c_low * 10.0
    n_lo, n_hi = optimal_params_numeric(loss_fn, c_low), optimal_params_numeric(loss_fn, c_high)
    a = math.log(n_hi / n_lo) / math.log(c_high / c_low)
    return a, 1.0 - a


# ----------------------------------------------------------------------------------------------------------
# approaches 1 and 2: power laws N_opt = k_N C^a, D_opt = k_D C^b
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrontierFit:
    """Compute-optimal frontier from approach 1 or 2: N_opt(C) = n_coefficient·C^a parameters and
    D_opt(C) = d_coefficient·C^b tokens, C in FLOPs. These approaches fit no loss law, so ``.law`` is None
    (use approach 3 or Kaplan for a law the planner and callbacks can use). ``optima`` holds the per-budget
    (or per-FLOP) optimum points the power laws were fitted to: columns C, N_opt, D_opt, loss."""

    approach: str
    a: float
    b: float
    n_coefficient: float
    d_coefficient: float
    optima: np.ndarray
    n_points: int
    objective: float  # sum of squared residuals of log N_opt (log parameters)
    residuals: np.ndarray  # log N_opt(fitted) − log N_opt(observed) per optimum
    parameters: dict[str, float] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()
    law: Any = None

    def optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt parameters, D_opt tokens) at ``flops`` training FLOPs."""
        c = positive_float("flops", flops)
        return self.n_coefficient * c ** self.a, self.d_coefficient * c ** self.b

    def to_dict(self) -> dict[str, Any]:
        return {"approach": self.approach, "a": self.a, "b": self.b, "n_coefficient": self.n_coefficient,
                "d_coefficient": self.d_coefficient, "n_points": self.n_points, "objective": self.objective,
                "optima": self.optima.tolist(), "skipped": list(self.skipped), "parameters": dict(self.parameters)}


def _power_law(c: np.ndarray, y: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Least squares log y = log k + p log c; returns (p, k, residuals in log space)."""
    x = np.log(c)
    design = np.stack([np.ones_like(x), x], axis=1)
    coef, *_ = np.linalg.lstsq(design, np.log(y), rcond=None)
    return float(coef[1]), float(math.exp(coef[0])), design @ coef - np.log(y)


def _frontier(approach: str, optima: np.ndarray, n_points: int, skipped: tuple[str, ...] = ()) -> FrontierFit:
    c, n_opt, d_opt = optima[:, 0], optima[:, 1], optima[:, 2]
    a, k_n, res = _power_law(c, n_opt)  # Hoffmann 2022 §3.1-3.2: N_opt ∝ C^a
    b, k_d, _ = _power_law(c, d_opt)  # D_opt ∝ C^b
    params = {"a": a, "b": b, "n_coefficient": k_n, "d_coefficient": k_d}
    return FrontierFit(approach, a, b, k_n, k_d, optima, n_points, float(np.sum(res ** 2)), res, params, skipped)


def group_budgets(flops: np.ndarray, tolerance: float = 0.1) -> list[np.ndarray]:
    """Indices of points sharing a compute budget: sorted C split where neighbours differ by more than
    ``tolerance`` (relative, 0.1 = 10%)."""
    tol = positive_float("budget_tolerance", tolerance)
    order = np.argsort(flops, kind="stable")
    log_c = np.log(flops[order])
    breaks = np.flatnonzero(np.diff(log_c) > math.log1p(tol)) + 1
    return [np.sort(g) for g in np.split(order, breaks)]


def fit_approach2(params: Any, tokens: Any = None, loss: Any = None, *, flops: Any = None,
                  budget_tolerance: float = 0.1) -> FrontierFit:
    """Approach 2 (Hoffmann et al. 2022 §3.2): for each compute budget (points whose FLOPs agree within
    ``budget_tolerance``), fit a parabola of loss against log N; its vertex is N_opt(C) and D_opt = C/(6 N_opt).
    Then fit N_opt ∝ C^a and D_opt ∝ C^b across budgets. Budgets with fewer than 3 model sizes, or whose
    parabola opens downwards or has its minimum outside the sizes tried, are skipped (listed in
    ``.skipped``). Needs at least 2 usable budgets. ``.law`` is None."""
    pts = _points(params, tokens, loss, flops)
    groups = group_budgets(pts.flops, budget_tolerance)
    if len(groups) < 2:
        raise ValueError(f"approach 2 needs at least 2 compute budgets; all {len(pts)} points share one "
                         f"(C ≈ {np.median(pts.flops):.3g} FLOPs)")
    optima, skipped = [], []
    for g in groups:
        c = float(np.exp(np.mean(np.log(pts.flops[g]))))
        x = np.log(pts.params[g])
        if np.unique(np.round(x, 9)).size < 3:
            skipped.append(f"C={c:.3g}: fewer than 3 model sizes")
            continue
        quad, lin, const = np.polyfit(x, pts.loss[g], 2)  # Hoffmann 2022 §3.2: parabola of loss in log N
        if quad <= 0:
            skipped.append(f"C={c:.3g}: the loss has no minimum over log N (parabola opens downwards)")
            continue
        x_opt = -lin / (2 * quad)
        if not (x.min() <= x_opt <= x.max()):
            skipped.append(f"C={c:.3g}: the minimum lies outside the model sizes tried")
            continue
        n_opt = math.exp(x_opt)
        optima.append((c, n_opt, c / (6.0 * n_opt), const - lin * lin / (4 * quad)))  # C = 6ND
    if len(optima) < 2:
        shown = "; ".join(skipped[:3]) + (f"; and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        raise ValueError(f"approach 2 needs at least 2 compute budgets with an interior minimum; got "
                         f"{len(optima)} of {len(groups)} ({shown})")
    return _frontier("2", np.asarray(optima), len(pts), tuple(skipped))


def fit_approach1(params: Any, tokens: Any = None, loss: Any = None, *, flops: Any = None,
                  runs: Sequence[Any] | None = None, n_flops: int = 40) -> FrontierFit:
    """Approach 1 (Hoffmann et al. 2022 §3.1): for ``n_flops`` log-spaced FLOP values, the run whose training
    curve (loss against C, interpolated in log C) is lowest there gives N_opt(C) and D_opt = C/(6 N_opt);
    fit N_opt ∝ C^a and D_opt ∝ C^b on those envelope points. Each run (``runs`` labels, default: one run
    per model size, also when every run has a single point) is one curve and needs at least 2 points.
    ``.law`` is None."""
    pts = _points(params, tokens, loss, flops, runs)
    if (runs is None and not isinstance(params, ScalingPoints)) or np.unique(pts.runs).size == len(pts):
        # one point per run: treat the final points of each model size as its curve
        pts = ScalingPoints(pts.params, pts.tokens, pts.loss, pts.flops, np.asarray([f"{n:.6g}" for n in pts.params]))
    n_flops = positive_int("n_flops", n_flops)
    curves = []
    for g in pts.run_groups():
        order = g[np.argsort(pts.flops[g], kind="stable")]
        if order.size >= 2 and np.ptp(np.log(pts.flops[order])) > 0:
            curves.append((np.log(pts.flops[order]), pts.loss[order], float(np.median(pts.params[order]))))
    if len(curves) < 2:
        raise ValueError("approach 1 needs training curves (at least 2 points each) of at least 2 runs; got "
                         f"{len(curves)}")
    lo = min(c[0][0] for c in curves)
    hi = max(c[0][-1] for c in curves)
    grid = np.linspace(lo, hi, n_flops)
    optima = []
    for lc in grid:
        best = None
        for x, y, n in curves:
            if x[0] <= lc <= x[-1]:
                value = float(np.interp(lc, x, y))
                if best is None or value < best[0]:
                    best = (value, n)
        if best is not None:
            c = math.exp(lc)
            optima.append((c, best[1], c / (6.0 * best[1]), best[0]))  # C = 6ND
    optima_arr = np.asarray(optima)
    if np.unique(optima_arr[:, 1]).size < 2:
        raise ValueError("approach 1: one run is lowest at every FLOP value, so the envelope gives no "
                         "exponent; train a wider range of model sizes")
    return _frontier("1", optima_arr, len(pts))
