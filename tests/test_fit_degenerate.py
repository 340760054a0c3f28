"""Runs that cannot determine a law: every fitter says so (a ValueError naming the problem and what to do) and
never returns such a law as a fit. Constant loss, too few points, a single model size or token count,
loss without a trend, non-finite or non-positive values; the bootstrap counts such resamples as failed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_scaling.laws import fitting as F
from lightning_scaling.laws import resampling as R
from lightning_scaling.laws.fitting import UndeterminedLawError
from lightning_scaling.laws.runs import read_csv
from lightning_scaling.laws.definitions import ChinchillaLaw

TRUE = ChinchillaLaw(E=1.8, A=480.0, B=2100.0, alpha=0.35, beta=0.37)
SMALL_GRID = F.approach3_grid()[::9]


def isoflop_ladder(budgets=(1e17, 1e18, 1e19, 1e20), sizes: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) of an isoFLOP ladder: at each budget, sizes spread ±1 decade around √(C/120); D = C/(6N)."""
    n, d = [], []
    for c in budgets:
        mid = math.sqrt(c / 120)
        for size in np.geomspace(mid / 8, mid * 8, sizes):
            n.append(size)
            d.append(c / (6 * size))
    return np.array(n), np.array(d)


def grid_ladder(sizes=(1e7, 3e7, 1e8, 3e8), tokens=(1e9, 3e9, 1e10, 3e10)) -> tuple[np.ndarray, np.ndarray]:
    """Every model size trained for every token count (a curve per size), so that sizes and tokens vary alone."""
    n, d = np.meshgrid(sizes, tokens, indexing="ij")
    return n.ravel(), d.ravel()


def fit_any(which: str, n, d, loss, **kwargs):
    if which == "3":
        return F.fit_approach3(n, d, loss, starts=SMALL_GRID, **kwargs)
    if which == "kaplan":
        return F.fit_kaplan(n, d, loss, **kwargs)
    if which == "2":
        return F.fit_approach2(n, d, loss, **kwargs)
    runs = [f"{size:.6g}" for size in np.asarray(n)]
    return F.fit_approach1(n, d, loss, runs=runs, **kwargs)


ALL = ("1", "2", "3", "kaplan")


# ---------------------------------------------------------------- constant loss (issue: α = 16.7, β = 47.5)


@pytest.mark.parametrize("which", ALL)
def test_constant_loss_is_not_a_fit(which):
    n, d = isoflop_ladder() if which == "2" else grid_ladder()
    with pytest.raises(UndeterminedLawError, match=r"the loss is 3 nats at every point"):
        fit_any(which, n, d, np.full(n.size, 3.0))


def test_constant_loss_csv_is_not_a_fit(tmp_path):
    n, d = isoflop_ladder()
    path = tmp_path / "flat.csv"
    path.write_text("params,tokens,loss\n" + "".join(f"{a},{b},2.5\n" for a, b in zip(n, d)))
    with pytest.raises(ValueError, match="the loss is 2.5 nats at every point.*wrong loss column"):
        F.fit_approach3(read_csv(path))


def test_constant_loss_through_the_cli_exits_2_with_one_line(tmp_path, capsys):
    from lightning_scaling.cli import main

    n, d = isoflop_ladder()
    path = tmp_path / "flat.csv"
    path.write_text("params,tokens,loss\n" + "".join(f"{a},{b},2.5\n" for a, b in zip(n, d)))
    assert main(["fit", str(path)]) == 2
    err = capsys.readouterr().err
    assert "the loss is 2.5 nats at every point" in err and "alpha" not in err and err.count("\n") == 1


def test_a_loss_that_barely_moves_is_caught_after_fitting():
    # the loss does fall with N and D, but by less than the Huber threshold (1e-3 in log loss) across the
    # runs: the objective cannot see the terms, so their exponents are arbitrary
    n, d = isoflop_ladder()
    loss = 3.0 + 1e-4 * (n / 1e6) ** -0.3 + 1e-4 * (d / 1e8) ** -0.3
    with pytest.raises(UndeterminedLawError, match="changes the loss by only 1.9e-05 .* under the Huber threshold "
                                                   "0.001.*add runs spanning a wider range of params"):
        F.fit_approach3(n, d, loss, starts=SMALL_GRID)


# ---------------------------------------------------------------- too few points, one size, one token count


@pytest.mark.parametrize("which, count, match", [
    ("3", 5, "approach 3 fits 5 parameters and needs more than 5 points; got 5"),
    ("kaplan", 4, "the Kaplan law fits 4 parameters and needs more than 4 points; got 4"),
    ("2", 2, "approach 2 needs runs at 3 or more distinct model sizes"),
    ("1", 1, "approach 1 needs runs at 2 or more distinct model sizes"),
])
def test_fewer_points_than_the_fit_needs(which, count, match):
    n, d = grid_ladder()
    idx = np.arange(0, n.size, 3)[:count]
    with pytest.raises(UndeterminedLawError, match=match):
        fit_any(which, n[idx], d[idx], TRUE.loss(n[idx], d[idx]))


@pytest.mark.parametrize("which, match", [
    ("3", "approach 3 needs runs at 3 or more distinct model sizes.*params = 1e\\+08; add runs with other model"),
    ("kaplan", "the Kaplan law needs runs at 2 or more distinct model sizes"),
    ("2", "approach 2 needs runs at 3 or more distinct model sizes"),
    ("1", "approach 1 needs runs at 2 or more distinct model sizes"),
])
def test_a_single_model_size(which, match):
    d = np.geomspace(1e9, 1e11, 8)
    n = np.full(d.size, 1e8)
    with pytest.raises(UndeterminedLawError, match=match):
        fit_any(which, n, d, TRUE.loss(n, d))


def test_two_model_sizes_do_not_determine_approach_3():
    # E + A/N^α at two sizes is two numbers for three unknowns: any α fits; say so instead of picking one
    n, d = grid_ladder(sizes=(1e7, 1e8), tokens=(1e9, 3e9, 1e10, 3e10))
    with pytest.raises(UndeterminedLawError, match="3 or more distinct model sizes.*1e\\+07 and 1e\\+08"):
        F.fit_approach3(n, d, TRUE.loss(n, d), starts=SMALL_GRID)


@pytest.mark.parametrize("which, match", [
    ("3", "approach 3 needs runs at 3 or more distinct token counts.*other numbers of training tokens"),
    ("kaplan", "the Kaplan law needs runs at 2 or more distinct token counts"),
    ("2", "at least 2 compute budgets with an interior minimum.*fewer than 3 model sizes"),
    ("1", "every run has a single point.*points='all'"),
])
def test_a_single_token_count(which, match):
    n = np.geomspace(1e7, 1e9, 8)
    d = np.full(n.size, 1e10)
    with pytest.raises(UndeterminedLawError, match=match):
        fit_any(which, n, d, TRUE.loss(n, d))


def test_sizes_equal_to_rounding_count_once():
    # values read back from CSV, or tokens computed as C/(6N), differ in the last bits: still one size
    n = 1e8 * (1 + 1e-13 * np.arange(8))
    d = np.geomspace(1e9, 1e11, 8)
    with pytest.raises(UndeterminedLawError, match="params = 1e\\+08;"):
        F.fit_approach3(n, d, TRUE.loss(n, d))


# ---------------------------------------------------------------- a loss without a trend, or the wrong way


def test_loss_without_a_trend_is_not_a_fit():
    n, d = isoflop_ladder()
    loss = 3.0 * np.exp(0.01 * np.random.default_rng(0).standard_normal(n.size))
    with pytest.raises(UndeterminedLawError, match="outside \\(0, 2\\], the range where the law means anything"):
        F.fit_approach3(n, d, loss)
    with pytest.raises(UndeterminedLawError, match="curvature is within 2 standard errors of zero"):
        F.fit_approach2(n, d, loss)


@pytest.mark.parametrize("which", ["3", "kaplan"])
def test_loss_rising_with_scale_is_not_a_fit(which):
    n, d = grid_ladder()
    undetermined = "(no decreasing law|no law with positive exponents|outside \\(0, 2\\])"
    with pytest.raises(UndeterminedLawError, match=undetermined):
        fit_any(which, n, d, 1.0 / np.asarray(TRUE.loss(n, d)))


def test_undetermined_law_is_a_value_error_and_real_fits_pass_the_checks():
    assert issubclass(UndeterminedLawError, ValueError)
    n, d = grid_ladder()
    fit = F.fit_approach3(n, d, TRUE.loss(n, d), starts=SMALL_GRID)
    assert 0 < fit.law.alpha <= F.MAX_EXPONENT and 0 < fit.law.beta <= F.MAX_EXPONENT


# ---------------------------------------------------------------- non-finite and non-positive values


@pytest.mark.parametrize("which", ALL)
@pytest.mark.parametrize("field", ["params", "tokens", "loss"])
@pytest.mark.parametrize("bad, match", [(float("nan"), "must be finite"), (float("inf"), "must be finite"),
                                        (0.0, "must be > 0"), (-1.0, "must be > 0")])
def test_non_finite_and_non_positive_values_name_the_argument(which, field, bad, match):
    n, d = grid_ladder()
    values = {"params": n.copy(), "tokens": d.copy(), "loss": np.asarray(TRUE.loss(n, d), dtype=float)}
    values[field][3] = bad
    with pytest.raises(ValueError, match=f"{field} {match}"):
        fit_any(which, values["params"], values["tokens"], values["loss"])


@pytest.mark.parametrize("which", ALL)
def test_non_finite_flops_name_the_argument(which):
    n, d = isoflop_ladder()
    flops = 6 * n * d
    flops[2] = float("nan")
    fitter = {"1": F.fit_approach1, "2": F.fit_approach2, "3": F.fit_approach3, "kaplan": F.fit_kaplan}[which]
    with pytest.raises(ValueError, match="flops must be finite"):
        fitter(n, loss=TRUE.loss(n, d), flops=flops)


def test_points_built_directly_are_checked_too():
    good = np.ones(3)
    with pytest.raises(ValueError, match="loss must be finite and > 0"):
        F.ScalingPoints(good, good, np.array([1.0, np.nan, 1.0]), good, np.array(["a", "b", "c"]))
    with pytest.raises(ValueError, match="tokens has 2 values but params has 3"):
        F.ScalingPoints(good, np.ones(2), good, good, np.array(["a", "b", "c"]))


# ---------------------------------------------------------------- the bootstrap


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
