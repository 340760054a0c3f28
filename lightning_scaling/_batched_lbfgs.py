"""Batched multi-start L-BFGS: many independent starts of one smooth objective, minimised all at once.

Generic numerical machinery used by :mod:`lightning_scaling.fit`; nothing here knows about scaling laws.

* :func:`batched_lbfgs`: L-BFGS (two-loop recursion, Armijo backtracking) over S starts in lock-step (numpy).
* :func:`multistart`: coarse-to-fine batched L-BFGS, float32 from every start, then float64 from the best.
* :func:`distinct_best`: the lowest objectives among distinct end points.
* :func:`scipy_polish`: a scipy L-BFGS-B polish of one point.

An objective is ``fun(X, W) -> (f, g)``: X (S, P) rows of parameters, W (S, n) per-row point weights or None;
f (S,) objective values (inf where not finite) and g (S, P) gradients. Pure numpy/scipy: imports neither
lightning, torch nor triton.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

ObjectiveFn = Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray]]


def batched_lbfgs(fun: ObjectiveFn, x0: np.ndarray, *, weights: np.ndarray | None = None, memory: int = 10,
                  max_iter: int = 500, ftol: float = 1e-12, gtol: float = 1e-10, max_backtracks: int = 40
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimise ``fun`` from each row of ``x0`` (S starts × P parameters) independently but in lock-step.

    ``fun(X, W)`` returns objective values (S,) and gradients (S, P) for the rows of X; W (S, n) are per-row
    point weights (or None). L-BFGS two-loop recursion with an Armijo backtracking line search per row;
    converged rows leave the batch. Returns (x, f, iterations) per start.
    """
    x = np.array(x0, dtype=float)
    s_count, p = x.shape
    w_all = None if weights is None else np.asarray(weights, dtype=float)
    f, g = fun(x, w_all)
    f = np.where(np.isfinite(f), f, np.inf)
    iters = np.zeros(s_count, dtype=int)
    active = np.flatnonzero(np.isfinite(f) & np.all(np.isfinite(g), axis=1))
    s_hist = np.zeros((memory, s_count, p))
    y_hist = np.zeros((memory, s_count, p))
    rho = np.zeros((memory, s_count))
    n_hist = np.zeros(s_count, dtype=int)  # valid pairs per start
    head = np.zeros(s_count, dtype=int)  # next slot to write
    for _ in range(max_iter):
        if active.size == 0:
            break
        xa, fa, ga = x[active], f[active], g[active]
        # two-loop recursion, vectorised over the active starts
        q = ga.copy()
        alphas = np.zeros((memory, active.size))
        nh, hd = n_hist[active], head[active]
        for j in range(memory):
            slot = (hd - 1 - j) % memory
            valid = j < nh
            sj = s_hist[slot, active]
            yj = y_hist[slot, active]
            rj = np.where(valid, rho[slot, active], 0.0)
            a_j = rj * np.einsum("ij,ij->i", sj, q)
            alphas[j] = a_j
            q -= a_j[:, None] * yj
        last = (hd - 1) % memory
        s_last, y_last = s_hist[last, active], y_hist[last, active]
        yy = np.einsum("ij,ij->i", y_last, y_last)
        gamma = np.where((nh > 0) & (yy > 0), np.einsum("ij,ij->i", s_last, y_last) / np.where(yy > 0, yy, 1.0),
                         1.0 / np.maximum(1.0, np.linalg.norm(ga, axis=1)))
        r = gamma[:, None] * q
        for j in range(memory - 1, -1, -1):
            slot = (hd - 1 - j) % memory
            valid = j < nh
            sj = s_hist[slot, active]
            yj = y_hist[slot, active]
            rj = np.where(valid, rho[slot, active], 0.0)
            b_j = rj * np.einsum("ij,ij->i", yj, r)
            r += (alphas[j] - b_j)[:, None] * sj
        d = -r
        slope = np.einsum("ij,ij->i", ga, d)
        bad = ~(slope < 0) | ~np.all(np.isfinite(d), axis=1)
        if np.any(bad):  # not a descent direction: restart from steepest descent
            d[bad] = -ga[bad] / np.maximum(1.0, np.linalg.norm(ga[bad], axis=1))[:, None]
            slope[bad] = np.einsum("ij,ij->i", ga[bad], d[bad])
            n_hist[active[bad]] = 0
        # Armijo backtracking, only re-evaluating the starts that still fail
        step = np.ones(active.size)
        f_new = np.full(active.size, np.inf)
        g_new = np.zeros_like(ga)
        pending = np.arange(active.size)
        for _bt in range(max_backtracks):
            trial = xa[pending] + step[pending, None] * d[pending]
            ft, gt = fun(trial, None if w_all is None else w_all[active[pending]])
            ok = np.isfinite(ft) & (ft <= fa[pending] + 1e-4 * step[pending] * slope[pending]) \
                & np.all(np.isfinite(gt), axis=1)
            f_new[pending[ok]] = ft[ok]
            g_new[pending[ok]] = gt[ok]
            pending = pending[~ok]
            if pending.size == 0:
                break
            step[pending] *= 0.5
        moved = np.isfinite(f_new)
        idx = active[moved]
        s_vec = step[moved, None] * d[moved]
        y_vec = g_new[moved] - ga[moved]
        sy = np.einsum("ij,ij->i", s_vec, y_vec)
        x[idx] = xa[moved] + s_vec
        f_prev = fa[moved]
        f[idx] = f_new[moved]
        g[idx] = g_new[moved]
        iters[active] += 1
        keep_pair = sy > 1e-300
        slot = head[idx]
        upd = idx[keep_pair]
        s_hist[slot[keep_pair], upd] = s_vec[keep_pair]
        y_hist[slot[keep_pair], upd] = y_vec[keep_pair]
        rho[slot[keep_pair], upd] = 1.0 / sy[keep_pair]
        head[upd] = (head[upd] + 1) % memory
        n_hist[upd] = np.minimum(n_hist[upd] + 1, memory)
        # convergence: relative decrease (scipy's ftol rule), small gradient, or a failed line search
        scale = np.maximum(np.maximum(np.abs(f_prev), np.abs(f_new[moved])), 1.0)
        done_f = (f_prev - f_new[moved]) <= ftol * scale
        done_g = np.max(np.abs(g_new[moved]), axis=1) <= gtol
        still = np.zeros(active.size, dtype=bool)
        still[np.flatnonzero(moved)] = ~(done_f | done_g)
        active = active[still]
    return x, f, iters


def scipy_polish(fun: ObjectiveFn, x0: np.ndarray) -> tuple[np.ndarray, float]:
    from scipy.optimize import minimize

    def scalar(theta: np.ndarray) -> tuple[float, np.ndarray]:
        f, g = fun(theta.reshape(1, -1), None)
        if not np.isfinite(f[0]):
            return 1e300, np.zeros_like(theta)
        return float(f[0]), g[0]

    res = minimize(scalar, x0, jac=True, method="L-BFGS-B",
                   options={"maxiter": 500, "ftol": 1e-14, "gtol": 1e-10, "maxcor": 20})
    f0, _ = scalar(x0)
    return (res.x, float(res.fun)) if res.fun <= f0 else (x0, f0)


def multistart(fun64: ObjectiveFn, fun32: ObjectiveFn, x0: np.ndarray, refine: int,
                weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Coarse-to-fine batched L-BFGS: every start in float32 until the relative decrease falls below 1e-7
    (float32's resolution), then the ``refine`` best distinct end points in float64 to 1e-13. Returns the
    refined points and their float64 objectives."""
    x, f, _ = batched_lbfgs(fun32, x0, weights=weights, ftol=1e-7, gtol=0.0, max_iter=300)
    keep = distinct_best(x, f, max(1, int(refine)), decimals=4)
    if keep.size == 0:
        return x, np.full(x.shape[0], np.inf)
    x, f, _ = batched_lbfgs(fun64, x[keep], weights=None if weights is None else weights[keep], ftol=1e-13,
                            max_iter=2000)
    return x, f


def distinct_best(x: np.ndarray, f: np.ndarray, count: int, decimals: int = 3) -> np.ndarray:
    """Indices of the ``count`` lowest objectives among distinct end points."""
    order = np.argsort(np.where(np.isfinite(f), f, np.inf), kind="stable")
    chosen: list[int] = []
    seen: set[tuple[float, ...]] = set()
    for i in order:
        if not np.isfinite(f[i]):
            break
        key = tuple(np.round(x[i], decimals))
        if key in seen:
            continue
        seen.add(key)
        chosen.append(int(i))
        if len(chosen) == count:
            break
    return np.asarray(chosen, dtype=int)
