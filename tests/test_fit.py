"""Scaling-law fitting: recovery of known constants, the Besiroglu et al. 2024 refit, the batched optimiser
(pruning, Newton refinement, against a per-start scipy loop), approaches 1 and 2, Kaplan, the bootstrap, input
reading and bad input. Runs that cannot determine a law: tests/test_fit_degenerate.py."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from lightning_scaling.laws import fitting as F
from lightning_scaling.laws import resampling as R
from lightning_scaling.laws.runs import read_csv, read_csv_logger, read_points
from lightning_scaling.laws.definitions import ChinchillaLaw, KaplanLaw

TRUE = ChinchillaLaw(E=1.8, A=480.0, B=2100.0, alpha=0.35, beta=0.37)
# a small grid of starts around the paper's, for the tests that are not about the grid itself
SMALL_GRID = F.approach3_grid()[::9]


def ladder(law, noise: float = 0.0, seed: int = 0, budgets=(1e17, 1e18, 1e19, 1e20), sizes: int = 8):
    """isoFLOP ladder: at each budget, model sizes spread ±1 decade around the optimum; D = C/(6N)."""
    rng = np.random.default_rng(seed)
    n, d = [], []
    for c in budgets:
        n_mid = math.sqrt(c / 6 / 20)
        for k in np.geomspace(n_mid / 8, n_mid * 8, sizes):
            n.append(k)
            d.append(c / (6 * k))
    n, d = np.array(n), np.array(d)
    loss = np.asarray(law.loss(n, d)) * np.exp(noise * rng.standard_normal(n.size))
    return n, d, loss


# ---------------------------------------------------------------- approach 3


def test_approach3_recovers_exact_constants_from_noiseless_data():
    n, d, loss = ladder(TRUE)
    res = F.fit_approach3(n, d, loss)
    for key in ("E", "A", "B", "alpha", "beta"):
        assert getattr(res.law, key) == pytest.approx(getattr(TRUE, key), rel=2e-3), key
    assert res.objective < 1e-9
    assert np.max(np.abs(res.residuals)) < 1e-4
    assert res.starts == 4500
    assert res.a == pytest.approx(TRUE.beta / (TRUE.alpha + TRUE.beta), abs=1e-3)


def test_approach3_recovers_constants_from_noisy_data():
    n, d, loss = ladder(TRUE, noise=0.005, seed=1, sizes=10)
    res = F.fit_approach3(n, d, loss, starts=SMALL_GRID)
    assert res.law.E == pytest.approx(TRUE.E, abs=0.1)
    assert res.law.alpha == pytest.approx(TRUE.alpha, abs=0.05)
    assert res.law.beta == pytest.approx(TRUE.beta, abs=0.05)
    assert res.a == pytest.approx(0.5139, abs=0.04)
    opt = res.law.compute_optimal(1e21)
    assert float(opt.params) == pytest.approx(float(TRUE.compute_optimal(1e21).params), rel=0.35)
    assert np.all(np.isfinite(res.residuals)) and res.residuals.shape == n.shape


def test_batched_optimiser_matches_a_per_start_scipy_loop():
    from scipy.optimize import minimize

    n, d, loss = ladder(TRUE, noise=0.01, seed=2)
    starts = F.approach3_grid()[::450]  # 10 starts
    ours = F.fit_approach3(n, d, loss, starts=starts)
    best = math.inf
    for x0 in starts:
        res = minimize(lambda t: F.approach3_objective(t, n, d, loss), x0, jac=True, method="L-BFGS-B")
        best = min(best, res.fun)
    assert ours.objective <= best * (1 + 1e-10)
    assert ours.objective == pytest.approx(best, rel=1e-6)


def test_pruning_the_starts_reaches_the_same_optimum_as_running_them_all():
    n, d, loss = ladder(TRUE, noise=0.02, seed=7, sizes=7)
    starts = F.approach3_grid()[::3]  # 1,500 starts
    pruned = F.fit_approach3(n, d, loss, starts=starts, survivors=64)
    every = F.fit_approach3(n, d, loss, starts=starts, survivors=None)
    assert pruned.objective == pytest.approx(every.objective, rel=1e-10)
    np.testing.assert_allclose(pruned.theta, every.theta, rtol=1e-5, atol=1e-7)


def test_the_old_polish_argument_is_accepted_with_a_deprecation_warning():
    n, d, loss = ladder(TRUE, noise=0.01, seed=8)
    with pytest.warns(DeprecationWarning, match="polish"):
        F.fit_approach3(n, d, loss, starts=SMALL_GRID[:50], polish=3)


def test_multistart_reports_its_stages():
    from lightning_scaling.laws.batched_bfgs import multistart

    n, d, loss = ladder(TRUE, noise=0.01, seed=8)
    args = np.log(n), np.log(d), np.log(loss), F.HUBER_DELTA
    stats: dict[str, float] = {}
    x, f = multistart(F._approach3_objective(*args), F._approach3_objective(*args, np.float32), SMALL_GRID,
                      hess64=F._approach3_hessian(*args), survivors=100, refine=8, stats=stats)
    assert stats["scout_starts"] == SMALL_GRID.shape[0] and stats["finish_starts"] == 100
    assert stats["refine_starts"] == 8 and x.shape == (8, 5)
    assert np.all(np.diff(f) >= 0)  # best first
    assert all(stats[f"{stage}_seconds"] > 0 for stage in ("scout", "finish", "refine"))


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


def test_approach3_hessian_matches_finite_differences_of_the_gradient():
    n, d, loss = ladder(TRUE, noise=0.02, seed=3)
    args = np.log(n), np.log(d), np.log(loss), F.HUBER_DELTA
    fun, hess = F._approach3_objective(*args), F._approach3_hessian(*args)
    rng = np.random.default_rng(1)
    theta = np.array([6.0, 7.5, 0.6, 0.35, 0.37])[None, :] + 0.2 * rng.standard_normal((4, 5))
    for weights in (None, rng.integers(0, 3, (4, n.size)).astype(float)):
        analytic = hess(theta, weights)
        numeric = np.empty_like(analytic)
        for k in range(5):
            step = np.zeros_like(theta)
            step[:, k] = 1e-6
            numeric[:, :, k] = (fun(theta + step, weights)[1] - fun(theta - step, weights)[1]) / 2e-6
        np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-9 * np.abs(analytic).max())
        np.testing.assert_allclose(analytic, analytic.transpose(0, 2, 1), atol=1e-12)


@pytest.mark.parametrize("which", ["approach3", "kaplan"])
def test_analytic_gradients_match_finite_differences(which):
    n, d, loss = ladder(TRUE, noise=0.02, seed=3)
    args = np.log(n), np.log(d), np.log(loss), F.HUBER_DELTA
    fun = F._approach3_objective(*args) if which == "approach3" else F._kaplan_objective(*args)
    rng = np.random.default_rng(0)
    theta = (np.array([6.0, 7.5, 0.6, 0.35, 0.37]) if which == "approach3" else np.array([0.08, 0.1, 30.0, 28.0]))
    theta = theta[None, :] + 0.05 * rng.standard_normal((4, theta.size))
    _, g = fun(theta, None)
    eps = 1e-6
    for k in range(theta.shape[1]):
        step = np.zeros_like(theta)
        step[:, k] = eps
        numeric = (fun(theta + step, None)[0] - fun(theta - step, None)[0]) / (2 * eps)
        np.testing.assert_allclose(g[:, k], numeric, rtol=1e-4, atol=1e-9)


def test_epoch_refit_of_the_digitised_chinchilla_data(shared_data):
    # Besiroglu et al. 2024 (arXiv 2404.10102), Table 1: estimates (standard errors)
    reported = {"E": (1.8172, 0.03), "A": (482.01, 124.58), "B": (2085.43, 1293.23), "alpha": (0.3478, 0.02),
                "beta": (0.3658, 0.02)}
    points = read_csv(shared_data / "chinchilla_digitised_epoch2024.csv").drop_highest_loss(5)
    assert len(points) == 240
    res = F.fit_approach3(points)
    for key, (value, se) in reported.items():
        assert abs(getattr(res.law, key) - value) <= se, (key, getattr(res.law, key))
    # our refit itself, to its printed digits: E 1.8172, A 478, B 2143, alpha 0.3473, beta 0.3672
    assert res.law.E == pytest.approx(1.8172, abs=5e-5)
    assert res.law.A == pytest.approx(478, abs=0.5)
    assert res.law.B == pytest.approx(2143, abs=0.5)
    assert res.law.alpha == pytest.approx(0.3473, abs=5e-5)
    assert res.law.beta == pytest.approx(0.3672, abs=5e-5)
    assert res.objective == pytest.approx(1.0182740178e-3, rel=1e-10)
    # about 20 tokens per parameter at Chinchilla's budget (Hoffmann 2022 Table 3: 67B params at 5.76e23)
    opt = res.law.compute_optimal(5.76e23)
    assert 15 < float(opt.tokens) / float(opt.params) < 25


# ---------------------------------------------------------------- approaches 1 and 2, Kaplan


def test_approach2_recovers_the_frontier_exponent():
    n, d, loss = ladder(TRUE, sizes=9)
    res = F.fit_approach2(n, d, loss)
    assert res.law is None
    assert res.optima.shape == (4, 4)
    assert res.a == pytest.approx(TRUE.beta / (TRUE.alpha + TRUE.beta), abs=0.02)
    assert res.a + res.b == pytest.approx(1.0, abs=1e-9)
    n_opt, d_opt = res.optimal(1e20)
    assert n_opt == pytest.approx(float(TRUE.compute_optimal(1e20).params), rel=0.15)
    assert 6 * n_opt * d_opt == pytest.approx(1e20, rel=1e-9)


def test_approach2_skips_budgets_without_an_interior_minimum():
    n, d, loss = ladder(TRUE, sizes=9)
    extra_n = np.array([1e6, 2e6])  # a budget with two sizes only
    n2 = np.concatenate([n, extra_n])
    d2 = np.concatenate([d, 1e21 / (6 * extra_n)])
    l2 = np.concatenate([loss, np.asarray(TRUE.loss(extra_n, 1e21 / (6 * extra_n)))])
    res = F.fit_approach2(n2, d2, l2)
    assert len(res.skipped) == 1 and "fewer than 3" in res.skipped[0]


def test_approach1_envelope_of_training_curves():
    sizes = np.geomspace(1e7, 3e9, 10)
    n, d, runs = [], [], []
    for k, size in enumerate(sizes):
        for tokens in np.geomspace(1e8, 1e12, 60):
            n.append(size)
            d.append(tokens)
            runs.append(k)
    n, d = np.array(n), np.array(d)
    res = F.fit_approach1(n, d, TRUE.loss(n, d), runs=runs, n_flops=60)
    assert res.law is None
    # the envelope of finite curves tracks the frontier exponent (coarse: ten model sizes)
    assert res.a == pytest.approx(TRUE.beta / (TRUE.alpha + TRUE.beta), abs=0.08)
    assert np.unique(res.optima[:, 1]).size >= 4


def test_kaplan_fit_recovers_its_constants():
    true = KaplanLaw()
    n = np.repeat(np.geomspace(1e6, 1e9, 8), 6)
    d = np.tile(np.geomspace(1e8, 1e11, 6), 8)
    res = F.fit_kaplan(n, d, true.loss(n, d))
    assert res.law.alpha_n == pytest.approx(true.alpha_n, rel=0.02)
    assert res.law.alpha_d == pytest.approx(true.alpha_d, rel=0.02)
    assert math.log(res.law.n_c) == pytest.approx(math.log(true.n_c), rel=0.01)
    assert 0 < res.a < 1 and res.a + res.b == pytest.approx(1.0)


# ---------------------------------------------------------------- bootstrap


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
    counts = R._resample_counts(F.ScalingPoints.from_arrays([1, 1, 2], [5, 6, 7], [3, 2, 1], runs=["x", "x", "y"]),
                                50, np.random.default_rng(0))
    assert np.all(counts[:, 0] == counts[:, 1])  # the two points of run x always travel together
    assert np.all(counts[:, 0] + counts[:, 2] == 2)  # two runs drawn per resample


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"params": [1e6, 2e6, 3e6, 4e6, 5e6], "tokens": [1e9] * 5, "loss": [3, 2.9, 2.8, 2.7, 2.6]},
         "needs more than 5 points"),
        ({"params": [1e6, float("nan")] * 4, "tokens": [1e9] * 8, "loss": [3.0] * 8}, "params must be finite"),
        ({"params": [1e6, 2e6] * 4, "tokens": [1e9] * 8, "loss": [3.0, -1.0] * 4}, "loss must be > 0"),
        ({"params": [1e6, 2e6] * 4, "tokens": [1e9] * 7, "loss": [3.0] * 8}, "tokens has 7 values"),
        ({"params": [1e6, 2e6] * 4, "tokens": None, "loss": [3.0] * 8}, "give tokens or flops"),
    ],
)
def test_bad_input_names_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        F.fit_approach3(kwargs["params"], kwargs["tokens"], kwargs["loss"])


def test_approach2_with_one_budget_says_so():
    n = np.geomspace(1e7, 1e9, 7)
    with pytest.raises(ValueError, match="at least 2 compute budgets"):
        F.fit_approach2(n, flops=np.full(7, 1e19), loss=TRUE.loss(n, 1e19 / (6 * n)))


def test_bootstrap_rejects_bad_arguments():
    n, d, loss = ladder(TRUE)
    points = F.ScalingPoints.from_arrays(n, d, loss)
    with pytest.raises(ValueError, match="approach"):
        R.bootstrap(points, "4")
    with pytest.raises(ValueError, match="n_resamples"):
        R.bootstrap(points, "2", 0)
    with pytest.raises(ValueError, match="confidence"):
        R.bootstrap(points, "2", 5, confidence=1.0)


# ---------------------------------------------------------------- reading runs


def test_read_csv_chinchilla_and_sardana_columns(tmp_path):
    chin = tmp_path / "chin.csv"
    chin.write_text("x,Model Size,Training FLOP,loss\n1,1e8,6e18,3.0\n2,2e8,6e18,2.9\n")
    pts = read_csv(chin)
    np.testing.assert_allclose(pts.tokens, [1e10, 5e9])  # D = C / (6N)
    from importlib.resources import files

    sardana = read_csv(files("lightning_scaling.data") / "sardana2023_trainingresults.csv")
    assert len(sardana) == 47 and sardana.params.min() == pytest.approx(1.51e8)
    assert sardana.loss.max() < 4


def test_read_csv_errors_name_the_column(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("params,loss\n1e8,3.0\n")
    with pytest.raises(ValueError, match="tokens or a flops column"):
        read_csv(bad)
    bad.write_text("params,tokens,loss\n1e8,abc,3.0\n")
    with pytest.raises(ValueError, match="line 2: column 'tokens'"):
        read_csv(bad)
    with pytest.raises(ValueError, match="no column 'nope'"):
        read_csv(bad, loss_column="nope")


def _metrics(path, rows):
    path.mkdir(parents=True)
    with (path / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["epoch", "step", "scaling/params", "scaling/tokens", "train/loss", "val/loss"])
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def test_read_csv_logger_final_and_all_points(tmp_path):
    for k, size in enumerate((1e6, 2e6)):
        _metrics(tmp_path / "logs" / f"version_{k}", [
            {"step": 0, "scaling/params": size, "scaling/tokens": 1000},
            {"step": 0, "train/loss": 5.0 - k},
            {"step": 1, "scaling/tokens": 2000, "train/loss": 4.0 - k},
            {"step": 1, "val/loss": 4.5 - k},
        ])
    final = read_csv_logger(tmp_path / "logs")
    assert sorted(final.loss.tolist()) == [3.5, 4.5]  # val/loss preferred
    curves = read_csv_logger(tmp_path / "logs", loss_column="train/loss", points="all")
    assert len(curves) == 4 and np.unique(curves.runs).size == 2
    assert sorted(curves.tokens.tolist()) == [1000, 1000, 2000, 2000]  # tokens carried forward
    both = read_points([tmp_path / "logs" / "version_0", tmp_path / "logs" / "version_1"])
    assert len(both) == 2


def test_read_csv_logger_without_token_budget_columns(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text("epoch,step,train/loss\n0,1,3.0\n")
    with pytest.raises(ValueError, match="scaling/params.*TokenBudget"):
        read_csv_logger(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no metrics.csv"):
        read_csv_logger(tmp_path / "empty")


# ---------------------------------------------------------------- plots


def test_plot_fit_writes_three_panels(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need the plot extra (matplotlib)")
    from lightning_scaling.laws.plotting import plot_fit

    n, d, loss = ladder(TRUE, noise=0.003, seed=6)
    law_fit = F.fit_approach3(n, d, loss, starts=SMALL_GRID)
    frontier = F.fit_approach2(n, d, loss)
    for name, fit in (("law.png", law_fit), ("frontier.png", frontier)):
        out = plot_fit(F.ScalingPoints.from_arrays(n, d, loss), fit, tmp_path / name)
        data = out.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
