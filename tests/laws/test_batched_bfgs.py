"""lightning_scaling.laws.batched_bfgs: BFGS and Newton on many starts at once (the Rosenbrock function), and
the staged multistart reporting its stages."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import SMALL_GRID, ladder
from helpers import TRUE_LAW as TRUE

from lightning_scaling.laws import fitting as F


@pytest.mark.parametrize("method", ["bfgs", "newton"])
def test_batched_optimisers_minimise_the_rosenbrock_function(method):
    from lightning_scaling.laws.batched_bfgs import batched_bfgs, batched_newton

    def fun(x, w):
        a, b = x[:, 0], x[:, 1]
        f = (1 - a) ** 2 + 100 * (b - a * a) ** 2
        g = np.stack([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a)], axis=1)
        return f, g

    def hess(x, w):
        a, b = x[:, 0], x[:, 1]
        h = np.empty((x.shape[0], 2, 2))
        h[:, 0, 0] = 2 - 400 * (b - 3 * a * a)
        h[:, 0, 1] = h[:, 1, 0] = -400 * a
        h[:, 1, 1] = 200
        return h

    x0 = np.array([[-1.2, 1.0], [0.0, 0.0], [2.0, -1.0], [-0.5, 2.5]])
    if method == "bfgs":
        x, f, *_ = batched_bfgs(fun, x0, max_iter=500)
    else:
        x, f, _ = batched_newton(fun, hess, x0)
    np.testing.assert_allclose(x, 1.0, atol=1e-6)
    assert np.all(f < 1e-12)


def test_multistart_reports_its_stages():
    from lightning_scaling.laws.batched_bfgs import multistart

    n, d, loss = ladder(TRUE, noise=0.01, seed=8)
    args = np.log(n), np.log(d), np.log(loss), F.HUBER_DELTA
    stats: dict[str, float] = {}
    x, f = multistart(
        F._approach3_objective(*args),
        F._approach3_objective(*args, np.float32),
        SMALL_GRID,
        hess64=F._approach3_hessian(*args),
        survivors=100,
        refine=8,
        stats=stats,
    )
    assert stats["scout_starts"] == SMALL_GRID.shape[0] and stats["finish_starts"] == 100
    assert stats["refine_starts"] == 8 and x.shape == (8, 5)
    assert np.all(np.diff(f) >= 0)  # best first
    assert all(stats[f"{stage}_seconds"] > 0 for stage in ("scout", "finish", "refine"))
