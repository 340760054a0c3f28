"""Batched multi-start quasi-Newton and Newton minimisation: many starts of one smooth objective, all at once.

Generic numerical machinery used by :mod:`lightning_scaling.laws.fitting`; nothing here knows about scaling laws.

* :func:`batched_bfgs`: BFGS (Nocedal & Wright 2006, Algorithm 6.1) over S starts in lock-step. The fitted
  laws have at most five parameters, so each start keeps its dense P × P inverse-Hessian estimate: an
  iteration is a handful of vectorised numpy calls whatever the history an L-BFGS would keep, and the
  estimate carries over from one stage of :func:`multistart` to the next.
* :func:`batched_newton`: Newton's method with an exact Hessian, made positive definite so that every step
  descends (Nocedal & Wright §3.4). A summed Huber loss with a small δ is nearly piecewise linear, which
  slows any quasi-Newton method near the optimum (hundreds of iterations); Newton needs tens.
* :func:`multistart`: scout every start in float32, halving the field each iteration (successive halving)
  down to a few hundred survivors, finish those in float32, then refine the best few in float64 to machine
  precision.
* :func:`distinct_best`: the lowest objectives among distinct end points.

Both methods use an Armijo backtracking line search with quadratic interpolation (Nocedal & Wright §3.5).

An objective is ``fun(X, W) -> (f, g)``: X (S, P) rows of parameters, W (S, n) per-row point weights or None;
f (S,) objective values (inf where not finite) and g (S, P) gradients. A Hessian is ``hess(X, W) -> H``
(S, P, P). Pure numpy: imports neither scipy, lightning, torch nor triton.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import numpy as np

ObjectiveFn = Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray]]
HessianFn = Callable[[np.ndarray, np.ndarray | None], np.ndarray]

ARMIJO_C1 = 1e-4  # sufficient-decrease constant (Nocedal & Wright 2006, §3.1)
# Newton: Hessian eigenvalues are replaced by their absolute values, floored at this fraction of the largest
EIG_FLOOR = 1e-10


_F = TypeVar("_F", bound=Callable[..., Any])


def _quietly(fn: _F) -> _F:
    """Run ``fn`` with numpy's floating-point warnings off: trial points overflow or leave the domain as a
    matter of course, and the optimisers test every value for finiteness instead."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _finite_rows(a: np.ndarray) -> np.ndarray:
    """Whether each column of ``a`` (P, S) is all finite (a sum is finite only when every term is)."""
    return np.isfinite(np.einsum("ps->s", a))


def _line_search(
    fun: ObjectiveFn,
    x: np.ndarray,
    f: np.ndarray,
    d: np.ndarray,
    slope: np.ndarray,
    weights: np.ndarray | None,
    max_backtracks: int,
    first_step: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Armijo backtracking along each column of ``d`` (P, S; ``x`` likewise, one start per column, so that
    every numpy pass runs along the starts) from ``first_step`` (default 1), re-evaluating only the starts
    that still fail. Returns (step, f_new, g_new (P, S)); f_new is inf where ``max_backtracks`` trials all
    failed."""
    count = x.shape[1]
    step = np.ones(count) if first_step is None else np.array(first_step, dtype=float)
    f_new = np.full(count, np.inf)
    g_new = np.zeros_like(x)
    pending = np.arange(count)
    for k in range(max_backtracks):
        if k == 0 and first_step is None:
            trial, fp, sl, st = x + d, f, slope, step
        else:
            st, fp, sl = step[pending], f[pending], slope[pending]
            trial = x[:, pending] + st * d[:, pending]
        ft, gt = fun(trial.T, None if weights is None else weights[pending])
        gt = gt.T
        ok = (ft <= fp + ARMIJO_C1 * st * sl) & np.isfinite(ft) & _finite_rows(gt)
        if np.all(ok) and pending.size == count:  # every start passed at once (the usual case)
            f_new[:], g_new[:] = ft, gt
            break
        f_new[pending[ok]] = ft[ok]
        g_new[:, pending[ok]] = gt[:, ok]
        fail = ~ok
        pending, ft_fail, st, sl, fp = pending[fail], ft[fail], st[fail], sl[fail], fp[fail]
        if pending.size == 0:
            break
        # the minimiser of the quadratic through f(0), f'(0) and f(step), kept within [0.1, 0.5]·step
        # (Nocedal & Wright eq. 3.57); 0.1·step where f(step) is not finite
        with np.errstate(all="ignore"):
            quad = -sl * st * st / (2.0 * (ft_fail - fp - sl * st))
        step[pending] = np.where(np.isfinite(quad), np.clip(quad, 0.1 * st, 0.5 * st), 0.1 * st)
    return step, f_new, g_new


def _steepest(g: np.ndarray) -> np.ndarray:
    """Steepest-descent directions of length at most 1, for the columns of ``g`` (P, S)."""
    return -g / np.maximum(1.0, np.sqrt(np.einsum("ps,ps->s", g, g)))


class BFGSResult(NamedTuple):
    """Per start: end point x (S, P), objective f (S,), gradient g (S, P), iterations run (S,) and the
    inverse-Hessian estimate (S, P, P), which a later :func:`batched_bfgs` call can continue from."""

    x: np.ndarray
    f: np.ndarray
    g: np.ndarray
    iterations: np.ndarray
    inverse_hessian: np.ndarray

    def take(self, index: np.ndarray) -> BFGSResult:
        """The rows ``index`` of every field."""
        return BFGSResult(*(field[index] for field in self))


@_quietly
def batched_bfgs(
    fun: ObjectiveFn,
    x0: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    inverse_hessian: np.ndarray | None = None,
    values: tuple[np.ndarray, np.ndarray] | None = None,
    max_iter: int = 500,
    ftol: float = 1e-14,
    gtol: float = 0.0,
    max_backtracks: int = 40,
) -> BFGSResult:
    """Minimise ``fun`` from each row of ``x0`` (S starts × P parameters) independently but in lock-step.

    ``fun(X, W)`` returns objective values (S,) and gradients (S, P) for the rows of X; ``weights`` (S, n)
    are per-row point weights passed through as W (or None). ``inverse_hessian`` (S, P, P) continues from
    earlier estimates (e.g. the previous stage's); a start without one (or with the identity) begins with a
    steepest-descent step of length at most 1, and its estimate is scaled by sᵀy / yᵀy at the first update
    (Nocedal & Wright eq. 6.20). Updates that fail the curvature condition sᵀy > 0 are skipped.

    ``values`` = (f, g) at ``x0`` when already known (saves one evaluation of every start).

    A start stops when its relative decrease falls to ``ftol`` (f_prev − f ≤ ftol·max(|f_prev|, |f|), only
    once it has a curvature estimate, so that a tiny first steepest-descent step is not mistaken for
    convergence), when max|g| ≤ ``gtol``, when the line search finds no decrease (the objective's
    resolution is reached), or after ``max_iter`` iterations. Stopped starts leave the batch.
    """
    x = np.array(x0, dtype=float)
    s_count, p = x.shape
    w_all = None if weights is None else np.asarray(weights, dtype=float)
    f, g = fun(x, w_all) if values is None else (np.array(values[0], dtype=float), np.array(values[1], dtype=float))
    f = np.where(np.isfinite(f), f, np.inf)
    iters = np.zeros(s_count, dtype=int)
    eye = np.eye(p)[:, :, None]
    # inside, every array holds one start per column (P, S) or per last axis (P, P, S), so that each numpy
    # pass runs along the starts: (S, P) rows of 5 would make every pass a loop of tiny inner loops
    h_all = (
        np.broadcast_to(eye, (p, p, s_count)).copy()
        if inverse_hessian is None
        else np.ascontiguousarray(np.asarray(inverse_hessian, dtype=float).transpose(1, 2, 0))
    )
    fresh_all = np.all(h_all == eye, axis=(0, 1))
    # the working set: compact copies of the starts still running (written back when they stop)
    act = np.flatnonzero(np.isfinite(f) & _finite_rows(g.T))
    xa, fa, ga, h, fresh = x[act].T.copy(), f[act], g[act].T.copy(), h_all[:, :, act], fresh_all[act]
    wa = None if w_all is None else w_all[act]
    x_out, g_out = x.T.copy(), g.T.copy()
    for _ in range(max_iter):
        if act.size == 0:
            break
        d = -np.einsum("ijs,js->is", h, ga)
        slope = np.einsum("ps,ps->s", ga, d)
        steepest = fresh | ~(slope < 0) | ~_finite_rows(d)
        if np.any(steepest):  # no estimate yet, or not a descent direction: restart from steepest descent
            d[:, steepest] = _steepest(ga[:, steepest])
            slope[steepest] = np.einsum("ps,ps->s", ga[:, steepest], d[:, steepest])
            h[:, :, steepest & ~fresh] = eye
            fresh |= steepest
        step, f_new, g_new = _line_search(fun, xa, fa, d, slope, wa, max_backtracks)
        moved = f_new < fa
        s_vec = (step * moved) * d
        y_vec = g_new - ga
        y_vec *= moved
        sy = np.einsum("ps,ps->s", s_vec, y_vec)
        yy = np.einsum("ps,ps->s", y_vec, y_vec)
        ss = np.einsum("ps,ps->s", s_vec, s_vec)
        update = moved & (sy > 1e-12 * np.sqrt(ss * yy))
        first = update & fresh
        if np.any(first):  # Nocedal & Wright eq. 6.20: H0 = (sᵀy / yᵀy) I before the first update
            h[:, :, first] = eye * (sy[first] / yy[first])
            fresh[first] = False
        if np.any(update):
            # Nocedal & Wright eq. 6.17 expanded: with σ = sᵀy, w = Hy/σ and v = ((σ + yᵀHy)/σ²)·s − w,
            # H ← H + s vᵀ − w sᵀ
            every = bool(np.all(update))
            hu = h if every else h[:, :, update]
            su, yu, sy_u = (s_vec, y_vec, sy) if every else (s_vec[:, update], y_vec[:, update], sy[update])
            with np.errstate(all="ignore"):
                w = np.einsum("ijs,js->is", hu, yu) / sy_u
                v = ((1.0 + np.einsum("ps,ps->s", yu, w)) / sy_u) * su - w
                hu += su[:, None, :] * v[None, :, :]
                hu -= w[:, None, :] * su[None, :, :]
            broken = ~np.isfinite(np.einsum("ijs->s", hu))  # tiny sᵀy: start the estimate again
            if np.any(broken):
                hu[:, :, broken] = eye
                fresh[np.flatnonzero(update)[broken]] = True
            if not every:
                h[:, :, update] = hu
        f_prev = fa
        xa += s_vec
        fa = np.where(moved, f_new, fa)
        ga = np.where(moved, g_new, ga)
        iters[act] += 1
        scale = np.maximum(np.abs(f_prev), np.abs(fa))
        done = ~moved | (((f_prev - fa) <= ftol * scale) & ~fresh)
        if gtol > 0:
            done |= np.max(np.abs(ga), axis=0) <= gtol
        if np.any(done):
            out = act[done]
            x_out[:, out], f[out], g_out[:, out], h_all[:, :, out] = xa[:, done], fa[done], ga[:, done], h[:, :, done]
            keep = ~done
            act, xa, fa, ga, h, fresh = act[keep], xa[:, keep], fa[keep], ga[:, keep], h[:, :, keep], fresh[keep]
            if wa is not None:
                wa = wa[keep]
    x_out[:, act], f[act], g_out[:, act], h_all[:, :, act] = xa, fa, ga, h
    return BFGSResult(x_out.T.copy(), f, g_out.T.copy(), iters, h_all.transpose(2, 0, 1).copy())


@_quietly
def batched_newton(
    fun: ObjectiveFn,
    hess: HessianFn,
    x0: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    max_iter: int = 200,
    ftol: float = 1e-15,
    max_backtracks: int = 40,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Newton's method from each row of ``x0`` in lock-step: d = −B⁻¹g with B the Hessian ``hess(X, W)``
    with its eigenvalues replaced by their absolute values, floored at 1e-10 of the largest (so that d
    descends; Nocedal & Wright §3.4), falling back to steepest descent where the Hessian is not finite or
    zero; then the Armijo line search, started at no more than 4 times the row's last accepted step (a step
    that had to be cut short is rarely right at full length next time).

    Stops as :func:`batched_bfgs` does (relative decrease ≤ ``ftol``, no decrease found, ``max_iter``).
    Returns (x, f, iterations) per start.
    """
    x = np.array(x0, dtype=float)
    s_count, _ = x.shape
    w_all = None if weights is None else np.asarray(weights, dtype=float)
    f, g = fun(x, w_all)
    f = np.where(np.isfinite(f), f, np.inf)
    iters = np.zeros(s_count, dtype=int)
    act = np.flatnonzero(np.isfinite(f) & np.all(np.isfinite(g), axis=1))
    xa, fa, ga = x[act], f[act], g[act]
    last = np.ones(act.size)  # the last accepted step: the next line search starts at most 4 times longer
    wa = None if w_all is None else w_all[act]
    for _ in range(max_iter):
        if act.size == 0:
            break
        b = hess(xa, wa)
        ok_b = np.all(np.isfinite(b), axis=(1, 2))
        b[~ok_b] = np.eye(x.shape[1])
        lam, vec = np.linalg.eigh(b)
        top = np.max(np.abs(lam), axis=1, keepdims=True)
        lam = np.maximum(np.abs(lam), EIG_FLOOR * top)
        with np.errstate(all="ignore"):
            d = -np.einsum("sij,sj->si", vec, np.einsum("sji,sj->si", vec, ga) / lam)
        slope = np.einsum("si,si->s", ga, d)
        steepest = ~ok_b | ~(top[:, 0] > 0) | ~(slope < 0) | ~np.all(np.isfinite(d), axis=1)
        if np.any(steepest):
            d[steepest] = _steepest(ga[steepest].T).T
            slope[steepest] = np.einsum("si,si->s", ga[steepest], d[steepest])
        step, f_new, g_new = _line_search(fun, xa.T, fa, d.T, slope, wa, max_backtracks, np.minimum(1.0, 4.0 * last))
        g_new = g_new.T
        moved = f_new < fa
        last = np.where(moved, step, last)
        f_prev = fa
        xa = np.where(moved[:, None], xa + step[:, None] * d, xa)
        fa = np.where(moved, f_new, fa)
        ga = np.where(moved[:, None], g_new, ga)
        iters[act] += 1
        done = ~moved | ((f_prev - fa) <= ftol * np.maximum(np.abs(f_prev), np.abs(fa)))
        if np.any(done):
            x[act[done]], f[act[done]] = xa[done], fa[done]
            keep = ~done
            act, xa, fa, ga, last = act[keep], xa[keep], fa[keep], ga[keep], last[keep]
            if wa is not None:
                wa = wa[keep]
    x[act], f[act] = xa, fa
    return x, f, iters


def multistart(
    fun64: ObjectiveFn,
    fun32: ObjectiveFn,
    x0: np.ndarray,
    *,
    hess64: HessianFn | None = None,
    scout_iterations: int = 1,
    survivors: int | None = 256,
    finish_iterations: int = 50,
    refine: int = 16,
    weights: np.ndarray | None = None,
    stats: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Minimise from every row of ``x0`` and return the ``refine`` best distinct optima, best first.

    1. scout by successive halving: every start runs ``scout_iterations`` float32 BFGS iterations, the
       better half (by objective, distinct points only) runs on, and so on until ``survivors`` remain
       (``None``: no pruning). A start is dropped only when half of the others are lower after the same
       number of iterations;
    2. finish: the survivors run on in float32 BFGS, with their inverse-Hessian estimates, for up to
       ``finish_iterations`` iterations or until the relative decrease falls below 1e-5;
    3. refine: the ``refine`` lowest distinct end points go on in float64, by Newton's method when
       ``hess64`` is given (else BFGS), until no further decrease is found (about 1e-15 relative).

    Returns (x, f): the refined points (``refine`` × P, fewer when fewer distinct points are finite) and
    their float64 objectives, sorted by objective. ``stats``, when given, receives per stage the wall time
    (``*_seconds``), the starts that entered it (``*_starts``) and its iterations (``*_iterations``: per
    round summed for the scouting, of the slowest start otherwise).
    """
    clock = time.perf_counter()
    state = batched_bfgs(fun32, x0, weights=weights, max_iter=max(1, int(scout_iterations)), ftol=1e-6)
    rounds = 1
    while survivors is not None and state.x.shape[0] > survivors:
        keep = distinct_best(state.x, state.f, max(int(survivors), state.x.shape[0] // 2), decimals=4)
        state = state.take(keep)
        weights = None if weights is None else weights[keep]
        if state.x.shape[0] <= survivors:
            break
        state = batched_bfgs(
            fun32,
            state.x,
            weights=weights,
            inverse_hessian=state.inverse_hessian,
            values=(state.f, state.g),
            max_iter=max(1, int(scout_iterations)),
            ftol=1e-6,
        )
        rounds += 1
    _record(stats, "scout", clock, x0.shape[0], rounds * max(1, int(scout_iterations)))
    clock = time.perf_counter()
    entering = state.x.shape[0]
    state = batched_bfgs(
        fun32,
        state.x,
        weights=weights,
        inverse_hessian=state.inverse_hessian,
        values=(state.f, state.g),
        max_iter=int(finish_iterations),
        ftol=1e-5,
    )
    _record(stats, "finish", clock, entering, float(np.max(state.iterations, initial=0)))
    clock = time.perf_counter()
    keep = distinct_best(state.x, state.f, max(1, int(refine)), decimals=4)
    if keep.size == 0:
        return state.x[:0], state.f[:0]
    w_keep = None if weights is None else weights[keep]
    if hess64 is not None:
        x, f, it = batched_newton(fun64, hess64, state.x[keep], weights=w_keep)
    else:
        x, f, _, it, _ = batched_bfgs(
            fun64, state.x[keep], weights=w_keep, inverse_hessian=state.inverse_hessian[keep], max_iter=1000, ftol=1e-15
        )
    _record(stats, "refine", clock, keep.size, float(np.max(it, initial=0)))
    order = np.argsort(f, kind="stable")
    return x[order], f[order]


def _record(stats: dict[str, float] | None, stage: str, since: float, starts: int, iterations: float) -> None:
    if stats is not None:
        stats[f"{stage}_seconds"] = time.perf_counter() - since
        stats[f"{stage}_starts"] = float(starts)
        stats[f"{stage}_iterations"] = float(iterations)


def distinct_best(x: np.ndarray, f: np.ndarray, count: int, decimals: int = 3) -> np.ndarray:
    """Indices of the ``count`` lowest finite objectives among distinct end points (rows of ``x`` rounded to
    ``decimals``), lowest first."""
    finite = np.flatnonzero(np.isfinite(f))
    if finite.size == 0:
        return np.zeros(0, dtype=int)
    order = finite[np.argsort(f[finite], kind="stable")]
    _, first = np.unique(np.round(x[order], decimals), axis=0, return_index=True)
    return order[np.sort(first)[:count]]
