"""lightning_scaling.laws.resampling: the bootstrap's intervals cover the truth, runs are resampled whole,
resamples that cannot determine a law count as failed, and bad arguments are named."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import SMALL_GRID, grid_ladder, ladder
from helpers import TRUE_LAW as TRUE

from lightning_scaling.laws import fitting as F
from lightning_scaling.laws import resampling as R


def test_bootstrap_intervals_cover_the_truth():
    n, d, loss = ladder(TRUE, noise=0.005, seed=4, sizes=10)
    points = F.ScalingPoints.from_arrays(n, d, loss)
    fit = F.fit_approach3(points, starts=SMALL_GRID)
    boot = R.bootstrap(points, "3", 60, budget=1e21, fit=fit, seed=1)
    for key in ("E", "A", "B", "alpha", "beta", "a", "b", "n_opt", "d_opt", "loss_opt"):
        lo, hi = boot.intervals[key]
        assert math.isfinite(lo) and math.isfinite(hi) and lo <= hi, key
    lo, hi = boot.intervals["alpha"]
    assert lo < hi
    assert lo - 0.02 <= TRUE.alpha <= hi + 0.02
    assert boot.failed + len(boot.samples["alpha"]) == 60


def test_bootstrap_approach2_and_runs_are_resampled_whole():
    n, d, loss = ladder(TRUE, noise=0.002, seed=5, sizes=9)
    points = F.ScalingPoints.from_arrays(n, d, loss)
    boot = R.bootstrap(points, "2", 40, seed=0)
    lo, hi = boot.intervals["a"]
    assert lo <= TRUE.beta / (TRUE.alpha + TRUE.beta) + 0.03 and hi >= TRUE.beta / (TRUE.alpha + TRUE.beta) - 0.03
    counts = R._resample_counts(
        F.ScalingPoints.from_arrays([1, 1, 2], [5, 6, 7], [3, 2, 1], runs=["x", "x", "y"]), 50, np.random.default_rng(0)
    )
    assert np.all(counts[:, 0] == counts[:, 1])  # the two points of run x always travel together
    assert np.all(counts[:, 0] + counts[:, 2] == 2)  # two runs drawn per resample


def test_bootstrap_rejects_bad_arguments():
    n, d, loss = ladder(TRUE)
    points = F.ScalingPoints.from_arrays(n, d, loss)
    with pytest.raises(ValueError, match="approach"):
        R.bootstrap(points, "4")
    with pytest.raises(ValueError, match="n_resamples"):
        R.bootstrap(points, "2", 0)
    with pytest.raises(ValueError, match="confidence"):
        R.bootstrap(points, "2", 5, confidence=1.0)


def test_bootstrap_counts_undetermined_resamples_as_failed():
    # three runs (one per model size): a resample that draws a run twice has fewer than 3 sizes and no α
    n, d = grid_ladder(sizes=(1e7, 1e8, 1e9), tokens=tuple(np.geomspace(1e9, 1e11, 6)))
    loss = np.asarray(TRUE.loss(n, d)) * np.exp(0.003 * np.random.default_rng(3).standard_normal(n.size))
    points = F.ScalingPoints.from_arrays(n, d, loss, runs=[f"{size:g}" for size in n])
    fit = F.fit_approach3(points, starts=SMALL_GRID)
    boot = R.bootstrap(points, "3", 40, fit=fit, seed=0)
    assert boot.failed >= 20  # 21 of every 27 draws repeat a run
    assert boot.failed + len(boot.samples["alpha"]) == 40
    assert np.all((boot.samples["alpha"] > 0) & (boot.samples["alpha"] <= F.MAX_EXPONENT))
