"""Fitting scaling laws to a ladder of training runs.

* :func:`fit_approach3` fits Chinchilla's L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, eq. 2) by the
  paper's procedure (§3.3, App. D.2): the SUM over runs of Huber(δ = 1e-3) on log-sum-exp minus log loss,
  minimised from a grid of 4,500 starts. All starts run at once in a batched float32 BFGS (numpy, analytic
  gradients), the better half kept after each early iteration; the best few end points are refined by
  Newton's method (exact Hessian) in float64. The full grid takes a fraction of a second, about 200 times
  less than a per-start scipy loop over the same grid.
* :func:`fit_approach2`: isoFLOP parabolas, N_opt ∝ C^a and D_opt ∝ C^b (Hoffmann et al. 2022, §3.2).
* :func:`fit_approach1`: the envelope of lowest loss per FLOP across training curves (§3.1).
* :func:`fit_kaplan`: Kaplan et al. 2020's L(N, D) = [(N_c/N)^(α_N/α_D) + D_c/D]^α_D (eq. 1.5).
* :func:`optimum_at`: a fit's compute-optimal N, D (and loss) at a budget.

The bootstrap over runs is in :mod:`lightning_scaling.laws.resampling`.

Runs that cannot determine a law (constant loss, a single model size or token count, too few points, a best
fit whose exponents lie outside the range the start grid spans) raise :class:`UndeterminedLawError`, a
``ValueError`` that says what is missing; such a law is never returned as a fit.

The generic batched optimiser lives in :mod:`lightning_scaling.laws.batched_bfgs`; this module holds the
scaling-law objectives, fitters and result types.

Units: N in parameters, D in training tokens, C in training FLOPs (C = 6ND unless given), loss in nats per
token. Pure numpy: imports neither scipy, lightning, torch nor triton.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_scaling.argument_checks import positive_array, positive_float, positive_int
from lightning_scaling.laws.batched_bfgs import HessianFn, ObjectiveFn, batched_bfgs, distinct_best, multistart
from lightning_scaling.laws.definitions import ArrayLike, ChinchillaLaw, KaplanLaw

HUBER_DELTA = 1e-3  # Hoffmann et al. 2022, App. D.2: Huber δ = 1e-3 on log loss

# Hoffmann et al. 2022, App. D.2: initialisation grid α, β ∈ {0, 0.5, …, 2}, e ∈ {−1, −.5, …, 1}, a, b ∈ {0, 5, …, 25}
GRID_ALPHA = np.arange(0.0, 2.01, 0.5)
GRID_BETA = np.arange(0.0, 2.01, 0.5)
GRID_E = np.arange(-1.0, 1.01, 0.5)
GRID_A = np.arange(0.0, 25.01, 5.0)
GRID_B = np.arange(0.0, 25.01, 5.0)

APPROACHES = ("1", "2", "3", "kaplan")

# A fitted exponent above this is reported as undetermined, not as a law: it is the top of Hoffmann et al.'s
# start grid (App. D.2), and published L(N, D) fits lie far inside it (α ≈ 0.34, β ≈ 0.28 in Hoffmann 2022;
# 0.35 and 0.37 in Besiroglu et al. 2024; α_N ≈ 0.08 in Kaplan et al. 2020).
MAX_EXPONENT = 2.0
# A loss that varies less than this (relative) across all points carries no scaling signal.
MIN_LOSS_SPREAD = 1e-6


class UndeterminedLawError(ValueError):
    """The runs cannot determine the requested fit: too few points or distinct model sizes / token counts,
    a loss that does not vary, or a best fit outside the range where the law means anything (an exponent
    above :data:`MAX_EXPONENT`, or a term that changes the predicted loss by less than the Huber threshold
    across the runs). A ``ValueError``, so callers that treat bad input as one need no change."""


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

    def __post_init__(self) -> None:
        size = np.shape(self.params)
        for name in ("params", "tokens", "loss", "flops"):
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.ndim != 1:
                raise ValueError(f"{name} must be a 1-D numpy array (use ScalingPoints.from_arrays to convert)")
            if arr.shape != size:
                raise ValueError(f"{name} has {arr.size} values but params has {int(np.prod(size))}; they must match")
            if arr.size and not (np.all(np.isfinite(arr)) and np.all(arr > 0)):
                raise ValueError(f"{name} must be finite and > 0 at every point")
        if np.shape(self.runs) != size:
            raise ValueError(
                f"runs has {np.size(self.runs)} labels but params has {int(np.prod(size))}; they must match"
            )

    @classmethod
    def from_arrays(
        cls, params: Any, tokens: Any = None, loss: Any = None, *, flops: Any = None, runs: Sequence[Any] | None = None
    ) -> ScalingPoints:
        """Check and pack arrays. Give ``tokens`` or ``flops`` (then D = C / (6N), Kaplan 2020 Table 1)."""
        n = positive_array("params", params).ravel()
        if loss is None:
            raise ValueError("loss is required")
        ell = positive_array("loss", loss).ravel()
        c = None if flops is None else positive_array("flops", flops).ravel()
        d = None if tokens is None else positive_array("tokens", tokens).ravel()
        for name, arr in (("tokens", d), ("loss", ell), ("flops", c)):
            if arr is not None and arr.size != n.size:
                raise ValueError(f"{name} has {arr.size} values but params has {n.size}; they must match")
        # Kaplan 2020 Table 1: C ≈ 6ND gives the one of the two that is missing
        if d is not None:
            c = 6.0 * n * d if c is None else c
        elif c is not None:
            d = c / (6.0 * n)
        else:
            raise ValueError("give tokens or flops (tokens = flops / (6 * params))")
        if runs is None:
            labels = np.arange(n.size).astype(str)
        else:
            labels = np.asarray([str(r) for r in runs])
            if labels.size != n.size:
                raise ValueError(f"runs has {labels.size} labels but params has {n.size}; they must match")
        return cls(n, d, ell, c, labels)

    def __len__(self) -> int:
        return int(self.params.size)

    def subset(self, index: np.ndarray) -> ScalingPoints:
        return ScalingPoints(
            self.params[index], self.tokens[index], self.loss[index], self.flops[index], self.runs[index]
        )

    def drop_highest_loss(self, count: int) -> ScalingPoints:
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


def _chinchilla_log_residuals(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray) -> np.ndarray:
    """Residuals LSE(a − α log N, b − β log D, e) − log L (Hoffmann 2022, App. D.2) for one θ = (a, b, e, α,
    β), in log loss (nats of log)."""
    a, b, e, alpha, beta = (float(v) for v in theta)
    return np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e) - log_l


# Rows of starts evaluated together: ~256 KiB per temporary keeps the dozen passes over them in cache.
_CHUNK_BYTES = 1 << 18


def _approach3_objective(
    log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float, dtype: type[np.floating[Any]] = np.float64
) -> ObjectiveFn:
    """Σ_i w_i Huber_δ(r_i), r_i = log(A/N_i^α + B/D_i^β + E) − log L_i, and its gradient in θ = (a, b, e, α,
    β) = (log A, log B, log E, α, β) for each row of θ (Hoffmann 2022, App. D.2; the SUM, not the mean, as
    Besiroglu et al. 2024 stress).

    ``dtype=np.float32`` evaluates about twice as fast to about 1e-6 relative accuracy: good for scouting
    and pruning starts, not for the final digits. Rows are processed in cache-sized chunks, every pass in
    place; sums are row-wise ``einsum`` (no BLAS call, so no thread pool and no dependence on its size)."""
    x, y, target = (np.ascontiguousarray(v, dtype=dtype) for v in (log_n, log_d, log_l))
    n = x.size
    lim, half = dtype(delta), dtype(0.5)
    rows = max(1, _CHUNK_BYTES // (np.dtype(dtype).itemsize * n))

    def fun(theta: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        s_count = np.shape(theta)[0]
        f = np.empty(s_count, dtype=dtype)
        g = np.empty((s_count, 5), dtype=dtype)
        k = max(1, min(rows, s_count))
        buf_z1, buf_z2, buf_tot, buf_r, buf_dh, buf_tmp = (np.empty((k, n), dtype=dtype) for _ in range(6))
        with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
            th = np.asarray(theta, dtype=dtype)  # (a float32 cast of a huge θ is inf: f = inf, rejected)
            z3_all = np.exp(th[:, 2:3])  # E
            for lo in range(0, s_count, k):
                hi = min(s_count, lo + k)
                m = hi - lo
                z1, z2, tot, r, dh, tmp = buf_z1[:m], buf_z2[:m], buf_tot[:m], buf_r[:m], buf_dh[:m], buf_tmp[:m]
                c = th[lo:hi]
                z3 = z3_all[lo:hi]
                np.multiply(c[:, 3:4], x, out=z1)  # z1 = exp(a − α log N) = A / N^α
                np.subtract(c[:, 0:1], z1, out=z1)
                np.exp(z1, out=z1)
                np.multiply(c[:, 4:5], y, out=z2)  # z2 = exp(b − β log D) = B / D^β
                np.subtract(c[:, 1:2], z2, out=z2)
                np.exp(z2, out=z2)
                np.add(z1, z2, out=tot)
                tot += z3  # predicted loss
                np.log(tot, out=r)
                r -= target  # residual in log loss
                np.clip(r, -lim, lim, out=dh)  # Huber derivative ψ
                # Huber loss ψ·(r − ψ/2), summed: Σ wψr − ½ Σ wψ²
                if weights is None:
                    f[lo:hi] = np.einsum("sn,sn->s", dh, r) - half * np.einsum("sn,sn->s", dh, dh)
                else:
                    np.multiply(dh, np.asarray(weights[lo:hi], dtype=dtype), out=tmp)
                    f[lo:hi] = np.einsum("sn,sn->s", tmp, r) - half * np.einsum("sn,sn->s", tmp, dh)
                    dh, tmp = tmp, dh
                dh /= tot  # ∂(weighted Huber)/∂(predicted loss) per point
                g[lo:hi, 2] = np.einsum("sn->s", dh) * z3[:, 0]
                z1 *= dh
                z2 *= dh
                g[lo:hi, 0] = np.einsum("sn->s", z1)
                g[lo:hi, 1] = np.einsum("sn->s", z2)
                g[lo:hi, 3] = -np.einsum("sn,n->s", z1, x)
                g[lo:hi, 4] = -np.einsum("sn,n->s", z2, y)
        out_f = f.astype(np.float64)
        return np.where(np.isfinite(out_f), out_f, np.inf), g.astype(np.float64)

    return fun


def _approach3_hessian(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float) -> HessianFn:
    """Exact Hessian (S, 5, 5) of :func:`_approach3_objective` in θ = (a, b, e, α, β), float64.

    With u = (a − α log N, b − β log D, e), p = softmax(u), r = LSE(u) − log L and ψ = clip(r, −δ, δ) the
    Huber derivative: ∇r = Mᵀp and ∇²r = Σ_k p_k m_k m_kᵀ − ∇r∇rᵀ (m_k the rows of M = ∂u/∂θ), so
    ∇²f = Σ_i w_i [(1{|r_i| ≤ δ} − ψ_i) ∇r_i∇r_iᵀ + ψ_i Σ_k p_ik m_ik m_ikᵀ]."""
    x, y, target = (np.asarray(v, dtype=float) for v in (log_n, log_d, log_l))

    def hess(theta: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        th = np.asarray(theta, dtype=float)
        a, b, e, alpha, beta = (th[:, k : k + 1] for k in range(5))
        with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
            u1, u2 = a - alpha * x, b - beta * y
            m = np.maximum(np.maximum(u1, u2), e)
            p1, p2, p3 = np.exp(u1 - m), np.exp(u2 - m), np.exp(e - m)
            tot = p1 + p2 + p3
            r = m + np.log(tot) - target
            p1, p2, p3 = p1 / tot, p2 / tot, p3 / tot
            psi = np.clip(r, -delta, delta)
            inside = (np.abs(r) <= delta).astype(float)
            if weights is not None:
                psi, inside = psi * weights, inside * weights
            grad_r = np.stack([p1, p2, p3, -p1 * x, -p2 * y], axis=-1)  # (S, n, 5)
            out = np.einsum("sn,sni,snj->sij", inside - psi, grad_r, grad_r)
            c1, c2 = psi * p1, psi * p2
            out[:, 0, 0] += c1.sum(axis=1)
            out[:, 3, 3] += (c1 * x * x).sum(axis=1)
            out[:, 0, 3] -= (c1 * x).sum(axis=1)
            out[:, 3, 0] = out[:, 0, 3]
            out[:, 1, 1] += c2.sum(axis=1)
            out[:, 4, 4] += (c2 * y * y).sum(axis=1)
            out[:, 1, 4] -= (c2 * y).sum(axis=1)
            out[:, 4, 1] = out[:, 1, 4]
            out[:, 2, 2] += (psi * p3).sum(axis=1)
        return out

    return hess


def approach3_grid() -> np.ndarray:
    """The 4,500 starts of Hoffmann et al. 2022 App. D.2 as rows (a, b, e, α, β)."""
    grid = np.meshgrid(GRID_A, GRID_B, GRID_E, GRID_ALPHA, GRID_BETA, indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=1)


def approach3_objective(
    theta: Any, params: Any, tokens: Any = None, loss: Any = None, delta: float = HUBER_DELTA
) -> tuple[float, np.ndarray]:
    """The approach-3 objective (summed Huber on log loss, nats of log) and its gradient at one
    θ = (a, b, e, α, β), for per-start optimisers such as scipy's and for benchmarks. ``params`` may be a
    :class:`ScalingPoints` (then leave ``tokens`` and ``loss`` out)."""
    pts = _points(params, tokens, loss)
    fun = _approach3_objective(np.log(pts.params), np.log(pts.tokens), np.log(pts.loss), delta)
    f, g = fun(np.asarray(theta, dtype=float).reshape(1, 5), None)
    return float(f[0]), g[0]


# ----------------------------------------------------------------------------------------------------------
# can these runs determine a law? (checked before fitting, and on the best fit)
# ----------------------------------------------------------------------------------------------------------


def _require_points(pts: ScalingPoints, n_params: int, what: str) -> None:
    if len(pts) <= n_params:
        raise UndeterminedLawError(
            f"{what} fits {n_params} parameters and needs more than {n_params} points; got {len(pts)}"
        )


def _require_loss_varies(pts: ScalingPoints, what: str) -> None:
    lo, hi = float(np.min(pts.loss)), float(np.max(pts.loss))
    if hi - lo <= MIN_LOSS_SPREAD * hi:
        raise UndeterminedLawError(
            f"{what}: the loss is {hi:.6g} nats at every point, so the runs say nothing about how it scales "
            "(a loss that never changes usually means the wrong loss column, or runs that did not train)"
        )


def _distinct(values: np.ndarray) -> np.ndarray:
    """Distinct values, equal to 9 significant digits (CSV round-trips and C/(6N) give nearly equal floats)."""
    return np.unique(np.round(np.log(values), 9))


def _require_distinct(pts: ScalingPoints, what: str, sizes: int, tokens: int) -> None:
    """At least ``sizes`` distinct model sizes and ``tokens`` distinct token counts (a power-law term
    c·X^−p shifted by a free constant is pinned by no fewer than three values of X)."""
    for values, need, noun, unit, todo in (
        (pts.params, sizes, "model sizes", "params", "other model sizes"),
        (pts.tokens, tokens, "token counts", "tokens", "other numbers of training tokens"),
    ):
        got = np.exp(_distinct(values))
        if got.size < need:
            shown = " and ".join(f"{v:.4g}" for v in got)
            raise UndeterminedLawError(
                f"{what} needs runs at {need} or more distinct {noun} to fit how loss scales with {unit}; all "
                f"{len(pts)} points have {unit} = {shown}; add runs with {todo}"
            )


def _exponent_problem(what: str, exponents: dict[str, float]) -> str | None:
    """Why fitted exponents make no law (None when they do): one ≤ 0 or above :data:`MAX_EXPONENT`."""
    for name, value in exponents.items():
        if not value > 0:
            return (
                f"{what} found no decreasing law ({name} = {value:.3g}); the runs do not show loss falling "
                "with both params and tokens"
            )
        if value > MAX_EXPONENT:
            return (
                f"{what}: the best fit has {name} = {value:.3g}, outside (0, {MAX_EXPONENT:g}], the range where "
                "the law means anything (Hoffmann et al.'s start grid; published fits lie near 0.1 to 0.4): "
                "the runs do not determine the law; check that loss falls with params and tokens, and add "
                "runs spanning a wider range of both"
            )
    return None


def _effect_problem(what: str, loss_fn: Callable[[float, float], Any], pts: ScalingPoints, delta: float) -> str | None:
    """Why a fitted law is no answer (None when it is one): N or D moving the predicted loss by less than
    the Huber threshold ``delta`` (log loss) from the smallest to the largest value in the runs, the other
    held at its geometric mid-range. Such a term sits inside the objective's noise floor and its exponent is
    arbitrary."""
    n_lo, n_hi, d_lo, d_hi = (
        float(v) for v in (np.min(pts.params), np.max(pts.params), np.min(pts.tokens), np.max(pts.tokens))
    )
    n_mid, d_mid = math.sqrt(n_lo * n_hi), math.sqrt(d_lo * d_hi)

    def log_ratio(n1: float, d1: float, n2: float, d2: float) -> float:
        return float(np.log(float(loss_fn(n1, d1)) / float(loss_fn(n2, d2))))

    with np.errstate(all="ignore"):
        effects = (
            ("params", "model size", n_lo, n_hi, log_ratio(n_lo, d_mid, n_hi, d_mid)),
            ("tokens", "token count", d_lo, d_hi, log_ratio(n_mid, d_lo, n_mid, d_hi)),
        )
    for unit, noun, lo, hi, effect in effects:
        if not abs(effect) >= delta:
            return (
                f"{what}: the best fit changes the loss by only {abs(effect):.2g} (log) from the smallest to "
                f"the largest {noun} ({lo:.3g} to {hi:.3g} {unit}), under the Huber threshold {delta:g}: the "
                f"runs do not determine how loss scales with {unit}; add runs spanning a wider range of {unit}"
            )
    return None


def _exp_or_raise(what: str, **logs: float) -> dict[str, float]:
    """exp() of fitted log-parameters, or an UndeterminedLawError when one is beyond float range."""
    if any(not -700.0 < v < 700.0 for v in logs.values()):
        shown = ", ".join(f"{k}={v:.3g}" for k, v in logs.items())
        raise UndeterminedLawError(
            f"{what} diverged ({shown}): the runs do not constrain the law; add runs that "
            "vary params and tokens more widely"
        )
    return {k: math.exp(v) for k, v in logs.items()}


@dataclass(frozen=True)
class LawFit:
    """A fitted parametric law (approach 3 or Kaplan).

    ``law``: the fitted law object (``ChinchillaLaw`` or ``KaplanLaw``); ``objective``: the summed Huber loss
    at the optimum (nats of log loss); ``residuals``: log(predicted) − log(observed) per point; ``theta``: the
    raw optimiser parameters; ``starts``: how many starts ran; ``a``/``b``: the compute-optimal exponents
    N_opt ∝ C^a, D_opt ∝ C^b implied by the law; ``local_minima``: the distinct optima the refinement reached,
    best first (the bootstrap restarts from them)."""

    approach: str
    law: ChinchillaLaw | KaplanLaw
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
        return {
            "approach": self.approach,
            "objective": self.objective,
            "n_points": self.n_points,
            "starts": self.starts,
            "a": self.a,
            "b": self.b,
            "parameters": dict(self.parameters),
            "rms_log_residual": float(np.sqrt(np.mean(self.residuals**2))),
        }


def fit_approach3(
    params: Any,
    tokens: Any = None,
    loss: Any = None,
    *,
    flops: Any = None,
    delta: float = HUBER_DELTA,
    starts: np.ndarray | None = None,
    survivors: int | None = 256,
    refine: int = 16,
    name: str = "fitted (approach 3)",
    polish: int | None = None,
) -> LawFit:
    """Fit L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, eq. 2) by approach 3 (§3.3, App. D.2).

    Minimises Σ_i Huber_δ(LSE(a − α log N_i, b − β log D_i, e) − log L_i) from every row of ``starts``
    (default: the paper's 4,500-point grid, :func:`approach3_grid`), all starts at once (see
    :func:`lightning_scaling.laws.batched_bfgs.multistart`): float32 BFGS from every start, the better half
    kept after each iteration until ``survivors`` remain (``None``: no start is dropped), the survivors run
    on in float32, then the ``refine`` lowest distinct end points are refined by Newton's method in float64
    until no further decrease is found (about 1e-15 relative); the lowest objective wins. A, B, E =
    exp(a, b, e). On the digitised Chinchilla data this reaches the optimum of a per-start scipy L-BFGS-B
    loop over the whole grid, to 1e-10 relative (checked by the fit-speed benchmark).

    ``params`` may be a :class:`ScalingPoints`; otherwise N (parameters), D (tokens, or ``flops`` with
    D = C/(6N)) and loss (nats). Returns a :class:`LawFit` whose ``.law`` is a ``ChinchillaLaw``.
    Raises :class:`UndeterminedLawError` when the runs cannot determine the law: 5 or fewer points, fewer
    than 3 distinct model sizes or token counts, a constant loss, or a best fit with an exponent outside
    (0, :data:`MAX_EXPONENT`] or a term that moves the loss by less than ``delta`` across the runs.
    ``polish`` is deprecated and ignored (it sized a scipy polish that no longer exists).
    """

    pts = _points(params, tokens, loss, flops)
    delta = positive_float("delta", delta)
    if survivors is not None:
        survivors = positive_int("survivors", survivors)
    refine = positive_int("refine", refine)
    if polish is not None:
        warnings.warn(
            "fit_approach3(polish=...) is ignored and will be removed: there is no scipy polish any "
            "more; the `refine` best points are refined by Newton's method",
            DeprecationWarning,
            stacklevel=2,
        )
    try:
        x0 = approach3_grid() if starts is None else np.asarray(starts, dtype=float)
    except (TypeError, ValueError, OverflowError):
        x0 = np.zeros((0, 0))
    if x0.ndim != 2 or x0.shape[0] == 0 or x0.shape[1] != 5 or not np.all(np.isfinite(x0)):
        raise ValueError("starts must be a finite (S, 5) array of rows (a, b, e, alpha, beta), S >= 1")
    _require_points(pts, 5, "approach 3")
    _require_distinct(pts, "approach 3", 3, 3)
    _require_loss_varies(pts, "approach 3")
    log_n, log_d, log_l = np.log(pts.params), np.log(pts.tokens), np.log(pts.loss)
    x, f = multistart(
        _approach3_objective(log_n, log_d, log_l, delta),
        _approach3_objective(log_n, log_d, log_l, delta, np.float32),
        x0,
        hess64=_approach3_hessian(log_n, log_d, log_l, delta),
        survivors=survivors,
        refine=refine,
    )
    if f.size == 0 or not np.isfinite(f[0]):
        raise UndeterminedLawError("approach 3 found no finite fit; check that loss decreases with params and tokens")
    theta, obj = x[0], float(f[0])
    a_, b_, e_, alpha, beta = (float(v) for v in theta)
    problem = _exponent_problem("approach 3", {"alpha": alpha, "beta": beta})
    if problem is not None:
        raise UndeterminedLawError(problem)
    consts = _exp_or_raise("approach 3", log_A=a_, log_B=b_, log_E=e_)
    law = ChinchillaLaw(E=consts["log_E"], A=consts["log_A"], B=consts["log_B"], alpha=alpha, beta=beta, name=name)
    problem = _effect_problem("approach 3", law.loss, pts, delta)
    if problem is not None:
        raise UndeterminedLawError(problem)
    r = _chinchilla_log_residuals(theta, log_n, log_d, log_l)
    parameters = {"E": law.E, "A": law.A, "B": law.B, "alpha": alpha, "beta": beta}
    return LawFit(
        "3",
        law,
        obj,
        r,
        np.asarray(theta),
        len(pts),
        int(x0.shape[0]),
        beta / (alpha + beta),
        alpha / (alpha + beta),
        parameters,  # Hoffmann 2022 eq. 4: a = β/(α+β)
        local_minima=x,
    )


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
    grid = np.meshgrid(
        [0.03, 0.08, 0.2, 0.5],
        [0.03, 0.1, 0.3, 0.8],
        np.log([1e8, 1e11, 1e14, 1e17]),
        np.log([1e8, 1e11, 1e14, 1e17]),
        indexing="ij",
    )
    return np.stack([g.ravel() for g in grid], axis=1)


def fit_kaplan(
    params: Any,
    tokens: Any = None,
    loss: Any = None,
    *,
    flops: Any = None,
    delta: float = HUBER_DELTA,
    refine: int = 4,
    name: str = "fitted (Kaplan)",
) -> LawFit:
    """Fit Kaplan et al. 2020's L(N, D) = [(N_c/N)^(α_N/α_D) + D_c/D]^α_D (eq. 1.5) by the approach-3 recipe:
    summed Huber on log loss, 40 batched BFGS iterations from each of 256 starts (:func:`kaplan_grid`), then
    the ``refine`` best distinct end points with positive exponents run on until no further decrease is found.
    ``.law`` is a ``KaplanLaw``; ``a``/``b`` are the compute-optimal exponents read off the law numerically
    (see :func:`frontier_exponents`).

    Raises :class:`UndeterminedLawError` when the runs cannot determine the law: 4 or fewer points, fewer
    than 2 distinct model sizes or token counts, a constant loss, or a best fit with an exponent outside
    (0, :data:`MAX_EXPONENT`] or a variable that moves the loss by less than ``delta`` across the runs."""

    pts = _points(params, tokens, loss, flops)
    delta = positive_float("delta", delta)
    refine = positive_int("refine", refine)
    _require_points(pts, 4, "the Kaplan law")
    _require_distinct(pts, "the Kaplan law", 2, 2)
    _require_loss_varies(pts, "the Kaplan law")
    log_n, log_d, log_l = np.log(pts.params), np.log(pts.tokens), np.log(pts.loss)
    fun = _kaplan_objective(log_n, log_d, log_l, delta)
    x0 = kaplan_grid()
    scout = batched_bfgs(fun, x0, ftol=1e-10, max_iter=40)
    x, f = scout.x, scout.f
    best = distinct_best(x, np.where((x[:, 0] > 0) & (x[:, 1] > 0), f, np.inf), refine)
    if best.size == 0:
        raise UndeterminedLawError(
            "the Kaplan fit found no law with positive exponents; the runs do not show "
            "loss falling with both params and tokens"
        )
    scout = scout.take(best)
    x, f, *_ = batched_bfgs(
        fun, scout.x, inverse_hessian=scout.inverse_hessian, values=(scout.f, scout.g), max_iter=2000, ftol=1e-15
    )
    order = np.argsort(f, kind="stable")
    x, f = x[order], f[order]
    theta, obj = x[0], float(f[0])
    an, ad, lnc, ldc = (float(v) for v in theta)
    problem = _exponent_problem("the Kaplan fit", {"alpha_n": an, "alpha_d": ad})
    if problem is not None:
        raise UndeterminedLawError(problem)
    consts = _exp_or_raise("the Kaplan fit", log_N_c=lnc, log_D_c=ldc)
    law = KaplanLaw(alpha_n=an, n_c=consts["log_N_c"], alpha_d=ad, d_c=consts["log_D_c"], name=name)
    problem = _effect_problem("the Kaplan fit", law.loss, pts, delta)
    if problem is not None:
        raise UndeterminedLawError(problem)
    r = ad * np.logaddexp(an / ad * (lnc - log_n), ldc - log_d) - log_l
    a, b = frontier_exponents(law.loss, float(np.min(pts.flops)), float(np.max(pts.flops)))
    parameters = {"alpha_n": an, "alpha_d": ad, "n_c": law.n_c, "d_c": law.d_c}
    return LawFit(
        "kaplan", law, obj, r, np.asarray(theta), len(pts), int(x0.shape[0]), a, b, parameters, local_minima=x
    )


def optimal_params_numeric(
    loss_fn: Callable[[np.ndarray, np.ndarray], ArrayLike], flops: float, points: int = 801, span: float = 8.0
) -> float:
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


def frontier_exponents(
    loss_fn: Callable[[np.ndarray, np.ndarray], ArrayLike], c_low: float, c_high: float
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
    law: None = None  # no loss law: the attribute is there so that code can ask any fit for its law

    def optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt parameters, D_opt tokens) at ``flops`` training FLOPs."""
        c = positive_float("flops", flops)
        return self.n_coefficient * c**self.a, self.d_coefficient * c**self.b

    def to_dict(self) -> dict[str, Any]:
        return {
            "approach": self.approach,
            "a": self.a,
            "b": self.b,
            "n_coefficient": self.n_coefficient,
            "d_coefficient": self.d_coefficient,
            "n_points": self.n_points,
            "objective": self.objective,
            "optima": self.optima.tolist(),
            "skipped": list(self.skipped),
            "parameters": dict(self.parameters),
        }


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
    return FrontierFit(approach, a, b, k_n, k_d, optima, n_points, float(np.sum(res**2)), res, params, skipped)


def group_budgets(flops: np.ndarray, tolerance: float = 0.1) -> list[np.ndarray]:
    """Indices of points sharing a compute budget: sorted C split where neighbours differ by more than
    ``tolerance`` (relative, 0.1 = 10%)."""
    tol = positive_float("budget_tolerance", tolerance)
    order = np.argsort(flops, kind="stable")
    log_c = np.log(flops[order])
    breaks = np.flatnonzero(np.diff(log_c) > math.log1p(tol)) + 1
    return [np.sort(g) for g in np.split(order, breaks)]


def _parabola(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """Least-squares y = q·x² + l·x + k; returns (q, l, k, standard error of q), the error NaN when the fit
    has no residual degrees of freedom (3 points)."""
    design = np.stack([x * x, x, np.ones_like(x)], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    dof = x.size - 3
    se = math.nan
    if dof > 0:
        resid = y - design @ coef
        cov = np.linalg.pinv(design.T @ design) * float(resid @ resid) / dof
        se = math.sqrt(max(float(cov[0, 0]), 0.0))
    return float(coef[0]), float(coef[1]), float(coef[2]), se


def fit_approach2(
    params: Any, tokens: Any = None, loss: Any = None, *, flops: Any = None, budget_tolerance: float = 0.1
) -> FrontierFit:
    """Approach 2 (Hoffmann et al. 2022 §3.2): for each compute budget (points whose FLOPs agree within
    ``budget_tolerance``), fit a parabola of loss against log N; its vertex is N_opt(C) and D_opt = C/(6 N_opt).
    Then fit N_opt ∝ C^a and D_opt ∝ C^b across budgets. A budget is skipped (and listed in ``.skipped``) when
    it has fewer than 3 model sizes, its loss does not vary, its parabola opens downwards or its curvature is
    within 2 standard errors of zero (no clear minimum: the vertex would be noise), or its minimum lies outside
    the sizes tried. Needs at least 2 usable budgets (else :class:`UndeterminedLawError`). ``.law`` is None."""
    pts = _points(params, tokens, loss, flops)
    _require_distinct(pts, "approach 2", 3, 1)
    _require_loss_varies(pts, "approach 2")
    groups = group_budgets(pts.flops, budget_tolerance)
    if len(groups) < 2:
        raise UndeterminedLawError(
            f"approach 2 needs at least 2 compute budgets; all {len(pts)} points share "
            f"one (C ≈ {np.median(pts.flops):.3g} FLOPs)"
        )
    optima, skipped = [], []
    for g in groups:
        c = float(np.exp(np.mean(np.log(pts.flops[g]))))
        x = np.log(pts.params[g])
        y = pts.loss[g]
        if _distinct(pts.params[g]).size < 3:
            skipped.append(f"C={c:.3g}: fewer than 3 model sizes")
            continue
        if np.ptp(y) <= MIN_LOSS_SPREAD * np.max(y):
            skipped.append(f"C={c:.3g}: the loss is the same at every model size")
            continue
        quad, lin, const, se = _parabola(x, y)  # Hoffmann 2022 §3.2: parabola of loss in log N
        if quad <= 0:
            skipped.append(f"C={c:.3g}: the loss has no minimum over log N (parabola opens downwards)")
            continue
        if quad < 2.0 * se:
            skipped.append(
                f"C={c:.3g}: the parabola's curvature is within 2 standard errors of zero "
                f"({quad:.3g} ± {se:.2g}), so its minimum is noise"
            )
            continue
        x_opt = -lin / (2 * quad)
        if not (x.min() <= x_opt <= x.max()):
            skipped.append(f"C={c:.3g}: the minimum lies outside the model sizes tried")
            continue
        n_opt = math.exp(x_opt)
        optima.append((c, n_opt, c / (6.0 * n_opt), const - lin * lin / (4 * quad)))  # C = 6ND
    if len(optima) < 2:
        shown = "; ".join(skipped[:3]) + (f"; and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        raise UndeterminedLawError(
            f"approach 2 needs at least 2 compute budgets with an interior minimum; got "
            f"{len(optima)} of {len(groups)} ({shown})"
        )
    return _frontier("2", np.asarray(optima), len(pts), tuple(skipped))


def fit_approach1(
    params: Any,
    tokens: Any = None,
    loss: Any = None,
    *,
    flops: Any = None,
    runs: Sequence[Any] | None = None,
    n_flops: int = 40,
) -> FrontierFit:
    """Approach 1 (Hoffmann et al. 2022 §3.1): for ``n_flops`` log-spaced FLOP values, the run whose training
    curve (loss against C, interpolated in log C) is lowest there gives N_opt(C) and D_opt = C/(6 N_opt);
    fit N_opt ∝ C^a and D_opt ∝ C^b on those envelope points. Each run (``runs`` labels, default: one run
    per model size, also when every run has a single point) is one curve and needs at least 2 points.
    ``.law`` is None. Raises :class:`UndeterminedLawError` when the runs cannot give an envelope (one model
    size, a constant loss, fewer than 2 runs with a curve, or one run lowest everywhere)."""
    pts = _points(params, tokens, loss, flops, runs)
    _require_distinct(pts, "approach 1", 2, 1)
    _require_loss_varies(pts, "approach 1")
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
        groups = pts.run_groups()
        hint = (
            "; every run has a single point: give each run's loss at several steps (read every logged step, "
            "points='all', not only the final loss)"
            if all(g.size == 1 for g in groups)
            else ""
        )
        raise UndeterminedLawError(
            f"approach 1 needs training curves (at least 2 points at different FLOPs) from "
            f"at least 2 runs; {len(curves)} of {len(groups)} runs have one{hint}"
        )
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
        raise UndeterminedLawError(
            "approach 1: one run is lowest at every FLOP value, so the envelope gives "
            "no exponent; train a wider range of model sizes"
        )
    return _frontier("1", optima_arr, len(pts))


def optimum_at(fit: LawFit | FrontierFit, budget: float) -> dict[str, float]:
    """The compute-optimal point of a fit at ``budget`` FLOPs: ``n_opt`` (parameters), ``d_opt`` (tokens) and,
    for a law, ``loss_opt`` (nats per token)."""
    if isinstance(fit, FrontierFit):
        n, d = fit.optimal(budget)
        return {"n_opt": n, "d_opt": d}
    if isinstance(fit.law, ChinchillaLaw):  # approach 3: the closed form
        alloc = fit.law.compute_optimal(budget)
        return {"n_opt": float(alloc.params), "d_opt": float(alloc.tokens), "loss_opt": float(alloc.loss)}
    n = optimal_params_numeric(fit.law.loss, budget)
    d = budget / (6.0 * n)  # C = 6ND
    return {"n_opt": n, "d_opt": d, "loss_opt": float(fit.law.loss(n, d))}
